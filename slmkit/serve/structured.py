"""What a request says its answer must be: ``response_format`` and ``tools`` -> a grammar.

:func:`output_plan` checks those fields (every problem a 400 naming the field) and returns
an :class:`OutputPlan`: the grammar the engine enforces and, for a tool turn, the tools
the answer may call, in the served model's tool format (:mod:`slmkit.engine.tool_formats`:
the chat template's own syntax, e.g. Qwen2.5's ``<tool_call>`` blocks or Llama 3.2's JSON
calls, else the generic format of :mod:`slmkit.engine.tools`). :func:`chat_messages`
turns OpenAI messages, including assistant ``tool_calls`` and ``tool`` results, into what
the chat template takes in that format. :class:`ToolCallReader` turns the generated text
back into OpenAI ``tool_calls``, whole or as stream deltas. With ``tools`` and
``tool_choice: "none"`` the answer is plain text that does not start like a call (a small
model that saw calls in the history otherwise writes one out as text).

What is refused (400): ``response_format`` together with tools the model may call (an
answer is either a call or schema-bound text; say ``tool_choice: "none"`` to get the
schema), schema keywords the grammar cannot enforce (named), tool names outside
``[A-Za-z0-9_-]{1,64}`` or repeated, parameters that are not an object schema,
``tool_choice`` or ``parallel_tool_calls`` without ``tools``, a named tool that is not
in ``tools``, a ``tool`` message whose ``tool_call_id`` no earlier call has, and several
calls in one history turn of a format that carries one (Llama 3).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from slmkit.engine.grammar import Grammar, GrammarError, check
from slmkit.engine.tool_formats import GENERIC, ToolFormat, render_chat
from slmkit.engine.tools import NAME_RE, CallDelta, Tool, ToolFormatError
from slmkit.serve.protocol import APIError, ChatRequest, CompletionRequest


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"Invalid '{param}': {message}.", param=param)


@dataclass
class OutputPlan:
    """The grammar for a request's answer and, for a tool turn, the tools it may call.

    A tool turn's grammar depends on how the served model writes calls
    (:mod:`slmkit.engine.tool_formats`): :func:`output_plan` builds it for the generic
    format, and the service re-binds the plan to its model's own format
    (:meth:`bind`)."""

    grammar: Grammar | None = None
    tools: list[Tool] | None = None
    required: bool = False
    parallel: bool = True
    #: tools were given with ``tool_choice: "none"``: text that does not start like a call
    no_call: bool = False
    format: ToolFormat = GENERIC
    #: the grammar ``response_format`` asks for (kept to re-bind)
    response: Grammar | None = None

    def bind(self, fmt: ToolFormat) -> OutputPlan:
        """Set the grammar for a model whose template writes calls in ``fmt`` (400 naming
        ``tools`` when that grammar cannot be compiled). Returns ``self``."""
        if self.tools:
            self.grammar = _checked(fmt.grammar(self.tools, self.required, self.parallel),
                                    "tools")
        elif self.no_call:
            self.grammar = self.response or fmt.text_grammar()
        self.format = fmt
        return self


def _checked(grammar: Grammar, param: str) -> Grammar:
    try:
        check(grammar)
    except GrammarError as e:
        raise APIError(400, f"Invalid '{param}': {e}", param=param,
                       code="unsupported_schema") from None
    return grammar


def response_grammar(req: CompletionRequest | ChatRequest) -> Grammar | None:
    """The grammar ``response_format`` asks for (None for text)."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        if rf is not None and rf.json_schema is not None:
            raise _bad("response_format.json_schema", "only goes with type 'json_schema'")
        return None
    if rf.type == "json_object":
        return Grammar.json_object()
    spec = rf.json_schema
    if spec is None:
        raise _bad("response_format.json_schema", "type 'json_schema' needs a json_schema "
                   "object with 'name' and 'schema'")
    if not NAME_RE.match(spec.name):
        raise _bad("response_format.json_schema.name", "use 1-64 letters, digits, '_' or '-'")
    if spec.json_schema is None:
        raise _bad("response_format.json_schema.schema", "give the JSON schema the answer "
                   "must follow")
    return _checked(Grammar.json_schema(spec.json_schema), "response_format.json_schema.schema")


def _tools(req: ChatRequest) -> list[Tool]:
    if not req.tools:
        raise _bad("tools", "send at least one tool, or leave 'tools' out")
    tools, seen = [], set()
    for i, t in enumerate(req.tools):
        f, param = t.function, f"tools.{i}.function"
        if not NAME_RE.match(f.name):
            raise _bad(f"{param}.name", "use 1-64 letters, digits, '_' or '-'")
        if f.name in seen:
            raise _bad(f"{param}.name", f"the tool '{f.name}' is listed twice")
        seen.add(f.name)
        parameters = f.parameters if f.parameters is not None else \
            {"type": "object", "properties": {}}
        if parameters.get("type", "object") != "object":
            raise _bad(f"{param}.parameters", "a function's parameters must be an object "
                       "schema ({\"type\": \"object\", \"properties\": {...}})")
        parameters = {"type": "object", **parameters}
        _checked(Grammar.json_schema(parameters), f"{param}.parameters")
        tools.append(Tool(f.name, f.description or "", parameters))
    return tools


