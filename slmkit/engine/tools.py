"""Tool calling for chat models whose template has no tool syntax (a documented generic format).

(Templates that do know tools, such as Qwen2.5's and Llama 3.2's, are used in their own
format instead: :mod:`slmkit.engine.tool_formats` finds which one a template has.)

SmolLM2's chat template (and many small models') knows nothing of tools, so slmkit
describes them in the system prompt and lets a grammar hold the model to one answer shape:

* the system prompt lists the tools (name, description, JSON-schema parameters) and says
  how to call them: reply with only ::

      {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}

* ``tool_choice="required"`` (or a named function): the output must be that object, the
  names limited to the allowed tools and each call's ``arguments`` valid under that
  tool's parameters schema (one call unless parallel calls are allowed);
* ``tool_choice="auto"``: a union grammar, *plain text* (which may not start with ``{``)
  **or** the call object; the model's first token decides;
* ``tool_choice="none"``: plain text only (not starting with ``{``): SmolLM2-135M, shown
  calls in the history and no grammar, wrote a call out as text instead of answering;
* history: an assistant turn that called tools is replayed as that same JSON, and a
  ``tool`` message stays a ``tool`` turn reading ``<name>: <content>`` when the template
  shows that role (SmolLM2's prints any role; Qwen's and Llama's know ``tool``), else it
  becomes a user turn ``Result of <name> (<call id>): <content>``. With SmolLM2-135M the
  ``tool`` turn is what makes the model answer from the result; as a user turn it called
  the same tool again.

:class:`ToolCallScanner` reads the generated text incrementally (the grammar fixes the
layout: ``", "`` and ``": "`` separators, ``name`` before ``arguments``), so a server can
stream each call's name and then its arguments text as it is generated; the arguments
string of a call is exactly the JSON text the model wrote.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from slmkit.engine.grammar import JSON_STYLE, Grammar

KEY = "tool_calls"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class Tool:
    """One callable function: ``name``, ``description`` and its JSON-schema ``parameters``."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: dict(EMPTY_PARAMETERS))


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")


def closed(schema):
    """A copy of ``schema`` where every object schema that lists ``properties`` and says
    nothing about other keys (no ``additionalProperties``, ``patternProperties`` or
    ``unevaluatedProperties``) allows no other keys.

    Tool parameters are a function's signature: under plain JSON-schema defaults a small
    model fills a call with keys the function does not take (SmolLM2-135M wrote
    ``"type"``, ``"properties"`` and ``"description"`` into ``get_weather``'s arguments),
    which the function then rejects. A schema that sets ``additionalProperties`` keeps its
    choice. (``response_format`` schemas are enforced as written.)"""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(v) for k, v in out[key].items()}
    for key in (*_SUBSCHEMA_LISTS, "items", "additionalProperties", "not", "if", "then",
                "else", "contains"):
        if isinstance(out.get(key), (dict, list)):
            out[key] = closed(out[key])
    if isinstance(out.get("properties"), dict) and not any(
            k in out for k in ("additionalProperties", "patternProperties",
                               "unevaluatedProperties")):
        out["additionalProperties"] = False
    return out


def call_schema(tools: list[Tool], parallel: bool = True) -> dict:
    """The JSON schema of a reply that calls one (or, if ``parallel``, several) tools
    (their parameters :func:`closed`)."""
    options = [{"type": "object",
                "properties": {"name": {"const": t.name}, "arguments": closed(t.parameters)},
                "required": ["name", "arguments"], "additionalProperties": False}
               for t in tools]
    calls = {"type": "array", "items": options[0] if len(options) == 1 else {"anyOf": options},
             "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    return {"type": "object", "properties": {KEY: calls}, "required": [KEY],
            "additionalProperties": False}


#: Plain text, told apart from a call by its first character.
TEXT = r"[^{][\s\S]*"


def tool_grammar(tools: list[Tool], required: bool, parallel: bool = True) -> Grammar:
    """The grammar for a turn that may (``required=False``) or must call ``tools``."""
    schema = call_schema(tools, parallel)
    if required:
        return Grammar.json_schema(schema)
    embedded = json.dumps({**schema, "x-guidance": JSON_STYLE})
    return Grammar.lark(f"start: TEXT | call\nTEXT: /{TEXT}/\ncall: %json " + embedded)


def text_grammar() -> Grammar:
    """A turn that must not call (``tool_choice="none"``): plain text not starting with
    ``{``, so a model that saw calls in the history cannot write one out as text."""
    return Grammar.regex(TEXT)


