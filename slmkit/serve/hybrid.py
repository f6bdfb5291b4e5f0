"""One endpoint over two models: answer locally or forward to a bigger one (``--fallback``).

:class:`Hybrid` sits between the app's routes and :class:`GenerationService` when ``slm
serve`` runs with ``--fallback URL``. Per request it picks one of four modes (the server's
``--route-mode``, or the request's own ``"route"`` field):

* ``cascade`` -- generate locally with the engine's per-token confidence on, score the
  answer (:mod:`slmkit.route.scores`: mean / min / quantiles of the token log-probs,
  entropy), keep it when ``score >= threshold``, else forward the request (the draft is
  dropped, or with ``--route-send-draft`` given to the big model to improve). A streaming
  request is answered once the local answer is scored: the kept answer is replayed as SSE,
  an escalated one streams from the big model;
* ``router`` -- score the prompt alone with the trained router (:mod:`slmkit.route.router`),
  then stream from whichever side it picks (no local work is wasted on forwarded requests);
* ``local`` / ``fallback`` -- always one side.

The request's ``"route"`` field is a mode name or ``{"mode", "threshold", "signal"}``.
Every answer says who answered: the ``slm_route`` field of the body (for a stream: one
last chunk with ``choices: []`` before ``[DONE]``), and the headers ``X-SLM-Route`` (local
or fallback) and ``X-SLM-Route-Score``. When the fallback fails (down, slow, errors) the
local answer is returned with ``slm_route.fallback_error`` set; a stream from the fallback
that breaks after it began ends with an error frame (its text cannot be taken back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections import Counter
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slmkit.engine import FinishEvent
from slmkit.errors import ConfigError
from slmkit.route.client import FallbackClient, FallbackError
from slmkit.route.config import DEFAULT_THRESHOLDS, RouteOptions
from slmkit.route.router import prompt_text
from slmkit.route.scores import SIGNALS, available_signals, score as cascade_score
from slmkit.serve import responses as R
from slmkit.serve.metrics import Histogram, _labels
from slmkit.serve.protocol import APIError, ChatRequest, error_body
from slmkit.serve.service import CLIENT_CLOSED, GenerationService, _cancel_on_disconnect

MODES = ("cascade", "router", "local", "fallback")
#: What chat clients are asked when the local draft goes along with an escalated request.
DRAFT_PROMPT = ("Above is a draft answer. Check it and reply to my previous message with "
                "the best final answer.")


class Hybrid:
    """Routing between the local service and the fallback server (see the module doc).

    Raises:
        ConfigError: the key variable is unset, or the router does not fit the model.
    """

    def __init__(self, service: GenerationService, config: RouteOptions, model, tokenizer):
        self.service, self.config = service, config
        key = None
        if config.fallback_key_env:
            key = os.environ.get(config.fallback_key_env)
            if not key:
                raise ConfigError(f"--fallback-key-env names ${config.fallback_key_env}, which "
                                  "is unset or empty; export the fallback's API key in it.")
        self.client = FallbackClient(config.fallback, config.fallback_model, key,
                                     retries=config.fallback_retries)
        self.router = None
        if config.router:
            from slmkit.route.router import Router

            self.router = Router.load(config.router)
            self.decide = self.router.decider(model, tokenizer)
        if config.route_signal not in available_signals():
            raise ConfigError("--route-signal flag needs the monitor's flag model "
                              "(slmkit/monitor/flag_model.json), which is not installed; "
                              "pick another signal.")
        self.tokenizer = service.tokenizer
        self.requests: Counter[tuple[str, str, str]] = Counter()  # mode, answered_by, reason
        self.fallback_errors = 0
        self.forwarded_prompt_tokens = self.forwarded_completion_tokens = 0
        self.decision = Histogram((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))

    async def aclose(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------------ the decision

    def choice(self, body: dict) -> tuple[str, float | None, str]:
        """``(mode, threshold or None, signal)`` for a request (400 on a bad ``route``)."""
        cfg, route = self.config, body.get("route")
        mode, threshold, signal = cfg.route_mode, None, cfg.route_signal
        if isinstance(route, str):
            route = {"mode": route}
        if route is not None:
            if not isinstance(route, dict) or set(route) - {"mode", "threshold", "signal"}:
                raise APIError(400, "Invalid 'route': send a mode name or an object with "
                               "'mode', 'threshold' and/or 'signal'.", param="route")
            mode = route.get("mode", mode)
            threshold, signal = route.get("threshold"), route.get("signal", signal)
            if mode not in MODES:
                raise APIError(400, f"Invalid 'route.mode' {mode!r}; use one of "
                               f"{', '.join(MODES)}.", param="route")
            if signal not in SIGNALS:
                raise APIError(400, f"Invalid 'route.signal' {signal!r}; use one of "
                               f"{', '.join(SIGNALS)}.", param="route")
            if threshold is not None and (isinstance(threshold, bool)
                                          or not isinstance(threshold, (int, float))):
                raise APIError(400, "Invalid 'route.threshold': send a number.", param="route")
            if "signal" in route and mode != "cascade":
                raise APIError(400, "'route.signal' applies to the cascade mode only.",
                               param="route")
            if threshold is not None and mode not in ("cascade", "router"):
                raise APIError(400, f"'route.threshold' does not apply to the {mode} mode.",
                               param="route")
        if mode == "router" and self.router is None:
            raise APIError(400, "This server has no router (start it with --router DIR); "
                           "use route 'cascade' instead.", param="route")
        if signal not in available_signals():
            raise APIError(400, "The 'flag' signal needs the monitor's flag model, which is "
                           "not installed here; use another signal.", param="route")
        if threshold is None and mode in ("cascade", "router"):
            # --route-threshold is on the scale of the server's own mode and signal
            if cfg.route_threshold is not None and mode == cfg.route_mode \
                    and (mode == "router" or signal == cfg.route_signal):
                threshold = cfg.route_threshold
            elif mode == "router":
                threshold = self.router.threshold
            else:
                threshold = DEFAULT_THRESHOLDS[signal]
        return mode, threshold, signal

    # ------------------------------------------------------------------ serving

    async def handle(self, request: Request, req, body: dict, ids: list[int], params,
                     plan) -> Response:
        """Answer one validated request (``body``: its raw JSON) on one side or the other."""
        mode, threshold, signal = self.choice(body)
        info: dict[str, Any] = {"mode": mode}
        record = request.scope.setdefault("slmkit", {})
        if mode == "local":
            return await self._local(request, req, ids, params, plan, info, "forced")
        if mode == "fallback":
            return await self._forward(request, req, body, ids, params, plan, info, "forced")
        if mode == "router":
            start = time.perf_counter()
            text = prompt_text(body, self.tokenizer)
            if getattr(self.decide, "lean", False):   # well under a millisecond: no thread hop
                score = self.decide(text)
            else:   # decoder layers: a worker thread keeps the event loop free
                score = await asyncio.to_thread(self.decide, text)
            took = time.perf_counter() - start
            self.decision.observe(took)
            info.update(score=round(score, 4), threshold=threshold,
                        decision_ms=round(took * 1000, 2))
            record["route_score"] = info["score"]
            if score >= threshold:
                return await self._local(request, req, ids, params, plan, info, "accepted")
            return await self._forward(request, req, body, ids, params, plan, info,
                                       "escalated")
        # cascade: the whole local answer first, with per-token confidence
        start = time.perf_counter()
        local = await self._local_buffered(request, req, ids,
                                           dataclasses.replace(params, confidence=True), plan)
        if isinstance(local, Response):
            return local  # the client left, or an error response
        answer, completion = local
        score = cascade_score(completion.confidence, signal, completion.hidden_mean,
                              getattr(self.service, "probe", None))
        info.update(signal=signal, score=round(score, 4) if score > -1e30 else None,
                    threshold=threshold, local_ms=round((time.perf_counter() - start) * 1000, 1))
        record["route_score"] = info["score"]
        if score >= threshold:
            return self._from_body(answer, req, info, "accepted")
        draft = None
        if self.config.route_send_draft and isinstance(req, ChatRequest):
            draft = completion.text
            info["draft_sent"] = True
        elif self.config.route_send_draft:
            info["draft_sent"] = False  # a text completion has no turn to put it in
        return await self._forward(request, req, body, ids, params, plan, info, "escalated",
                                   local_answer=answer, draft=draft)

    # ------------------------------------------------------------------ the local side

    async def _local(self, request, req, ids, params, plan, info: dict, reason: str,
                     error: str | None = None) -> Response:
        """The service's own answer (streaming or not), tagged."""
        info = {**info, "answered_by": "local", "model": self.service.config.name}
        if error:
            info["fallback_error"] = error
        self.requests[(info["mode"], "local", reason)] += 1
        response = await self.service.run(request, req, ids, params, plan)
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._tag_stream(response.body_iterator, req, info)
        elif isinstance(response, JSONResponse):
            body = json.loads(response.body)
            body["slm_route"] = info
            response = JSONResponse(body, status_code=response.status_code)
        self._headers(response, info)
        return response

    async def _local_buffered(self, request, req, ids, params, plan):
        """Generate the whole local answer: ``(body dict, Completion)`` or a Response
        (client gone); raises the service's APIErrors (timeout, shutdown, failure)."""
        svc = self.service
        record = request.scope.setdefault("slmkit", {})
        record.update(model=req.model, stream=bool(req.stream))
        deadline = time.monotonic() + svc.config.request_timeout
        generation = svc._submit(ids, params, record)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            try:
                first = await generation.next_event(deadline)
            except TimeoutError:
                raise svc._timeout(generation) from None
            if isinstance(first, FinishEvent) and generation.cancel_reason == "cancelled":
                record["status"] = CLIENT_CLOSED
                return Response(status_code=CLIENT_CLOSED)
            if isinstance(first, FinishEvent) and generation.cancel_reason == "shutdown":
                raise svc._shutdown_error()
            tools = plan is not None and bool(plan.tools)
            response = await svc._collect(req, generation, params, first, deadline, tools)
        except BaseException:
            generation.cancel()
            raise
        finally:
            watcher.cancel()
        if response.status_code != 200 or generation.finish is None:
            return response
        return json.loads(response.body), generation.finish.completion

    def _from_body(self, body: dict, req, info: dict, reason: str,
                   error: str | None = None) -> Response:
        """A finished local answer as JSON, or replayed as an SSE stream."""
        info = {**info, "answered_by": "local", "model": self.service.config.name}
        if error:
            info["fallback_error"] = error
        self.requests[(info["mode"], "local", reason)] += 1
        if req.stream:
            response = StreamingResponse(self._replay(body, req, info),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache",
                                                  "X-Accel-Buffering": "no"})
        else:
            response = JSONResponse({**body, "slm_route": info})
        self._headers(response, info)
        return response

    async def _replay(self, body: dict, req, info: dict):
        """A finished answer as OpenAI stream chunks."""
        chat = isinstance(req, ChatRequest)
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        rid, created, model = body["id"], body["created"], body["model"]
        choice = body["choices"][0]
        if chat:
            message = choice["message"]
            lp = (choice.get("logprobs") or {}).get("content")
            yield R.sse(R.chat_chunk(rid, created, model, {"role": "assistant", "content": ""},
                                     with_usage=with_usage))
            if message.get("tool_calls"):
                calls = [{**c, "index": i} for i, c in enumerate(message["tool_calls"])]
                yield R.sse(R.chat_chunk(rid, created, model, {"tool_calls": calls},
                                         with_usage=with_usage))
            elif message.get("content") or lp:
                yield R.sse(R.chat_chunk(rid, created, model, {"content": message["content"]},
                                         logprobs=lp, with_usage=with_usage))
            yield R.sse(R.chat_chunk(rid, created, model, {}, choice["finish_reason"],
                                     with_usage=with_usage))
        else:
            if choice["text"] or choice.get("logprobs"):
                yield R.sse(R.completion_chunk(rid, created, model, choice["text"],
                                               logprobs=choice.get("logprobs"),
                                               with_usage=with_usage))
            yield R.sse(R.completion_chunk(rid, created, model, "", choice["finish_reason"],
                                           with_usage=with_usage))
        obj = "chat.completion.chunk" if chat else "text_completion"
        if with_usage:
            yield R.sse(R.usage_chunk(rid, created, model, obj, body["usage"]))
        yield R.sse(self._route_chunk(rid, created, model, obj, info))
        yield R.sse("[DONE]")

    @staticmethod
    def _route_chunk(rid: str, created: int, model: str, obj: str, info: dict) -> dict:
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                "slm_route": info}

    async def _tag_stream(self, frames, req, info: dict):
        """The service's SSE frames with the ``slm_route`` chunk before ``[DONE]``."""
        obj = "chat.completion.chunk" if isinstance(req, ChatRequest) else "text_completion"
        rid, done = None, R.sse("[DONE]")
        try:
            async for frame in frames:
                if frame == done:
                    yield R.sse(self._route_chunk(rid or "", R.now(), req.model, obj, info))
                elif rid is None and frame.startswith(b"data: {"):
                    rid = json.loads(frame[6:]).get("id")
                yield frame
        finally:
            await frames.aclose()  # the service's own clean-up (a client that left)

    @staticmethod
    def _headers(response: Response, info: dict) -> None:
        response.headers["X-SLM-Route"] = info["answered_by"]
        response.headers["X-SLM-Route-Model"] = str(info["model"])
        if info.get("score") is not None:
            response.headers["X-SLM-Route-Score"] = str(info["score"])

    # ------------------------------------------------------------------ the fallback side

    def _forward_body(self, body: dict, model: str, draft: str | None) -> dict:
        out = {k: v for k, v in body.items() if k != "route"}
        out["model"] = model
        if draft is not None:
            out["messages"] = [*body["messages"], {"role": "assistant", "content": draft},
                               {"role": "user", "content": DRAFT_PROMPT}]
        if body.get("stream"):
            out["stream_options"] = {**(body.get("stream_options") or {}),
                                     "include_usage": True}
        return out

    def _count(self, use: dict | None) -> None:
        if isinstance(use, dict):
            self.forwarded_prompt_tokens += int(use.get("prompt_tokens") or 0)
            self.forwarded_completion_tokens += int(use.get("completion_tokens") or 0)

    async def _forward(self, request, req, body: dict, ids, params, plan, info: dict,
                       reason: str, local_answer: dict | None = None,
                       draft: str | None = None) -> Response:
        """The fallback's answer; on failure the local one (``local_answer`` when the
        cascade has it already, else generated now), flagged."""
        path = "/chat/completions" if isinstance(req, ChatRequest) else "/completions"
        deadline = time.monotonic() + self.config.fallback_timeout
        record = request.scope.setdefault("slmkit", {})
        try:
            model = await self.client.model_name(deadline)
            payload = self._forward_body(body, model, draft)
            if req.stream:
                stream = await self.client.stream(path, payload, deadline)
                events = stream.events(self.config.fallback_timeout)
                try:  # the first event must come before the answer counts as begun
                    first = await anext(events)
                except StopAsyncIteration:
                    raise FallbackError("the fallback's stream was empty") from None
            else:
                answer = await self.client.complete(path, payload, deadline)
                if not isinstance(answer, dict) or not answer.get("choices"):
                    raise FallbackError("the fallback's answer has no choices")
        except FallbackError as e:
            self.fallback_errors += 1
            record["fallback_error"] = str(e)
            if local_answer is not None:
                return self._from_body(local_answer, req, info, "fallback_failed", str(e))
            return await self._local(request, req, ids, params, plan, info, "fallback_failed",
                                     str(e))
        info = {**info, "answered_by": "fallback", "model": model}
        self.requests[(info["mode"], "fallback", reason)] += 1
        record["route"] = "fallback"
        if req.stream:
            response = StreamingResponse(self._relay(first, events, req, info, record),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache",
                                                  "X-Accel-Buffering": "no"})
        else:
            self._count(answer.get("usage"))
            response = JSONResponse({**answer, "slm_route": info})
        self._headers(response, info)
        return response

    async def _relay(self, first: str, events, req, info: dict, record: dict):
        """The fallback's stream passed through (its usage chunk only when the client asked
        for it), the ``slm_route`` chunk before ``[DONE]``; an error frame if it breaks."""
        wants_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if isinstance(req, ChatRequest) else "text_completion"
        rid, created = "", R.now()
        payload = first
        try:
            while True:
                if payload == "[DONE]":
                    yield R.sse(self._route_chunk(rid, created, req.model, obj, info))
                    yield R.sse("[DONE]")
                    return
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    chunk = None
                if isinstance(chunk, dict):
                    rid, created = chunk.get("id", rid), chunk.get("created", created)
                    if chunk.get("usage"):
                        self._count(chunk["usage"])
                    if "error" in chunk:
                        record["status"] = 502
                    if not chunk.get("choices") and chunk.get("usage") and not wants_usage:
                        payload = await anext(events)
                        continue
                yield R.sse(payload)
                payload = await anext(events)
        except StopAsyncIteration:  # the stream ended without [DONE]
            yield R.sse(self._route_chunk(rid, created, req.model, obj, info))
            yield R.sse("[DONE]")
        except FallbackError as e:
            self.fallback_errors += 1
            record.update(status=502, fallback_error=str(e))
            yield R.sse(error_body(f"The fallback model's stream broke off ({e}); the answer "
                                   "above is incomplete.", type="server_error",
                                   code="fallback_stream_broken"))
        finally:
            await events.aclose()

    # ------------------------------------------------------------------ metrics

    def metrics_text(self) -> str:
        """Prometheus lines of the routing counters (appended to ``/metrics``)."""
        p = "slm_route_"
        out = [f"# HELP {p}requests_total Routed requests by mode, who answered and why "
               "(accepted, escalated, forced, fallback_failed).",
               f"# TYPE {p}requests_total counter"]
        for (mode, by, reason), n in sorted(self.requests.items()):
            out.append(f"{p}requests_total{_labels(mode=mode, answered_by=by, reason=reason)} {n}")
        cost = (self.forwarded_prompt_tokens + self.forwarded_completion_tokens) \
            * self.config.fallback_price
        for name, value, help_ in (
                ("forwarded_prompt_tokens_total", self.forwarded_prompt_tokens,
                 "Prompt tokens the fallback model read (its usage)."),
                ("forwarded_completion_tokens_total", self.forwarded_completion_tokens,
                 "Tokens the fallback model generated (its usage)."),
                ("forwarded_cost_total", round(cost, 8), "Forwarded tokens times "
                 "--fallback-price."),
                ("fallback_errors_total", self.fallback_errors, "Forwards that failed (the "
                 "local answer was returned, or a begun stream broke).")):
            out += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} counter",
                    f"{p}{name} {value}"]
        out += self.decision.render(f"{p}decision_seconds", "Router decision time per "
                                    "request (features + classifier).")
        return "\n".join(out) + "\n"
