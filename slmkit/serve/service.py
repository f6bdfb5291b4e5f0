"""The generation side of the server: prompts, sampling, streaming and collecting.

:class:`GenerationService` turns a validated OpenAI request into engine work and the
engine's events back into OpenAI responses. It knows nothing about HTTP routing; the
FastAPI app (:mod:`slmkit.serve.app`) calls :meth:`GenerationService.completion` and
:meth:`GenerationService.chat`.

Lifecycle of one request:

1. encode the prompt (chat template for chat) and check it against the prompt cap;
2. build :class:`~slmkit.engine.SamplingParams` (``max_tokens`` against the cap);
3. submit through :class:`~slmkit.serve.backend.AsyncEngine` (429 when full);
4. a watcher task cancels the generation as soon as the client disconnects, which frees
   the engine slot at its next step;
5. non-streaming: collect events until the finish event (504 past the deadline);
   streaming: wait for the first event (so a timeout in the queue is still a clean 504),
   then send SSE frames; a disconnect cancels the stream (Starlette cancels the body
   task), a timeout mid-stream sends an error frame;
6. monitoring (``ServeConfig.monitor``): the engine records each token's log-probability
   and entropy; at the finish the answer's confidence summary and hallucination flag
   (:mod:`slmkit.monitor.confidence`) go into ``choices[0].confidence`` (the last chunk
   of a stream), ``/metrics``, the access log line (figures only) and the request log.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slmkit.engine import Engine, FinishEvent, SamplingParams, TokenEvent
from slmkit.engine.generate import chat_stop_ids, prompt_ids
from slmkit.engine.tool_formats import tool_format
from slmkit.errors import ConfigError
from slmkit.serve import responses as R
from slmkit.serve.backend import AsyncEngine, Generation
from slmkit.serve.config import ServeConfig
from slmkit.serve.metrics import Metrics
from slmkit.monitor.confidence import FlagModel, summarize
from slmkit.monitor.log import answer_row
from slmkit.serve.protocol import (MAX_TOP_LOGPROBS, APIError, ChatRequest, CompletionRequest,
                                   check_common, error_body, stop_list)
from slmkit.serve.structured import OutputPlan, ToolCallReader, chat_messages

#: Status recorded for a client that left before its answer was complete (nginx's 499).
CLIENT_CLOSED = 499


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """Wait for the client to hang up, then cancel its generation."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel("cancelled")
            return