def system_prompt(tools: list[Tool], required: bool) -> str:
    """The text that tells the model which tools it has and how to call them."""
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description,
                                    "parameters": t.parameters}, ensure_ascii=False)
                        for t in tools)
    when = ("You must call a tool now." if required else
            "Call a tool when it helps answer; otherwise answer in plain text.")
    return (f"You can call these tools:\n{listing}\n"
            f"To call tools, reply with only this JSON: {{\"{KEY}\": [{{\"name\": "
            f"\"<tool name>\", \"arguments\": {{<arguments>}}}}]}}\n{when} When a tool "
            "result is given, use it to answer the user in plain text.")


def render_calls(calls: list[tuple[str, dict]]) -> str:
    """Past calls (``(name, arguments)`` pairs) as the model's own JSON reply."""
    return json.dumps({KEY: [{"name": n, "arguments": a} for n, a in calls]},
                      ensure_ascii=False, separators=(", ", ": "))


def render_result(name: str, call_id: str, content: str, own_role: bool = True) -> str:
    """A tool's result as the model reads it: ``name: content`` in a ``tool`` turn, or a
    user turn that names the call when the chat template cannot show a ``tool`` role."""
    return f"{name}: {content}" if own_role else f"Result of {name} ({call_id}): {content}"


def _header(args_key: str) -> re.Pattern:
    return re.compile(r'\{"name": "([A-Za-z0-9_-]+)", "' + re.escape(args_key) + '": ')


@dataclass
class CallDelta:
    """New output of call ``index``: its ``name`` (first delta only) and more arguments text."""

    index: int
    name: str | None
    arguments: str


class ToolCallScanner:
    """Incremental reader of ``{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}``.

    :meth:`feed` takes text deltas and returns :class:`CallDelta`\\ s: a call is announced
    once its name is complete, then its arguments text follows as it arrives.
    :attr:`calls` holds ``[name, arguments_text]`` per call, :attr:`complete` says whether
    the last call's arguments closed. ``args_key``: the key of a call's arguments
    (``parameters`` in Llama 3's own format, :mod:`slmkit.engine.tool_formats`); a call
    object found anywhere after the last one is read, so the same scanner reads calls
    wrapped in ``<tool_call>`` blocks.
    """

    def __init__(self, args_key: str = "arguments"):
        self._header = _header(args_key)
        self.text = ""
        self.calls: list[list[str]] = []
        self._pos = 0
        self._in_args = False
        self._depth = 0
        self._in_string = self._escape = False

    @property
    def complete(self) -> bool:
        return bool(self.calls) and not self._in_args

    def feed(self, delta: str) -> list[CallDelta]:
        self.text += delta
        out: list[CallDelta] = []
        while self._pos < len(self.text):
            if not self._in_args:
                m = self._header.search(self.text, self._pos)
                if m is None:
                    break
                self.calls.append([m.group(1), ""])
                out.append(CallDelta(len(self.calls) - 1, m.group(1), ""))
                self._pos, self._in_args, self._depth = m.end(), True, 0
                continue
            start = self._pos
            while self._pos < len(self.text) and self._in_args:
                self._step(self.text[self._pos])
                self._pos += 1
            piece = self.text[start:self._pos]
            self.calls[-1][1] += piece
            if out and out[-1].index == len(self.calls) - 1:
                out[-1].arguments += piece
            else:
                out.append(CallDelta(len(self.calls) - 1, None, piece))
        return out

    def _step(self, ch: str) -> None:
        """Track JSON nesting of the arguments object, one character at a time."""
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                self._in_args = self._depth > 0
            return
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            self._in_args = self._depth > 0


# --------------------------------------------------------------------------- conversations

