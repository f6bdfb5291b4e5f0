"""A replica's life behind a load balancer: ready, draining, stopped.

``slm serve`` replicas are interchangeable: each request carries everything it needs (the
API key is checked against the key every replica is given; generation state lives only as
long as its request), so a balancer may send any request to any replica and retry one
that a replica refused.

The states a balancer sees on ``GET /health``:

* **ready** -- 200 ``{"status": "ok", ...}`` once the model is loaded and the port is open
  (before that the port is closed, which a balancer treats as down);
* **draining** -- 503 ``{"status": "draining", "in_flight": n}`` from SIGTERM on. For
  ``--drain-seconds`` the replica keeps its port open so health checks can see this, and
  answers every new ``POST /v1/...`` with 503 + ``Retry-After`` and ``Connection: close``
  before reading it (the balancer retries it on another replica; nothing was generated),
  while the streams it already runs go on;
* **stopped** -- then it stops listening, gives in-flight streams ``--shutdown-timeout``
  seconds to finish (the rest end with an error frame) and exits 0.

:class:`DrainGate` is the outermost ASGI layer, so a draining replica refuses work before
auth, parsing or the engine see it.
"""

from __future__ import annotations

import json
import time


class Lifecycle:
    """Shared between the server loop (which starts the drain) and :class:`DrainGate`."""

    def __init__(self) -> None:
        self.draining = False
        self.drain_started: float | None = None
        self.refused = 0          # requests answered 503 while draining

    def start_drain(self) -> None:
        if not self.draining:
            self.draining, self.drain_started = True, time.monotonic()


class DrainGate:
    """ASGI middleware: passes everything through until the drain starts, then answers
    ``/health`` with 503 ``draining`` and new ``POST /v1/*`` requests with a retryable 503.

    Args:
        app: the server app (:func:`slmkit.serve.create_app`).
        lifecycle: the replica's state.
        in_flight: ``() -> int``, requests running or queued (for the health body).
    """

    def __init__(self, app, lifecycle: Lifecycle, in_flight=lambda: 0):
        self.app, self.lifecycle, self.in_flight = app, lifecycle, in_flight

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.lifecycle.draining:
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/health":
            await _json(send, 503, {"status": "draining", "in_flight": self.in_flight()},
                        [(b"retry-after", b"1")])
        elif method == "POST" and path.startswith("/v1/"):
            self.lifecycle.refused += 1
            await _json(send, 503, {"error": {
                "message": "This replica is shutting down; send the request again (a load "
                           "balancer retries it on another replica).",
                "type": "server_error", "param": None, "code": "shutting_down"}},
                [(b"retry-after", b"1"), (b"connection", b"close")])
        else:
            await self.app(scope, receive, send)


async def _json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})
