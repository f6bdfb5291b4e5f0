"""An async client of the bigger model: any OpenAI-compatible server, with retries.

:class:`FallbackClient` posts a request body to ``{base}/chat/completions`` or
``{base}/completions`` of the fallback (another ``slm serve``, llama.cpp's server, Ollama,
a cloud API) and gives back the JSON answer, or an open SSE stream.

Faults are retried with exponential backoff (0.25 s, 0.5 s, 1 s, ...; a ``Retry-After``
is honoured) when nothing was answered yet: a connection error, a read timeout, 429 or a
5xx. A 4xx other than 429 is the fallback refusing this request: it is not retried. Every
try shares one deadline; past it, or after the last retry, :class:`FallbackError` says why
and the server answers with the local model instead. Once a stream has started sending
to the client it is never retried (the client would see the answer twice).

The API key is sent as ``Authorization: Bearer``; it is never logged, and neither
``repr`` nor any error message holds it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx

RETRY_STATUS = {429, 500, 502, 503, 504}


class FallbackError(Exception):
    """The fallback did not answer (``reason``: one short sentence, no secrets)."""


def base_url(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` -> the ``/v1`` base."""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class FallbackClient:
    """The bigger model's endpoint.

    Args:
        url: its base URL (``/v1`` is appended when missing).
        model: the model id to send (None: the first one its ``/v1/models`` lists).
        api_key: sent as a Bearer token.
        retries: tries after the first one, for faults that allow it.
        backoff: seconds before the first retry (doubling each time).
    """

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 retries: int = 2, backoff: float = 0.25):
        self.base = base_url(url)
        self.model, self.retries, self.backoff = model, retries, backoff
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=self._headers, timeout=None)

    def __repr__(self) -> str:
        return f"FallbackClient({self.base!r}, model={self.model!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def model_name(self, deadline: float) -> str:
        """The model id to send; asked from ``/v1/models`` once when not configured."""
        if self.model is None:
            body = await self._json(await self._send("GET", "/models", None, deadline))
            try:
                self.model = str(body["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise FallbackError("the fallback's /v1/models lists no model; pass "
                                    "--fallback-model") from None
        return self.model

    async def _send(self, method: str, path: str, body: dict | None, deadline: float,
                    stream: bool = False) -> httpx.Response:
        """One request with retries; a 200 response (streaming: headers read, body open)."""
        last = "no try was made"
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                request = self._client.build_request(
                    method, self.base + path, json=body,
                    timeout=httpx.Timeout(remaining, connect=min(remaining, 5.0)))
                response = await asyncio.wait_for(self._client.send(request, stream=stream),
                                                  remaining)
            except (httpx.HTTPError, asyncio.TimeoutError) as e:
                last = f"{type(e).__name__} talking to {self.base}"
                wait = self.backoff * 2 ** attempt
            else:
                if response.status_code == 200:
                    return response
                text = (await response.aread()).decode("utf-8", "replace")[:300]
                await response.aclose()
                last = f"HTTP {response.status_code} from {self.base}: {text}"
                if response.status_code not in RETRY_STATUS:
                    raise FallbackError(last)
                wait = self.backoff * 2 ** attempt
                after = response.headers.get("retry-after", "")
                if after.isdigit():
                    wait = max(wait, float(after))
            if attempt < self.retries:
                await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
        raise FallbackError(f"{last} (after {self.retries + 1} tries or the "
                            "fallback deadline)")

    @staticmethod
    async def _json(response: httpx.Response) -> dict:
        try:
            return json.loads(await response.aread())
        except (ValueError, httpx.HTTPError) as e:
            raise FallbackError(f"the fallback's answer is not JSON ({type(e).__name__})") \
                from None
        finally:
            await response.aclose()

    async def complete(self, path: str, body: dict, deadline: float) -> dict:
        """POST a non-streaming request; its JSON answer."""
        response = await self._send("POST", path, body, deadline)
        try:
            return await asyncio.wait_for(self._json(response),
                                          max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise FallbackError("the fallback's answer did not arrive before the deadline") \
                from None

    async def stream(self, path: str, body: dict, deadline: float) -> Stream:
        """POST a streaming request; an open :class:`Stream` (its headers said 200)."""
        return Stream(await self._send("POST", path, body, deadline, stream=True))


class Stream:
    """The fallback's SSE answer, read as ``data:`` payloads (``"[DONE]"`` included)."""

    def __init__(self, response: httpx.Response):
        self.response = response

    async def events(self, idle_timeout: float) -> AsyncIterator[str]:
        """Each ``data:`` payload; raises :class:`FallbackError` when the connection breaks
        or no line comes for ``idle_timeout`` seconds."""
        lines = self.response.aiter_lines()
        try:
            while True:
                try:
                    line = await asyncio.wait_for(anext(lines), idle_timeout)
                except StopAsyncIteration:
                    return
                except (httpx.HTTPError, asyncio.TimeoutError) as e:
                    raise FallbackError(f"the fallback's stream broke ({type(e).__name__})") \
                        from None
                if line.startswith("data:"):
                    yield line[5:].strip()
        finally:
            await self.response.aclose()