class ToolFormatError(ValueError):
    """A conversation the generic format cannot render; ``param`` names the field
    (``messages.3.tool_call_id``) so the server can answer a 400 and a data file a line."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def parse_tools(specs: list, param: str = "tools") -> list[Tool]:
    """OpenAI tool definitions (``{"type": "function", "function": {"name", "description",
    "parameters"}}`` dicts) as :class:`Tool`\\ s, or :class:`ToolFormatError` naming the
    bad one (a missing or bad name, a repeated name, parameters that are not an object
    schema)."""
    if not isinstance(specs, list) or not specs:
        raise ToolFormatError(param, "give a non-empty list of tools")
    tools, seen = [], set()
    for i, spec in enumerate(specs):
        where = f"{param}.{i}"
        f = spec.get("function") if isinstance(spec, dict) else None
        if not isinstance(f, dict) or spec.get("type", "function") != "function":
            raise ToolFormatError(where, 'write each tool as {"type": "function", '
                                  '"function": {"name": ..., "parameters": {...}}}')
        name = f.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolFormatError(f"{where}.function.name", "use 1-64 letters, digits, '_' "
                                  "or '-'")
        if name in seen:
            raise ToolFormatError(f"{where}.function.name", f"the tool '{name}' is listed "
                                  "twice")
        seen.add(name)
        parameters = f.get("parameters")
        parameters = dict(EMPTY_PARAMETERS) if parameters is None else parameters
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolFormatError(f"{where}.function.parameters", "a function's parameters "
                                  'must be an object schema ({"type": "object", '
                                  '"properties": {...}})')
        description = f.get("description") or ""
        if not isinstance(description, str):
            raise ToolFormatError(f"{where}.function.description", "make it a string")
        tools.append(Tool(name, description, {"type": "object", **parameters}))
    return tools


def _call_arguments(call, where: str) -> tuple[str, dict]:
    """``(name, arguments)`` of one OpenAI tool call dict (arguments: a JSON string or,
    as many datasets write them, an object)."""
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise ToolFormatError(where, 'write each call as {"id": ..., "type": "function", '
                              '"function": {"name": ..., "arguments": "{...}"}}')
    arguments = f.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        raise ToolFormatError(f"{where}.function.arguments", "must be a JSON object in a "
                              "string")
    return f["name"], arguments


def conversation(messages: list[dict], tools: list[Tool] | None = None,
                 required: bool = False, tool_role: bool = True) -> list[dict[str, str]]:
    """OpenAI-format messages -> the ``[{"role", "content"}]`` list a chat template takes.

    The one renderer of the generic format, used by the server (requests) and by
    fine-tuning (``tools.jsonl`` rows), so a model is trained on exactly the prompts it is
    served with. ``messages`` are dicts with ``role``, ``content`` (a string or None),
    an assistant's ``tool_calls`` and a tool message's ``tool_call_id``; ``developer``
    becomes ``system``. With ``tools`` their description (:func:`system_prompt`) is
    appended to the system message or put first. ``tool_role=False`` turns tool
    messages into user turns that name the call (templates that cannot show ``tool``).

    Raises:
        ToolFormatError: tool calls on a non-assistant message, unparsable arguments, a
            tool message whose ``tool_call_id`` no earlier call has.
    """
    names: dict[str, str] = {}  # tool call id -> function name
    out = []
    for i, m in enumerate(messages):
        role, text = m["role"], m.get("content") or ""
        role = "system" if role == "developer" else role
        if m.get("tool_calls") and role != "assistant":
            raise ToolFormatError(f"messages.{i}.tool_calls", "only assistant messages carry "
                                  "tool calls")
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                calls.append(_call_arguments(call, f"messages.{i}.tool_calls.{j}"))
                if isinstance(call.get("id"), str):
                    names[call["id"]] = calls[-1][0]
            text = (text + "\n" if text else "") + render_calls(calls)
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in names:
                raise ToolFormatError(f"messages.{i}.tool_call_id", "a tool message must "
                                      "answer a call of an earlier assistant message (give "
                                      "that call's id)")
            role = "tool" if tool_role else "user"
            text = render_result(names[call_id], call_id, text, tool_role)
        out.append({"role": role, "content": text})
    if tools:
        prompt = system_prompt(tools, required)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def renders_tool_role(tokenizer, messages: list[dict[str, str]]) -> bool:
    """Whether ``tokenizer``'s chat template shows ``tool`` messages of a rendered
    conversation (else :func:`conversation` is asked for user turns instead)."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    except Exception:  # a template that raises on roles it does not know
        return False
    return all(m["content"] in text for m in messages if m["role"] == "tool")


def render_conversation(tokenizer, messages: list[dict], tools: list[Tool] | None = None,
                        required: bool = False) -> list[dict[str, str]]:
    """:func:`conversation` with the tool-role choice made for ``tokenizer``'s template."""
    out = conversation(messages, tools, required)
    if any(m["role"] == "tool" for m in out) and not renders_tool_role(tokenizer, out):
        out = conversation(messages, tools, required, tool_role=False)
    return out
