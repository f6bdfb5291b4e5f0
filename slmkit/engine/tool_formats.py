"""A chat model's own tool-call syntax: found in its chat template, used to prompt, to
constrain and to read calls back.

Models trained for tools expect them the way their chat template writes them, and a
fine-tuned model must be served with the format it was trained on. slmkit knows three:

* ``hermes`` -- tools passed to the template's ``tools`` variable, each call a block ::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  several blocks joined by ``\\n`` for parallel calls; results are ``tool`` messages
  (Qwen2.5 renders them as ``<tool_response>`` blocks in a user turn). Qwen2.5, Qwen3,
  Hermes 2/3 and others share it.
* ``llama3-json`` -- tools passed to ``tools`` (Llama 3.1-3.3 put them in the first user
  message), a call is the bare object ``{"name": "get_weather", "parameters": {...}}`` and
  one call per turn (Llama 3.2's template raises on more); results are ``ipython`` turns.
* ``generic`` -- templates that ignore ``tools`` (SmolLM2's, the built-in model's) or
  whose call syntax is none of the above: slmkit's documented format
  (:mod:`slmkit.engine.tools`), tools in the system prompt and
  ``{"tool_calls": [...]}`` replies.

:func:`tool_format` finds the format by *rendering* the template on a probe conversation
(one tool, one call with ``{"x": 7}``, one result) instead of matching template source:
the template must show the tool when given ``tools``, show the result, render the call
turn as the generation prompt followed by exactly one of the call texts above, and keep
earlier turns unchanged when later ones follow. So the grammar (:meth:`ToolFormat.grammar`)
allows exactly the text the template writes for a call, which is what a model fine-tuned
on that template (:mod:`slmkit.train.sft` renders training conversations through
:func:`render_chat`) learned, and :func:`render_chat` prompts it the same way.

In the ``hermes`` grammar a marker that is one token of the vocabulary (Qwen2.5 has
``<tool_call>`` as an added token) is that token, as the template's text tokenizes; plain
text under ``tool_choice: "auto"`` may not start with whitespace, ``<`` or ``{`` (so its
first character tells text from a call), in the other formats not with ``{``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from slmkit.engine.grammar import JSON_STYLE, Grammar
from slmkit.engine.tools import (TEXT, Tool, ToolCallScanner, ToolFormatError, _call_arguments,
                                 closed, render_conversation, text_grammar, tool_grammar)

HERMES, LLAMA3, GENERIC_NAME = "hermes", "llama3-json", "generic"
OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolFormat:
    """How one chat template writes tool calls (see the module docstring).

    Attributes:
        name: ``hermes``, ``llama3-json`` or ``generic``.
        args_key: the key of a call's arguments (``arguments`` or ``parameters``).
        parallel: whether one assistant turn may carry several calls.
        open_id, close_id: the vocabulary ids of ``<tool_call>`` / ``</tool_call>`` when
            each is one token (``hermes`` only).
    """

    name: str = GENERIC_NAME
    args_key: str = "arguments"
    parallel: bool = True
    open_id: int | None = None
    close_id: int | None = None

    @property
    def native(self) -> bool:
        """The model's own template renders tools and calls (not the generic format)."""
        return self.name != GENERIC_NAME

    # ------------------------------------------------------------------ grammars

    def _call_schema(self, tools: list[Tool]) -> dict:
        options = [{"type": "object",
                    "properties": {"name": {"const": t.name},
                                   self.args_key: closed(t.parameters)},
                    "required": ["name", self.args_key], "additionalProperties": False}
                   for t in tools]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {**schema, "x-guidance": JSON_STYLE}

    def _marker(self, text: str, token: int | None) -> str:
        return f"<[{token}]>" if token is not None else json.dumps(text)

    def grammar(self, tools: list[Tool], required: bool, parallel: bool = True) -> Grammar:
        """The grammar of a turn that may (``required=False``: plain text or calls) or must
        call ``tools``; several calls only if ``parallel`` and the format carries them."""
        if not self.native:
            return tool_grammar(tools, required, parallel)
        obj = "%json " + json.dumps(self._call_schema(tools))
        if self.name == LLAMA3:
            lines = ["call: " + obj]
            calls = "call"
            text = TEXT
        else:
            lines = [f"call: {self._marker(OPEN, self.open_id)} \"\\n\" obj \"\\n\" "
                     f"{self._marker(CLOSE, self.close_id)}", "obj: " + obj]
            calls = "call (\"\\n\" call)*" if parallel and self.parallel else "call"
            text = r"[^<{\s][\s\S]*"
        start = f"start: {calls}" if required else f"start: TEXT | {calls}\nTEXT: /{text}/"
        return Grammar.lark("\n".join([start, *lines]))

    def text_grammar(self) -> Grammar:
        """A turn that must not call (``tool_choice: "none"``): text not starting like a
        call."""
        return Grammar.regex(r"[^<{\s][\s\S]*") if self.name == HERMES else text_grammar()

    # ------------------------------------------------------------------ reading calls

    def starts_call(self, head: str) -> bool | None:
        """Whether a turn whose text begins with ``head`` is a call (None: not yet known,
        ``head`` is empty or, for ``hermes``, whitespace only)."""
        if self.name == HERMES:
            s = head.lstrip()
            return None if not s else s[0] in "<{"   # "{" when the marker is a skipped token
        return None if not head else head.startswith("{")

    def scanner(self) -> ToolCallScanner:
        return ToolCallScanner(self.args_key)

    def parse(self, text: str) -> list[tuple[str, object]] | None:
        """The ``(name, arguments)`` calls of a whole reply in this format (None: it is
        not a call or does not parse). The generic format's reader with its tolerance of
        code fences is :func:`slmkit.eval.function_calling.parse_calls`."""
        if self.name == HERMES:
            blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
        else:
            blocks = [text.strip()]
        out = []
        for block in blocks:
            try:
                obj, end = json.JSONDecoder().raw_decode(block)
            except json.JSONDecodeError:
                return None
            if not isinstance(obj, dict) or block[end:].strip():
                return None
            calls = obj.get("tool_calls") if not self.native else [obj]
            if not isinstance(calls, list) or not calls or not all(
                    isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
                return None
            out += [(c["name"], c.get(self.args_key)) for c in calls]
        return out or None


GENERIC = ToolFormat()

# --------------------------------------------------------------------------- detection

_PROBE = "slmkit_probe"
_PROBE_RESULT = "slmkit-probe-result-7f3a"
_PROBE_TOOL = {"type": "function", "function": {
    "name": _PROBE, "description": "Probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                   "required": ["x"]}}}
_NATIVE_CALL = {HERMES: OPEN + '\n{"name": "%s", "arguments": {"x": %d}}\n' + CLOSE,
                LLAMA3: '{"name": "%s", "parameters": {"x": %d}}'}
_cache: dict[str, tuple[str, bool]] = {}


def _probe_call(n: int) -> dict:
    return {"id": f"call_probe{n}", "type": "function",
            "function": {"name": _PROBE, "arguments": {"x": 7 + n}}}


def _detect(tokenizer) -> tuple[str, bool]:
    """(format name, parallel) of ``tokenizer``'s chat template, by rendering probes."""

    def render(messages, **kw) -> str:
        return tokenizer.apply_chat_template(messages, tools=[_PROBE_TOOL], tokenize=False,
                                             **kw)

    user = {"role": "user", "content": "Hi."}
    turn = {"role": "assistant", "content": "", "tool_calls": [_probe_call(0)]}
    result = {"role": "tool", "tool_call_id": "call_probe0", "name": _PROBE,
              "content": _PROBE_RESULT}
    try:
        prompt = render([user], add_generation_prompt=True)
        if _PROBE not in prompt:                   # the template ignores `tools`
            return GENERIC_NAME, True
        full = render([user, turn])
        after = render([user, turn, result], add_generation_prompt=True)
    except Exception:  # a template that cannot render tools or calls at all
        return GENERIC_NAME, True
    if not full.startswith(prompt) or not after.startswith(full.rstrip()) \
            or _PROBE_RESULT not in after:
        return GENERIC_NAME, True
    said = full[len(prompt):]
    for name, call in _NATIVE_CALL.items():
        if said.startswith(call % (_PROBE, 7)):
            break
    else:
        return GENERIC_NAME, True
    if name == LLAMA3:
        return name, False
    try:
        two = render([user, {**turn, "tool_calls": [_probe_call(0), _probe_call(1)]}])
    except Exception:
        return name, False
    return name, two[len(prompt):].startswith(call % (_PROBE, 7) + "\n" + call % (_PROBE, 8))


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def tool_format(tokenizer) -> ToolFormat:
    """The tool format of ``tokenizer``'s chat template (cached per template text)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return GENERIC
    if template not in _cache:
        _cache[template] = _detect(tokenizer)
    name, parallel = _cache[template]
    if name == HERMES:
        return ToolFormat(HERMES, "arguments", parallel, _single_token(tokenizer, OPEN),
                          _single_token(tokenizer, CLOSE))
    if name == LLAMA3:
        return ToolFormat(LLAMA3, "parameters", False)
    return GENERIC


# --------------------------------------------------------------------------- rendering

def tool_dicts(tools: list[Tool]) -> list[dict]:
    """Tools in the OpenAI shape chat templates take (``{"type": "function", ...}``)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]


def native_messages(messages: list[dict], fmt: ToolFormat) -> list[dict]:
    """OpenAI-format messages as a tool-aware template takes them: a call's arguments as
    an object (templates write ``arguments | tojson``), ``tool_calls`` only on a turn that
    has calls (Llama's template tests the key), a tool message with its call's ``name``.

    Raises:
        ToolFormatError: calls on a non-assistant turn, unparsable arguments, a tool
            message answering no earlier call, several calls in one turn of a format that
            carries one.
    """
    names: dict[str, str] = {}
    out = []
    for i, m in enumerate(messages):
        role, text = m["role"], m.get("content") or ""
        role = "system" if role == "developer" else role
        if m.get("tool_calls"):
            if role != "assistant":
                raise ToolFormatError(f"messages.{i}.tool_calls", "only assistant messages "
                                      "carry tool calls")
            if len(m["tool_calls"]) > 1 and not fmt.parallel:
                raise ToolFormatError(f"messages.{i}.tool_calls", f"this model's chat "
                                      f"template ({fmt.name} calls) shows one call per "
                                      "assistant turn; give each call its own turn")
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                name, arguments = _call_arguments(call, f"messages.{i}.tool_calls.{j}")
                call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
                names[call_id] = name
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": name, "arguments": arguments}})
            out.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in names:
                raise ToolFormatError(f"messages.{i}.tool_call_id", "a tool message must "
                                      "answer a call of an earlier assistant message (give "
                                      "that call's id)")
            out.append({"role": "tool", "content": text, "tool_call_id": call_id,
                        "name": names[call_id]})
        else:
            out.append({"role": role, "content": text})
    return out


def render_chat(tokenizer, messages: list[dict], tools: list[Tool] | None = None,
                required: bool = False,
                fmt: ToolFormat | None = None) -> tuple[list[dict], dict]:
    """OpenAI-format ``messages`` (and the ``tools`` the turn may call) ->
    ``(template messages, apply_chat_template keyword arguments)``, in ``tokenizer``'s own
    tool format when it has one (``{"tools": [...]}`` then goes to the template), else
    in the generic format (:func:`slmkit.engine.tools.render_conversation`).

    The one renderer of the server, fine-tuning and the function-calling eval."""
    fmt = fmt or tool_format(tokenizer)
    if not fmt.native:
        return render_conversation(tokenizer, messages, tools, required), {}
    return native_messages(messages, fmt), ({"tools": tool_dicts(tools)} if tools else {})