class GenerationService:
    """Serve one model through one continuous-batching engine.

    Args:
        model, tokenizer: the loaded model (any format :func:`slmkit.load_model` reads).
        config: server settings (limits, name, timeouts).
        metrics: where counters and histograms go.
    """

    def __init__(self, model, tokenizer, config: ServeConfig, metrics: Metrics):
        self.config, self.metrics = config, metrics
        engine = Engine(model, tokenizer, max_batch=config.max_concurrency,
                        max_seq_len=config.max_seq_len, threads=config.threads,
                        background=True, kv_cache=config.kv_cache, draft=config.draft)
        self.engine = AsyncEngine(engine, config.max_queue, on_finish=self._on_finish)
        # the engine thread detokenizes with `tokenizer`; the event loop gets its own copy
        # (Rust tokenizers refuse concurrent use of one instance from two threads).
        self.tokenizer = copy.deepcopy(tokenizer)
        self.logprobs = R.LogprobFormatter(self.tokenizer)
        #: how this model's chat template writes tool calls (its own format or generic)
        self.tool_format = tool_format(self.tokenizer)
        self.max_seq_len = engine.max_seq_len
        self.max_prompt = min(config.max_prompt_tokens or engine.max_seq_len - 1,
                              engine.max_seq_len - 1)
        self.max_tokens_cap = min(config.max_tokens_cap or engine.max_seq_len,
                                  engine.max_seq_len)
        self.eos = engine.eos
        self.chat_stops = chat_stop_ids(tokenizer)
        self.flag = None
        if config.monitor:
            try:
                self.flag = FlagModel.load(config.flag_model)
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"Cannot read the flag model {config.flag_model} ({e}); pass "
                                  "a JSON file FlagModel.save wrote.") from None
        # the flag model's hidden-state probe, where it was fitted on this very model: decode
        # steps then tap its block's hidden states (a copy per step), read once per answer
        self.probe = self.flag.probe_for(engine.model) if self.flag is not None else None
        if self.probe is not None:
            engine.set_hidden_tap(self.probe.after)
        self.request_log = make_request_log(config, self._drift_gauges)
        # the grammar compiler's one-off first mask (~1.5 s on a 49k vocabulary) is paid in
        # the background now instead of by the first JSON-schema or tool request
        threading.Thread(target=lambda: engine.grammars.warm(), name="slmkit-grammar-warm",
                         daemon=True).start()

    def close(self) -> None:
        self.engine.close()
        if self.request_log is not None:
            self.request_log.close()

    # ------------------------------------------------------------------ prompts, params

    def check_model(self, name: str) -> None:
        if name != self.config.name:
            raise APIError(400, f"The model '{name}' does not exist here; this server serves "
                           f"'{self.config.name}' (see GET /v1/models).", param="model",
                           code="model_not_found")

    def _check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"The '{param}' is empty; send at least one token of text.",
                           param=param)
        if len(ids) > self.max_prompt:
            raise APIError(400, f"The prompt is {len(ids)} tokens, over this server's limit of "
                           f"{self.max_prompt}; shorten the '{param}'.", param=param,
                           code="context_length_exceeded")
        return ids

    def encode_completion(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "Invalid 'prompt': send one prompt per request (this "
                               "server does not batch prompts in one request).", param="prompt")
            prompt = prompt[0]
        return self.encode_text(prompt, "prompt")

    def encode_text(self, text: str | list[int], param: str) -> list[int]:
        """A text (or token ids, checked against the vocabulary) as prompt token ids.

        Raises:
            APIError: 400 naming ``param``: an id outside the vocabulary, nothing to
                encode, or more tokens than the prompt cap.
        """
        if isinstance(text, str):
            ids = prompt_ids(self.tokenizer, text)   # with the BOS the model expects
        else:
            ids = list(text)
            bad = [t for t in ids if not 0 <= t < len(self.tokenizer)]
            if bad:
                raise APIError(400, f"Invalid '{param}': token id {bad[0]} is outside the "
                               f"vocabulary (0..{len(self.tokenizer) - 1}).", param=param)
        return self._check_prompt(ids, param)

    def encode_chat(self, req: ChatRequest, plan: OutputPlan | None = None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "This model's tokenizer has no chat template; use "
                           "/v1/completions instead.", param="messages")
        if not req.messages:
            raise APIError(400, "Invalid 'messages': send at least one message.",
                           param="messages")
        messages, kwargs = chat_messages(req, self.bind(plan or OutputPlan()), self.tokenizer)
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, **kwargs)
        except Exception as e:  # a template that rejects this conversation (jinja error)
            raise APIError(400, f"The chat template rejected these messages ({e}).",
                           param="messages") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return self._check_prompt([int(t) for t in ids], "messages")

    def bind(self, plan: OutputPlan) -> OutputPlan:
        """``plan`` with its tool grammar in this model's tool format."""
        return plan if plan.format == self.tool_format else plan.bind(self.tool_format)

    def sampling(self, req: CompletionRequest | ChatRequest,
                 plan: OutputPlan | None = None) -> SamplingParams:
        """SamplingParams for a request, after every range check (``plan``: its grammar,
        bound to this model's tool format)."""
        check_common(req)
        chat = isinstance(req, ChatRequest)
        if plan is not None and chat:
            self.bind(plan)
        param, max_tokens = "max_tokens", req.max_tokens
        if chat and req.max_completion_tokens is not None:
            param, max_tokens = "max_completion_tokens", req.max_completion_tokens
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, self.max_tokens_cap)
        elif max_tokens < 1:
            raise APIError(400, f"Invalid '{param}': {max_tokens} must be at least 1.",
                           param=param)
        elif max_tokens > self.max_tokens_cap:
            raise APIError(400, f"Invalid '{param}': {max_tokens} is over this server's cap of "
                           f"{self.max_tokens_cap}; ask for fewer tokens.", param=param)
        if chat:
            top = req.top_logprobs or 0
            want_logprobs = bool(req.logprobs)
            if top and not want_logprobs:
                raise APIError(400, "Invalid 'top_logprobs': it needs 'logprobs': true.",
                               param="top_logprobs")
            top_param = "top_logprobs"
        else:
            top = req.logprobs or 0
            want_logprobs = req.logprobs is not None
            top_param = "logprobs"
            if req.echo:
                raise APIError(400, "Invalid 'echo': echoing the prompt is not supported.",
                               param="echo")
            if req.suffix or (req.best_of or 1) != 1:
                raise APIError(400, "'suffix' and 'best_of' are not supported by this server.",
                               param="suffix" if req.suffix else "best_of")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"Invalid '{top_param}': {top} is outside 0..{MAX_TOP_LOGPROBS}.",
                           param=top_param)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
            seed=req.seed, stop=stop_list(req.stop), ignore_eos=bool(req.ignore_eos),
            stop_token_ids=self.chat_stops if chat else [],
            logprobs=want_logprobs, top_logprobs=top, grammar=plan.grammar if plan else None,
            confidence=self.config.monitor)

    # ------------------------------------------------------------------ running

    def _submit(self, ids: list[int], params: SamplingParams, record: dict) -> Generation:
        try:
            generation = self.engine.submit(ids, params, request_id=record.get("request_id"))
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        generation.context = record
        return generation

    def _on_finish(self, generation: Generation, event: FinishEvent) -> None:
        """Once per generation, on the event loop: metrics and the log record."""
        c = event.completion
        reason = generation.cancel_reason if event.reason == "cancelled" else event.reason
        reason = reason or event.reason
        self.metrics.record_generation(reason, c.prompt_tokens, c.completion_tokens,
                                       c.ttft_s, c.duration_s)
        generation.context.update(
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
            finish_reason=reason,
            ttft_ms=None if c.ttft_s is None else round(c.ttft_s * 1000, 1))
        if event.reason not in ("stop", "length"):
            return
        conf = summarize(c.confidence, c.text, self.flag,
                         question=generation.monitor.get("question", ""),
                         hidden=c.hidden_mean, probe=self.probe) \
            if self.config.monitor else None
        generation.confidence = conf
        if conf is not None and not generation.monitor.get("canary"):
            self.metrics.record_answer(conf)
            generation.context.update({k: conf[k] for k in (
                "mean_logprob", "min_logprob", "mean_entropy", "risk", "flagged") if k in conf})
        if self.request_log is not None:
            monitor = generation.monitor
            self.request_log.record(
                answer_row(self.config.name, monitor.get("endpoint"), c, reason, conf,
                           generation.context.get("request_id"), bool(monitor.get("canary"))),
                prompt=monitor.get("prompt"), answer=c.text)

    def _drift_gauges(self, signals: dict) -> None:
        """``slm_drift_p_value{signal}`` and ``slm_drift_alarm{signal}`` from the request log's
        live drift check (its writer thread calls this)."""
        for name, sig in signals.items():
            if sig["p_value"] is not None:
                self.metrics.set_gauge("drift_p_value", sig["p_value"], "p-value of the drift "
                                       "test, reference vs recent requests.", signal=name)
            self.metrics.set_gauge("drift_alarm", float(sig["drift"]), "1 when the signal "
                                   "drifted (p <= 0.001).", signal=name)
        if "mmd2" in signals.get("embedding", {}):
            self.metrics.set_gauge("drift_embedding_mmd2", signals["embedding"]["mmd2"],
                                   "Prompt-embedding MMD² vs the reference.")

    def _is_stop_token(self, event: TokenEvent, params: SamplingParams) -> bool:
        return event.token_id in params.stop_token_ids or (
            not params.ignore_eos and event.token_id in self.eos)

    async def run(self, request: Request, req: CompletionRequest | ChatRequest,
                  ids: list[int], params: SamplingParams,
                  plan: OutputPlan | None = None) -> Response:
        """Generate for a validated request; returns the JSON or SSE response."""
        tools = plan is not None and bool(plan.tools)
        record = request.scope.setdefault("slmkit", {})
        record.update(model=req.model, stream=bool(req.stream))
        deadline = time.monotonic() + self.config.request_timeout
        generation = self._submit(ids, params, record)
        if self.request_log is not None:
            generation.monitor = {"endpoint": "chat" if isinstance(req, ChatRequest)
                                  else "completions", "prompt": self.prompt_text(req)}
        if self.config.monitor and isinstance(req, ChatRequest):
            # the flag reads the answer's own tokens: words copied from the question are not
            users = [m for m in req.messages if m.role == "user"]
            generation.monitor["question"] = users[-1].text() if users else ""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            first = await generation.next_event(deadline)
        except TimeoutError:
            watcher.cancel()
            raise self._timeout(generation) from None
        except BaseException:
            watcher.cancel()
            generation.cancel()
            raise
        if isinstance(first, FinishEvent) and generation.cancel_reason == "cancelled":
            watcher.cancel()  # the client left while the request waited for a slot
            record["status"] = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(first, FinishEvent) and generation.cancel_reason == "shutdown":
            watcher.cancel()
            raise self._shutdown_error()
        if req.stream:
            watcher.cancel()  # from here on Starlette watches the connection
            return StreamingResponse(self._stream(req, generation, params, first, deadline,
                                                  tools),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        try:
            return await self._collect(req, generation, params, first, deadline, tools)
        finally:
            watcher.cancel()

    def prompt_text(self, req: CompletionRequest | ChatRequest) -> str:
        """The request's prompt as text, for the request log (messages joined by lines)."""
        if isinstance(req, ChatRequest):
            return "\n".join(m.text() for m in req.messages)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list):
            return self.tokenizer.decode(prompt, skip_special_tokens=True)
        return prompt

    @staticmethod
    def _shutdown_error() -> APIError:
        return APIError(503, "The server is shutting down and stopped this request; retry "
                        "when it is back.", type="server_error", code="shutting_down",
                        headers={"Retry-After": "5"})

    def _timeout(self, generation: Generation) -> APIError:
        generation.cancel("timeout")
        return APIError(504, f"The request took longer than the server's limit of "
                        f"{self.config.request_timeout:g} s; ask for fewer tokens or retry "
                        "when the server is less busy.", type="timeout_error", code="timeout")

    async def _collect(self, req, generation: Generation, params: SamplingParams,
                       event, deadline: float, tools: bool = False) -> Response:
        entries = []
        while True:
            if isinstance(event, TokenEvent) and params.logprobs \
                    and not self._is_stop_token(event, params):
                entries.append((event.token_id, event.logprob, event.top_logprobs))
            if isinstance(event, FinishEvent):
                break
            try:
                event = await generation.next_event(deadline)
            except TimeoutError:
                raise self._timeout(generation) from None
        c = event.completion
        if event.reason == "cancelled" and generation.cancel_reason == "shutdown":
            raise self._shutdown_error()
        if event.reason == "cancelled":  # the client left; nobody reads this
            generation.context["status"] = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        if event.reason == "error":
            raise APIError(500, f"Generation failed: {c.error}.", type="server_error")
        use = R.usage(c.prompt_tokens, c.completion_tokens)
        rid = f"{'chatcmpl' if isinstance(req, ChatRequest) else 'cmpl'}-{generation.handle.id}"
        created, finish = R.now(), R.FINISH_REASONS[event.reason]
        if isinstance(req, ChatRequest):
            lp = [self.logprobs.chat_entry(*e) for e in entries] if params.logprobs else None
            calls = None
            if tools:
                reader = ToolCallReader(self.tool_format)
                reader.feed(c.text)
                calls = reader.tool_calls() if reader.is_call else None
                if reader.complete and finish == "stop":
                    finish = "tool_calls"
            body = R.chat_response(rid, created, req.model, c.text, finish, lp, use, calls)
        else:
            lp = self.logprobs.completion_block(entries, 0) if params.logprobs else None
            body = R.completion_response(rid, created, req.model, c.text, finish, lp, use)
        if self.config.monitor:
            body["choices"][0]["confidence"] = generation.confidence
        return JSONResponse(body)

    async def _stream(self, req, generation: Generation, params: SamplingParams, event,
                      deadline: float, tools: bool = False) -> AsyncIterator[bytes]:
        """SSE frames in OpenAI's shape; cancels the generation if the client leaves.

        A tool turn (``tools``) streams a call as OpenAI does: one delta announcing the
        call (index, id, type, name and the arguments text so far), then deltas of more
        arguments text; the role chunk then has ``content: null``."""
        chat = isinstance(req, ChatRequest)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{generation.handle.id}"
        created, model = R.now(), req.model
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        offset = 0
        reader = ToolCallReader(self.tool_format) if tools else None
        pending_lp: list[dict] = []
        try:
            if chat:
                yield R.sse(R.chat_chunk(rid, created, model,
                                         {"role": "assistant", "content": None if tools else ""},
                                         with_usage=with_usage))
            while True:
                entry = None
                if isinstance(event, TokenEvent) and params.logprobs \
                        and not self._is_stop_token(event, params):
                    entry = (event.token_id, event.logprob, event.top_logprobs)
                if reader is not None:
                    pending_lp += [self.logprobs.chat_entry(*entry)] if entry else []
                    content, calls = reader.feed(event.text)
                    delta = {"tool_calls": calls} if calls else \
                        {"content": content} if content else None
                    if delta is not None:
                        yield R.sse(R.chat_chunk(rid, created, model, delta,
                                                 logprobs=pending_lp or None,
                                                 with_usage=with_usage))
                        pending_lp = []
                elif event.text or entry is not None:
                    if chat:
                        lp = [self.logprobs.chat_entry(*entry)] if entry else None
                        chunk = R.chat_chunk(rid, created, model, {"content": event.text},
                                             logprobs=lp, with_usage=with_usage)
                    else:
                        lp = self.logprobs.completion_block([entry], offset) if entry else None
                        chunk = R.completion_chunk(rid, created, model, event.text,
                                                   logprobs=lp, with_usage=with_usage)
                    offset += len(event.text)
                    yield R.sse(chunk)
                if isinstance(event, FinishEvent):
                    break
                try:
                    event = await generation.next_event(deadline)
                except TimeoutError:
                    error = self._timeout(generation)
                    generation.context["status"] = 504
                    yield R.sse(error.body())
                    return
            if event.reason == "cancelled" and generation.cancel_reason == "shutdown":
                generation.context["status"] = 503
                yield R.sse(self._shutdown_error().body())
                return
            if event.reason == "error":
                generation.context["status"] = 500
                yield R.sse(error_body(f"Generation failed: {event.completion.error}.",
                                       type="server_error"))
                return
            finish = R.FINISH_REASONS[event.reason]
            if reader is not None and reader.complete and finish == "stop":
                finish = "tool_calls"
            if chat:
                last = R.chat_chunk(rid, created, model, {}, finish, with_usage=with_usage)
            else:
                last = R.completion_chunk(rid, created, model, "", finish, with_usage=with_usage)
            if self.config.monitor:
                last["choices"][0]["confidence"] = generation.confidence
            yield R.sse(last)
            if with_usage:
                c = event.completion
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield R.sse(R.usage_chunk(rid, created, model, obj,
                                          R.usage(c.prompt_tokens, c.completion_tokens)))
            yield R.sse("[DONE]")
        finally:
            if not generation.done and generation.cancel_reason is None:  # client gone
                generation.cancel("cancelled")
                generation.context["status"] = CLIENT_CLOSED


def make_request_log(config: ServeConfig, on_drift=None):
    """The server's :class:`~slmkit.monitor.log.RequestLog` (None without ``request_log``);
    MiniLM is loaded by the log's thread on its first batch, not at start-up."""
    if not config.request_log:
        return None
    from slmkit.monitor.log import RequestLog

    embed = None
    if config.log_embedder == "minilm":
        from slmkit.rag.embed import Embedder

        holder: list = []

        def embed(texts: list[str]):
            if not holder:
                holder.append(Embedder("minilm", batch_size=16))
            return holder[0].encode(texts)
    return RequestLog(config.request_log, embed=embed, embedder=config.log_embedder,
                      store_text=config.log_prompts, max_mb=config.log_max_mb,
                      max_days=config.log_max_days, on_drift=on_drift)
