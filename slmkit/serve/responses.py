"""OpenAI response objects: full responses, stream chunks, SSE frames, logprobs.

Shapes follow the OpenAI API reference (``chat.completion``, ``chat.completion.chunk``,
``text_completion``). A chat stream is::

    data: {"id":...,"object":"chat.completion.chunk",...,"choices":[{"index":0,
           "delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}
    data: {... "delta":{"content":"Hel"} ...}           (one per text delta)
    data: {... "delta":{},"finish_reason":"stop"}        (last choice chunk)
    data: {... "choices":[],"usage":{...}}               (only with include_usage)
    data: [DONE]

every frame being ``data: <compact JSON>\\n\\n``.
"""

from __future__ import annotations

import json
import time
from typing import Any

#: Engine finish reasons -> OpenAI's (a cancelled request has no client left to read it).
#: A turn that ends in complete tool calls reports ``"tool_calls"`` instead of ``"stop"``.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "error"}


def sse(obj: Any) -> bytes:
    """One server-sent event frame (``[DONE]`` passes through as the literal string)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False,
                                                       separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class LogprobFormatter:
    """Turns the engine's ``(token_id, logprob, top_logprobs)`` into OpenAI's layouts.

    Args:
        tokenizer: decodes each token id on its own (the token's text; a partial UTF-8
            character decodes to U+FFFD, and ``bytes`` then carries the UTF-8 of that).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
            self._cache[token_id] = text
        return text

    def chat_entry(self, token_id: int, logprob: float,
                   top: list[tuple[int, float]] | None) -> dict[str, Any]:
        """One element of ``choices[0].logprobs.content`` (chat)."""
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": self.token(t), "logprob": lp,
                                  "bytes": list(self.token(t).encode())}
                                 for t, lp in (top or [])]}

    def completion_block(self, entries: list[tuple[int, float, list | None]],
                         offset: int) -> dict[str, Any]:
        """``choices[0].logprobs`` of a text completion for ``entries`` starting at ``offset``
        characters into the generated text."""
        block: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
        for token_id, logprob, top in entries:
            text = self.token(token_id)
            block["tokens"].append(text)
            block["token_logprobs"].append(logprob)
            alternatives: dict[str, float] = {}
            for t, lp in top or []:  # ids that decode alike (partial UTF-8) keep the best
                alternatives.setdefault(self.token(t), lp)
            block["top_logprobs"].append(alternatives)
            block["text_offset"].append(offset)
            offset += len(text)
        return block


def chat_response(rid: str, created: int, model: str, text: str, finish: str,
                  logprobs: list[dict] | None, use: dict[str, int],
                  tool_calls: list[dict] | None = None) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` (``tool_calls``: the message calls tools and
    has no text content)."""
    message = {"role": "assistant", "content": text} if tool_calls is None else \
        {"role": "assistant", "content": None, "tool_calls": tool_calls}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": None if logprobs is None else {"content": logprobs},
                         "finish_reason": finish}],
            "usage": use, "system_fingerprint": None}


def completion_response(rid: str, created: int, model: str, text: str, finish: str,
                        logprobs: dict | None, use: dict[str, int]) -> dict[str, Any]:
    """A non-streaming ``text_completion``."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                         "finish_reason": finish}],
            "usage": use, "system_fingerprint": None}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None,
               logprobs: list[dict] | None = None, with_usage: bool = False) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a single choice."""
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None,
             "choices": [{"index": 0, "delta": delta,
                          "logprobs": None if logprobs is None else {"content": logprobs},
                          "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion_chunk(rid: str, created: int, model: str, text: str,
                     finish: str | None = None, logprobs: dict | None = None,
                     with_usage: bool = False) -> dict[str, Any]:
    """One streamed ``text_completion`` object with a single choice."""
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": None,
             "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                          "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str,
                use: dict[str, int]) -> dict[str, Any]:
    """The final ``stream_options.include_usage`` chunk: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": use}


def now() -> int:
    return int(time.time())