def output_plan(req: CompletionRequest | ChatRequest, fmt: ToolFormat = GENERIC) -> OutputPlan:
    """Check ``response_format``, ``tools``, ``tool_choice`` and ``parallel_tool_calls``;
    the plan's grammar is for a model writing calls in ``fmt`` (see :meth:`OutputPlan.bind`).

    Raises:
        APIError: 400 naming the field that cannot be honoured.
    """
    grammar = response_grammar(req)
    if not isinstance(req, ChatRequest) or req.tools is None:
        if isinstance(req, ChatRequest):
            for name in ("tool_choice", "parallel_tool_calls"):
                if getattr(req, name) is not None:
                    raise _bad(name, "it needs 'tools'")
        return OutputPlan(grammar)
    tools = _tools(req)
    choice = req.tool_choice or "auto"
    if choice == "none":
        return OutputPlan(grammar, no_call=True, response=grammar).bind(fmt)
    if grammar is not None:
        raise _bad("response_format", "a JSON response format cannot be combined with tools "
                   "the model may call; send tool_choice 'none' for a JSON answer, or drop "
                   "response_format")
    required = choice != "auto"
    if not isinstance(choice, str):
        tools = [t for t in tools if t.name == choice.function.name]
        if not tools:
            raise _bad("tool_choice.function.name", f"'{choice.function.name}' is not one "
                       "of the 'tools'")
    # a named function is one call, as OpenAI's tool_choice {"type": "function", ...} means
    parallel = req.parallel_tool_calls is not False and isinstance(choice, str)
    return OutputPlan(tools=tools, required=required, parallel=parallel).bind(fmt)


def chat_messages(req: ChatRequest, plan: OutputPlan, tokenizer) -> tuple[list[dict], dict]:
    """The conversation and keyword arguments for ``tokenizer.apply_chat_template``, in
    the plan's tool format (:func:`slmkit.engine.tool_formats.render_chat`, the renderer
    fine-tuning and the function-calling eval use too)."""
    messages = [{"role": m.role, "content": m.text(), "tool_call_id": m.tool_call_id,
                 "tool_calls": [c.model_dump() for c in m.tool_calls or []]}
                for m in req.messages]
    try:
        return render_chat(tokenizer, messages, plan.tools, plan.required, plan.format)
    except ToolFormatError as e:
        raise _bad(e.param, str(e)) from None


class ToolCallReader:
    """Generated text -> OpenAI ``tool_calls`` (for a turn whose plan has tools).

    A turn is a call when its text starts like one in the model's tool format ``fmt``
    (``{``, or ``<tool_call>`` in the hermes format; the grammar allows plain text only
    when it starts otherwise). :meth:`feed` returns ``(content_delta, tool_call_deltas)``
    where each tool-call delta is already in OpenAI's streaming shape.
    """

    def __init__(self, fmt: ToolFormat = GENERIC):
        self.format = fmt
        self.scanner = fmt.scanner()
        self.is_call: bool | None = None
        self.ids: list[str] = []
        self._head = ""

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if self.is_call is None:
            self._head += text
            self.is_call = self.format.starts_call(self._head)
            if self.is_call is None:
                return "", []
            text, self._head = self._head, ""
        if not self.is_call:
            return text, []
        return "", [self._delta(d) for d in self.scanner.feed(text)]

    def _delta(self, d: CallDelta) -> dict:
        if d.name is None:
            return {"index": d.index, "function": {"arguments": d.arguments}}
        self.ids.append(f"call_{secrets.token_hex(12)}")
        return {"index": d.index, "id": self.ids[d.index], "type": "function",
                "function": {"name": d.name, "arguments": d.arguments}}

    @property
    def complete(self) -> bool:
        """The text is a call object whose every call has closed its arguments."""
        return bool(self.is_call) and self.scanner.complete

    def tool_calls(self) -> list[dict]:
        """The calls whose arguments closed, in the non-streaming ``message.tool_calls``
        shape (a call cut off by ``max_tokens`` is left out)."""
        done = self.scanner.calls if self.scanner.complete else self.scanner.calls[:-1]
        return [{"id": self.ids[i], "type": "function",
                 "function": {"name": name, "arguments": arguments}}
                for i, (name, arguments) in enumerate(done)]
