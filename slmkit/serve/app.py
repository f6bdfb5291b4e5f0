"""The FastAPI app: OpenAI routes, auth, CORS, metrics, per-request logs, the chat page.

Routes:

* ``GET /`` -- the web chat page (one static file, ``chat.html``);
* ``GET /health`` -- liveness plus queue state (no auth, for probes);
* ``GET /metrics`` -- Prometheus text (:mod:`slmkit.serve.metrics`);
* ``GET /v1/models``, ``GET /v1/models/{id}``;
* ``POST /v1/completions``, ``POST /v1/chat/completions`` (:mod:`slmkit.serve.service`;
  with ``--rag INDEX`` chat answers come from the documents, :mod:`slmkit.serve.rag`);
* ``POST /v1/embeddings`` -- mean-pooled hidden states of the served model
  (:mod:`slmkit.serve.embeddings`).

:class:`Gate` is a plain ASGI middleware in front of everything: it gives each request an
id (``X-Request-Id``), checks ``Authorization: Bearer`` for ``/v1/*`` and ``/metrics`` when
an API key is set (constant-time comparison of SHA-256 digests, so neither the content nor
the length of the key leaks through timing), answers 413 to a body over
``max_request_bytes`` (at once when ``Content-Length`` declares it, else as soon as a chunked
body passes it), counts every answer by status, and writes one JSON log line per request --
without prompt text unless ``log_prompts`` is on. A client that hangs up mid-body is logged
as 499, not as a server error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from slmkit.serve.config import ServeConfig
from slmkit.serve.embeddings import Embedder
from slmkit.serve.metrics import Metrics
from slmkit.serve.protocol import (APIError, ChatRequest, CompletionRequest, EmbeddingRequest,
                                   error_body, parse_request)
from slmkit.serve.rag import no_index_error
from slmkit.serve.service import CLIENT_CLOSED, GenerationService
from slmkit.serve.structured import output_plan

log = logging.getLogger("slmkit.serve.access")

#: Paths reported by name in metrics; anything else is "other" (bounded label values).
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions",
             "/v1/chat/completions", "/v1/embeddings")


def needs_auth(path: str) -> bool:
    return path.startswith("/v1/") or path == "/metrics"


def bearer_matches(authorization: bytes, key_digest: bytes) -> bool:
    """True when ``authorization`` is ``Bearer <key>`` (constant time in the key)."""
    scheme, _, token = authorization.strip().partition(b" ")
    given = hashlib.sha256(token.strip()).digest()
    return hmac.compare_digest(given, key_digest) and scheme.lower() == b"bearer"


class Gate:
    """ASGI middleware: request id, bearer auth, body size cap, metrics and the access log."""

    def __init__(self, app, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.key_digest = hashlib.sha256(config.api_key.encode()).digest() \
            if config.api_key else None

    def too_large(self) -> APIError:
        return APIError(413, f"The request body is over this server's limit of "
                        f"{self.config.max_request_bytes} bytes; send a shorter request.",
                        code="request_too_large", headers={"Connection": "close"})

    def refusal(self, scope) -> APIError | None:
        """The error for a request its headers alone rule out (no API key, body too large)."""
        headers = dict(scope["headers"])
        if (self.key_digest is not None and needs_auth(scope["path"])
                and scope["method"] != "OPTIONS"
                and not bearer_matches(headers.get(b"authorization", b""), self.key_digest)):
            return APIError(401, "Missing or wrong API key; send 'Authorization: Bearer <key>'.",
                            type="authentication_error", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        # uvicorn's HTTP parser has already refused a Content-Length that is not digits
        if int(headers.get(b"content-length", b"0")) > self.config.max_request_bytes:
            return self.too_large()
        return None

    def capped(self, receive):
        """``receive`` that raises a 413 once a body without a declared length (chunked)
        goes over the cap; the app's error handler answers it."""
        received = 0

        async def receive_capped():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.config.max_request_bytes:
                raise self.too_large()
            return message
        return receive_capped

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = secrets.token_hex(6)
        path = scope["path"]
        record = {"request_id": rid, "method": scope["method"], "path": path,
                  "client": (scope.get("client") or ("?",))[0]}
        scope["slmkit"] = record
        sent = {"status": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", rid.encode())]}
            await send(message)

        start = time.perf_counter()
        try:
            error = self.refusal(scope)
            if error is not None:
                record["error"] = error.message
                response = JSONResponse(error.body(), status_code=error.status,
                                        headers=error.headers)
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, self.capped(receive), send_with_id)
        finally:
            status = record.pop("status", None) or sent["status"]
            endpoint = path if path in ENDPOINTS else (
                "/v1/models" if path.startswith("/v1/models/") else "other")
            self.metrics.record_request(endpoint, status)
            line = {"ts": round(time.time(), 3), **record, "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 1)}
            log.info(json.dumps(line, ensure_ascii=False, default=str))


def chat_page() -> str:
    """The web chat page shipped in the package."""
    return resources.files("slmkit.serve").joinpath("chat.html").read_text(encoding="utf-8")


def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """Build the server app for a loaded model.

    Args:
        model, tokenizer: from :func:`slmkit.load_model` (adapters already merged).
        config: settings; defaults to :class:`ServeConfig()`.

    The engine thread starts now and stops when the app's lifespan ends.
    """
    config = config or ServeConfig()
    metrics = Metrics()
    service = GenerationService(model, tokenizer, config, metrics)
    embedder = Embedder(model, service.encode_text)
    hybrid = None
    if config.fallback:  # one endpoint over this model and a bigger one
        from slmkit.serve.hybrid import Hybrid

        hybrid = Hybrid(service, config, model, tokenizer)
    rag = None
    if config.rag:  # chat answered from a document index, with sources
        from slmkit.serve.rag import RagChat

        try:
            rag = RagChat(service, config)
        except BaseException:
            service.close()
            raise
    page = chat_page()
    created = int(time.time())

    canary = None
    if config.canary:
        from slmkit.serve.canary import Canary, parse_interval

        canary = Canary(service, metrics, config.canary, parse_interval(config.canary_every),
                        config.canary_drop, config.canary_webhook)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if canary is not None:
            canary.start()
        yield
        if canary is not None:
            await canary.stop()
        if hybrid is not None:
            await hybrid.aclose()
        if rag is not None:
            rag.close()
        service.close()

    app = FastAPI(title="slmkit server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service, app.state.metrics, app.state.config = service, metrics, config
    app.state.hybrid, app.state.rag = hybrid, rag

    async def generate(request: Request, raw: bytes, req, ids, params, plan):
        """The local answer, or the routed one when the server has a fallback."""
        if hybrid is not None:
            return await hybrid.handle(request, req, json.loads(raw), ids, params, plan)
        if b'"route"' in raw and "route" in json.loads(raw):
            raise APIError(400, "This server has no fallback model to route to (start it "
                           "with --fallback URL); drop 'route'.", param="route")
        return await service.run(request, req, ids, params, plan)
    app.state.canary = canary

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        request.scope.setdefault("slmkit", {})["error"] = exc.message
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect):
        """The client hung up while sending its request: nobody reads the answer."""
        request.scope.setdefault("slmkit", {})["error"] = "client left while sending the body"
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = (f"No route {request.method} {request.url.path}; see /v1/models, "
                   "/v1/completions, /v1/chat/completions and /v1/embeddings.") if exc.status_code in (404, 405) \
            else str(exc.detail)
        return JSONResponse(error_body(message), status_code=exc.status_code)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                       "style-src 'self' 'unsafe-inline'"})

    @app.get("/health")
    async def health():
        e = service.engine
        return {"status": "ok", "model": config.name, "running": e.running,
                "queued": e.queue_depth, "free_slots": e.engine.free_slots}

    @app.get("/metrics")
    async def prometheus():
        e = service.engine
        return PlainTextResponse(metrics.render(e.queue_depth, e.running, e.engine.free_slots)
                                 + (hybrid.metrics_text() if hybrid is not None else "")
                                 + (rag.metrics_text() if rag is not None else ""),
                                 media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": config.name, "object": "model", "created": created, "owned_by": "slmkit",
                "max_model_len": service.max_seq_len}

    def embedding_card() -> dict | None:  # --rag: the index's embedding model
        name = rag.embedding_model if rag is not None else None
        return {"id": name, "object": "model", "created": created, "owned_by": "slmkit"} \
            if name else None

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(), *filter(None, [embedding_card()])]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        card = embedding_card()
        if card is not None and model_id == card["id"]:
            return card
        service.check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await request.body()
        req = parse_request(raw, CompletionRequest)
        service.check_model(req.model)
        if b'"rag"' in raw and "rag" in json.loads(raw):
            raise APIError(400, "'rag' applies to /v1/chat/completions only (a completion "
                           "prompt is text to continue, not a question); drop it.",
                           param="rag") if rag is not None else no_index_error()
        plan = output_plan(req)
        params = service.sampling(req, plan)
        ids = service.encode_completion(req)
        if config.log_prompts:
            request.scope["slmkit"]["prompt"] = req.prompt
        return await generate(request, raw, req, ids, params, plan)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        req = parse_request(raw, ChatRequest)
        service.check_model(req.model)
        plan = output_plan(req)
        params = service.sampling(req, plan)
        if config.log_prompts:
            request.scope["slmkit"]["prompt"] = [m.model_dump() for m in req.messages]
        if rag is not None:
            return await rag.handle(request, req, json.loads(raw), plan, params)
        if b'"rag"' in raw and "rag" in json.loads(raw):
            raise no_index_error()
        ids = service.encode_chat(req, plan)
        return await generate(request, raw, req, ids, params, plan)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = parse_request(await request.body(), EmbeddingRequest)
        by_index = rag is not None and req.model == rag.embedding_model
        if not by_index:
            service.check_model(req.model)
        if config.log_prompts:
            request.scope["slmkit"]["prompt"] = req.input
        body = await (rag.embeddings(req) if by_index else embedder.respond(req, req.model))
        request.scope["slmkit"]["prompt_tokens"] = body["usage"]["prompt_tokens"]
        return JSONResponse(body)

    app.add_middleware(Gate, config=config, metrics=metrics)
    if config.cors_origins:  # outermost, so that 401s and 429s carry CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After", "X-Request-Id"])
    return app
