"""The OpenAI request schema, its validation, and OpenAI-style errors.

Requests are parsed from raw bytes here (not by FastAPI) so that every bad input gets
the same error shape OpenAI uses::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": null}}

Types are strict (``"max_tokens": "5"`` is rejected, as OpenAI does); unknown fields are
ignored so that clients sending newer fields keep working. Besides OpenAI's fields we
accept the common local-server extensions ``top_k``, ``min_p``, ``repetition_penalty`` and
``ignore_eos``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: OpenAI allows 20 top logprobs for chat and 5 for completions; we allow 20 for both.
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answered as OpenAI-style JSON (the server keeps serving).

    Args:
        status: HTTP status (400, 401, 404, 429, 504, ...).
        message: one sentence naming the input and the fix.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, if any.
        code: a short machine-readable code (e.g. ``model_not_found``).
        headers: extra response headers (``Retry-After`` for 429).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    """``response_format.json_schema``: a named schema the answer must validate against."""

    name: str
    json_schema: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: free text, any JSON object, or JSON under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _SamplingFields(_Strict):
    """Fields shared by both generation endpoints."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # local-server extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string, a list with one string, or token ids."""

    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    """One entry of ``tools``: a function with JSON-schema parameters."""

    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    """A call in an earlier assistant turn (``messages[i].tool_calls``)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class EmbeddingRequest(_Strict):
    """``POST /v1/embeddings``: one text or several, as strings or token ids."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None


#: Request fields that change what a valid answer is and that an endpoint does not
#: implement: refused with a 400 naming them, never silently ignored. ``functions`` and
#: ``function_call`` are OpenAI's deprecated forms of ``tools`` and ``tool_choice``.
UNSUPPORTED = {"functions": "use 'tools' instead", "function_call": "use 'tool_choice' instead",
               "tools": "tools need /v1/chat/completions",
               "tool_choice": "tools need /v1/chat/completions",
               "parallel_tool_calls": "tools need /v1/chat/completions"}


def parse_request(raw: bytes, schema: type[_Strict]) -> Any:
    """Parse and validate a JSON request body.

    Raises:
        APIError: 400 for malformed or too deeply nested JSON, a non-object body, a missing
            field or a value of the wrong type (``param`` names the field).
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON ({getattr(e, 'msg', e)}); "
                       "send a JSON object.", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "The request body nests JSON arrays or objects too deeply; send "
                       "the flat JSON object the API documents.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object, not "
                       f"{type(data).__name__}.", code="invalid_json")
    for key, fix in UNSUPPORTED.items():
        if data.get(key) is not None and key not in schema.model_fields:
            raise APIError(400, f"'{key}' is not supported here (it would change what the "
                           f"answer must be, so it is refused rather than ignored); {fix}.",
                           param=key, code="unsupported_parameter")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # loc mixes field names, list indices and union-member tags ("str", "list[int]")
        loc = [str(p) for p in err["loc"] if isinstance(p, int) or p in _FIELD_NAMES]
        param = ".".join(loc) or None
        value = "a required field is missing" if err["type"] == "missing" else err["msg"]
        raise APIError(400, f"Invalid '{param}': {value}.", param=param,
                       code="invalid_type" if err["type"] != "missing" else "missing_field") \
            from None


_FIELD_NAMES = {name for model in (CompletionRequest, ChatRequest, ChatMessage, TextPart,
                                   StreamOptions, ResponseFormat, JSONSchemaFormat, Tool,
                                   FunctionDef, NamedToolChoice, FunctionName, ToolCall,
                                   FunctionCall, EmbeddingRequest)
               for name in model.model_fields} | {"schema"}


def check_common(req: _SamplingFields) -> None:
    """Range checks that do not depend on the model (OpenAI's limits).

    Raises:
        APIError: 400 naming the field.
    """
    def bad(param: str, message: str) -> APIError:
        return APIError(400, f"Invalid '{param}': {message}.", param=param)

    if req.n not in (None, 1):
        raise bad("n", "this server generates one choice per request; use n=1")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise bad("temperature", f"{req.temperature} is outside [0, 2]")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad("top_p", f"{req.top_p} is outside (0, 1]")
    if req.top_k is not None and req.top_k < 0:
        raise bad("top_k", "must be >= 0 (0 turns it off)")
    if req.min_p is not None and not 0 <= req.min_p < 1:
        raise bad("min_p", "must be in [0, 1)")
    if req.repetition_penalty is not None and req.repetition_penalty <= 0:
        raise bad("repetition_penalty", "must be > 0 (1 turns it off)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad(name, "is not supported by this server; leave it at 0 or use "
                      "repetition_penalty")
    stops = stop_list(req.stop)
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise bad("stop", f"give at most {MAX_STOP_STRINGS} non-empty strings")
    if req.seed is not None and not -(2 ** 63) <= req.seed < 2 ** 64:
        raise bad("seed", "must fit in 64 bits")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
