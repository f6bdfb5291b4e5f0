"""Continuous-batching generation engine (thread-safe; the server builds on this).

Usage::

    engine = Engine(model, tokenizer, max_batch=8)
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    for event in handle:          # TokenEvent ..., then one FinishEvent
        print(event.text, end="")
    completion = handle.result()  # token_ids, text, finish_reason, logprobs, timings
    engine.close()

Scheduling (Yu et al. 2022, "Orca", OSDI: iteration-level scheduling). Each
:meth:`Engine.step`:

1. takes in new submissions and cancellations (a cancelled request's slot is free at once);
2. gives free cache slots to waiting requests, first come first served;
3. decodes one token for every running request, all in one batched forward;
4. prefills waiting prompts for at most ``prefill_chunk`` tokens (chunked prefill, so a
   long newcomer never stalls the running streams for more than one chunk).

Requests join and leave between steps. Each request has its own sampler and generator,
so its output does not depend on what else is in the batch.

Constrained decoding: a request with ``SamplingParams.grammar`` holds a
:class:`~slmkit.engine.grammar.GrammarState`. Right after each forward the rows of
constrained requests get their token masks (``-inf`` for forbidden tokens, on either
path, before the batched argmax), and each chosen token advances its row's state.

Threading: :meth:`submit`, :meth:`RequestHandle.cancel` and the handle's iterators are
safe from any thread. By default a background thread runs the step loop; with
``background=False`` nothing runs until someone calls :meth:`step` (iterating a handle
does that for you), which is handy for tests and single-threaded scripts.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from slmkit.engine import native
from slmkit.engine.events import Completion, FinishEvent, TokenEvent
from slmkit.engine.grammar import GrammarCompiler, GrammarState, mask_rows_
from slmkit.engine.runner import make_runner
from slmkit.engine.sampling import RequestSampler, SamplingParams
from slmkit.engine.text import IncrementalDetokenizer, StopStringFilter
from slmkit.errors import ConfigError
from slmkit.models import arch

_ids = itertools.count()
Event = TokenEvent | FinishEvent


def physical_cores() -> int:
    """Physical CPU cores (the best thread count for bandwidth-bound decoding)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or torch.get_num_threads()
    except ImportError:  # pragma: no cover - psutil is a dependency
        return torch.get_num_threads()


def eos_ids(model, tokenizer=None) -> set[int]:
    """End-of-sequence ids as ``generate()`` sees them (generation config, then config)."""
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            return set(value) if isinstance(value, (list, tuple)) else {int(value)}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return {int(tokenizer.eos_token_id)}
    return set()


class RequestHandle:
    """A submitted request: iterate it for events, wait for its result, or cancel it."""

    def __init__(self, engine: Engine, request_id: str):
        self.id = request_id
        self._engine = engine
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self.completion: Completion | None = None
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop this request; its cache slot is freed at the next step (no-op when done)."""
        self.cancelled = True
        self._engine._wake()

    def __iter__(self) -> Iterator[Event]:
        """Yield :class:`TokenEvent`\\ s and finally one :class:`FinishEvent` (blocking)."""
        while True:
            event = self._next_event()
            yield event
            if isinstance(event, FinishEvent):
                return

    def text_deltas(self) -> Iterator[str]:
        """Only the non-empty text deltas."""
        for event in self:
            if event.text:
                yield event.text

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends and return its :class:`Completion`."""
        if not self._engine.background:
            while not self.done:
                self._engine.step()
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.completion

    def _next_event(self) -> Event:
        if self._engine.background:
            return self._events.get()
        while self._events.empty():
            self._engine.step()
        return self._events.get_nowait()


class _Request:
    """Engine-internal state of one request."""

    def __init__(self, handle: RequestHandle, prompt_ids: list[int], params: SamplingParams,
                 tokenizer, on_event: Callable[[Event], None] | None,
                 grammar: GrammarState | None = None, eos: set[int] = frozenset()):
        self.handle = handle
        self.grammar = grammar
        #: tokens that end this request (allowed under a grammar once it accepts)
        self.stop_ids = [] if grammar is None else sorted(
            set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos)))
        self.prompt = prompt_ids
        self.params = params
        self.sampler = RequestSampler(params, prompt_ids)
        self.on_event = on_event
        self.slot: int | None = None
        self.prefilled = 0
        self.next_token: int | None = None
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stops = StopStringFilter(params.stop)
        self.completion = Completion(request_id=handle.id, prompt_ids=list(prompt_ids),
                                     logprobs=[] if params.logprobs else None,
                                     top_logprobs=[] if params.top_logprobs else None,
                                     confidence=[] if params.confidence else None)
        self.t0 = time.perf_counter()
        self.hidden_sum = None      # the tapped hidden states' sum (Engine.set_hidden_tap)
        self.hidden_n = 0
        self.hidden_ok = True

    @property
    def position(self) -> int:
        """Tokens in this request's cache."""
        return self.prefilled + max(0, len(self.completion.token_ids) - 1)


class Engine:
    """Continuous-batching generation over one model.

    Args:
        model: a causal LM from :func:`slmkit.load_model` (dense, quantized, low-rank,
            pruned or adapted); Llama/Qwen2/Mistral run on the fast path, others on the
            generic path.
        tokenizer: for text deltas and stop strings; None gives token ids only.
        max_batch: concurrent requests (KV cache slots). Others wait in a queue.
        max_seq_len: prompt plus output tokens per request (default: the model's context,
            at most 2048). The fast path preallocates ``max_batch * max_seq_len`` tokens of
            KV cache.
        prefill_chunk: prompt tokens prefilled per step.
        fast: None = automatic, False = force the generic path, True = require fast.
        threads: torch threads (default: physical cores).
        background: run the step loop in a daemon thread.
        kv_cache: KV cache dtype on the fast path: ``"auto"`` (fp16 for quantized fp32
            models, else the model's dtype), ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"int8"``
            (codes plus one scale per cached row: half of fp16's bytes).
        draft: speculative decoding (:mod:`slmkit.engine.speculative`): ``"ngram"``
            (prompt lookup), a draft model directory or built-in name sharing the
            tokenizer, or a drafter object; None decodes without drafts.
    """

    def __init__(self, model, tokenizer=None, *, max_batch: int = 8,
                 max_seq_len: int | None = None, prefill_chunk: int = 256,
                 fast: bool | None = None, threads: int | None = None, background: bool = True,
                 kv_cache: str = "auto", draft=None):
        if max_batch < 1 or prefill_chunk < 1:
            raise ConfigError(f"max_batch ({max_batch}) and prefill_chunk ({prefill_chunk}) "
                              "must be at least 1.")
        torch.set_num_threads(threads or physical_cores())
        context = arch.context_length(model.config) or 2048
        self.max_seq_len = int(max_seq_len or min(context, 2048))
        self.model, self.tokenizer = model, tokenizer
        self.runner = make_runner(model, max_batch, self.max_seq_len, fast=fast,
                                  kv_cache=kv_cache)
        from slmkit.models.presets import output_vocab_size

        self.vocab_size = output_vocab_size(model)
        self.eos = eos_ids(model, tokenizer)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.background = background
        self._cond = threading.Condition()
        self._inbox: list[_Request] = []
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []  # holding a slot: prefilling or decoding
        self._free_slots = list(range(max_batch))
        self._step_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._bitmask: torch.Tensor | None = None  # [max_batch, ceil(V / 32)] int32
        self.spec = None
        if draft is not None:
            from slmkit.engine.speculative import Speculator, make_drafter

            self.spec = Speculator(self, make_drafter(draft, self))
        if background:
            self._thread = threading.Thread(target=self._loop, name="slmkit-engine", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ public API

    @property
    def fast(self) -> bool:
        """True when the model runs on the fast (static KV cache) path."""
        return self.runner.fast

    @property
    def path(self) -> str:
        """Which code runs decode steps, in words (``slm generate`` prints it)."""
        if not self.runner.fast:
            return "generic (transformers forward)"
        native = getattr(self.runner, "native", None)
        if native is not None:
            return "native decode step (static KV cache)"
        return f"torch loop (static KV cache; native step off: {self.runner.native_reason})"

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler for this engine's tokenizer (built on first use).

        Raises:
            ConfigError: the engine has no tokenizer.
        """
        with self._grammar_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise ConfigError("Constrained decoding (a grammar or JSON schema) needs a "
                                      "tokenizer; pass one to Engine(...).")
                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
            return self._grammars

    @property
    def free_slots(self) -> int:
        with self._cond:
            return len(self._free_slots)

    @property
    def num_running(self) -> int:
        return len(self._active)

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
               on_event: Callable[[Event], None] | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue a request; returns at once.

        Args:
            prompt_ids: the prompt's token ids (non-empty).
            params: sampling parameters (default: ``SamplingParams()``).
            on_event: optional callback called with every event *from the engine thread*
                (keep it short, e.g. ``loop.call_soon_threadsafe(queue.put_nowait, ev)``).
                Events are also queued on the handle either way.
            request_id: your own id (default: ``"req-N"``).

        Raises:
            ConfigError: empty or too long prompt, ids outside the vocabulary, bad params,
                stop strings without a tokenizer, or a closed engine.
            GrammarError: a grammar that cannot be enforced (a ConfigError naming it).
        """
        params = params or SamplingParams()
        params.validate()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ConfigError("The prompt is empty; pass at least one token id.")
        if len(prompt) >= self.max_seq_len:
            raise ConfigError(f"The prompt has {len(prompt)} tokens but the engine holds at most "
                              f"{self.max_seq_len} per request; shorten it or raise max_seq_len.")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError(f"Prompt token id {bad[0]} is outside the vocabulary "
                              f"(0..{self.vocab_size - 1}); encode with this model's tokenizer.")
        if params.stop and self.tokenizer is None:
            raise ConfigError("Stop strings need a tokenizer; pass one to Engine(...) or use "
                              "stop_token_ids.")
        grammar = None if params.grammar is None else self.grammars.state(
            params.grammar, budget=min(params.max_tokens, self.max_seq_len - len(prompt) + 1))
        handle = RequestHandle(self, request_id or f"req-{next(_ids)}")
        request = _Request(handle, prompt, params, self.tokenizer, on_event, grammar, self.eos)
        with self._cond:
            if self._closed:
                raise ConfigError("This engine is closed; create a new Engine.")
            self._inbox.append(request)
            self._cond.notify_all()
        return handle

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Completion:
        """Submit and wait: the blocking one-call form."""
        return self.submit(prompt_ids, params).result()

    def step(self) -> int:
        """Run one scheduling iteration (see the module doc); returns requests still active.

        Called by the background thread; call it yourself only with ``background=False``.
        """
        with self._step_lock:
            try:
                self._step()
            except Exception as e:  # a bug or an OOM: fail every request, keep the engine
                self._fail_all(f"{type(e).__name__}: {e}")
                if not self.background:
                    raise
            with self._cond:
                return len(self._active) + len(self._waiting) + len(self._inbox)

    def close(self) -> None:
        """Cancel everything and stop the background thread."""
        with self._cond:
            self._closed = True
            for r in self._inbox + list(self._waiting) + self._active:
                r.handle.cancelled = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self.step()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._waiting or self._active or self._closed):
                    self._cond.wait()
                closing = self._closed
            self.step()
            if closing:
                with self._cond:
                    if not (self._inbox or self._waiting or self._active):
                        return

    def _step(self) -> None:
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        for r in [r for r in list(self._waiting) + self._active if r.handle.cancelled]:
            self._finish(r, "cancelled")
        while self._waiting and self._free_slots:
            r = self._waiting.popleft()
            with self._cond:
                r.slot = self._free_slots.pop(0)
            self._active.append(r)
        decoding = [r for r in self._active if r.next_token is not None]
        if decoding:
            decoding.sort(key=lambda r: r.slot)
            (self.spec.step if self.spec is not None else self._decode)(decoding)
        budget = self.prefill_chunk
        for r in [r for r in self._active if r.next_token is None and r.slot is not None]:
            if budget <= 0:
                break
            n = min(budget, len(r.prompt) - r.prefilled)
            chunk = torch.tensor([r.prompt[r.prefilled:r.prefilled + n]])  # [1, n]
            logits = self.runner.forward(chunk, [r.slot], [r.prefilled])   # [1, V]
            r.prefilled += n
            budget -= n
            if r.prefilled == len(r.prompt):
                raw = self._constrain([r], logits)
                self._emit_token(r, logits[0], None, raw.get(0))

    def _decode(self, decoding: list[_Request]) -> None:
        """One token for each decoding request (sorted by slot), in one batched forward."""
        tokens = torch.tensor([[r.next_token] for r in decoding])   # [B, 1]
        logits = self.runner.forward(tokens, [r.slot for r in decoding],
                                     [r.position for r in decoding])  # [B, V]
        if self.runner.tap_after:
            self._take_taps(decoding, self.runner.tapped)
        raw = self._constrain(decoding, logits)
        # one argmax over the batch for the greedy rows (a call per row cost ~0.1 ms)
        greedy = native.argmax_rows(logits) if any(
            r.sampler.plain_greedy for r in decoding) else [None] * len(decoding)
        for i, (r, row, best) in enumerate(zip(decoding, logits, greedy)):
            self._emit_token(r, row, best, raw.get(i))

    def set_hidden_tap(self, after: int) -> None:
        """Keep, for requests with confidence on, the mean hidden state after ``after``
        blocks over their generated tokens (``Completion.hidden_mean``; 0: off)."""
        self.runner.set_tap(after)

    @staticmethod
    def _take_taps(decoding: list[_Request], tapped: torch.Tensor | None) -> None:
        for i, r in enumerate(decoding):
            if r.completion.confidence is None or not r.hidden_ok:
                continue
            if tapped is None:
                r.hidden_ok = False
            else:
                r.hidden_sum = tapped[i].clone() if r.hidden_sum is None \
                    else r.hidden_sum.add_(tapped[i])
                r.hidden_n += 1

    def _constrain(self, reqs: list[_Request], logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """Mask, in place, the ``[B, V]`` logits rows of requests under a grammar.

        Returns ``{row: unmasked copy}`` for the constrained rows that report logprobs.
        """
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return {}
        raw = {i: logits[i].clone() for i in rows
               if reqs[i].params.logprobs or reqs[i].params.top_logprobs}
        if self._bitmask is None:
            self._bitmask = torch.empty(self.max_batch, self.grammars.words, dtype=torch.int32)
        bitmask = self._bitmask[:len(rows)]
        for j, i in enumerate(rows):
            r = reqs[i]
            r.grammar.fill(bitmask, j)
            r.grammar.allow_stops(bitmask, j, r.stop_ids)
        mask_rows_(logits, rows, bitmask)
        return raw

    def _emit_token(self, r: _Request, logits: torch.Tensor, best: int | None = None,
                    raw: torch.Tensor | None = None, token: int | None = None) -> None:
        choice = r.sampler.choose(logits, best, raw, token)
        grammar_done = False
        if r.grammar is not None and choice.token_id not in r.stop_ids:
            n = len(r.completion.token_ids)  # tokens left, this one included:
            left = min(r.params.max_tokens - n, self.max_seq_len - r.prefilled - n + 1)
            taken = r.grammar.advance_within(choice.token_id, left, r.stop_ids)
            if taken is None:  # a bug: the mask allowed it
                self._finish(r, "error", error=f"the grammar rejected token "
                             f"{choice.token_id} ({r.grammar.error})")
                return
            if taken != choice.token_id:  # the budget closes the output: record the token
                choice = r.sampler.choose(logits, None, raw, taken)  # the closing plan took
                del r.sampler._seen[-2]  # the replaced choice was never emitted
            grammar_done = r.grammar.finished
        c, p = r.completion, r.params
        index = len(c.token_ids)
        c.token_ids.append(choice.token_id)
        if c.ttft_s is None:
            c.ttft_s = time.perf_counter() - r.t0
        if c.logprobs is not None:
            c.logprobs.append(choice.logprob)
        if c.top_logprobs is not None:
            c.top_logprobs.append(choice.top_logprobs)
        is_stop_token = choice.token_id in p.stop_token_ids or (
            not p.ignore_eos and choice.token_id in self.eos)
        text, stopped = "", False
        if not is_stop_token and r.detok is not None:
            text, stopped = r.stops.push(r.detok.add(choice.token_id))
        if c.confidence is not None and not is_stop_token:
            c.confidence.append((choice.logprob, choice.entropy, len(c.text), choice.margin))
        c.text += text
        self._deliver(r, TokenEvent(r.handle.id, index, choice.token_id, text, choice.logprob,
                                    choice.top_logprobs))
        r.next_token = choice.token_id
        if is_stop_token or stopped or grammar_done:  # "length" if the budget closed it
            self._finish(r, "length" if r.grammar is not None and r.grammar.forced else "stop")
        elif len(c.token_ids) >= p.max_tokens or r.position >= self.max_seq_len:
            self._finish(r, "length")

    def _finish(self, r: _Request, reason: str, error: str | None = None) -> None:
        tail = ""
        if r.detok is not None and not r.stops.stopped:
            tail, stopped = r.stops.push(r.detok.flush())
            tail += "" if stopped else r.stops.flush()
        c = r.completion
        c.text += tail
        c.finish_reason, c.error = reason, error
        if r.hidden_ok and r.hidden_n and r.hidden_sum is not None:
            c.hidden_mean = (r.hidden_sum / r.hidden_n).tolist()
        c.duration_s = time.perf_counter() - r.t0
        if r in self._active:
            self._active.remove(r)
        if r in self._waiting:
            self._waiting.remove(r)
        if self.spec is not None:
            self.spec.release(r)
        if r.slot is not None:
            self.runner.release(r.slot)
            with self._cond:
                self._free_slots.append(r.slot)
                self._free_slots.sort()
            r.slot = None
        r.handle.completion = c
        self._deliver(r, FinishEvent(r.handle.id, reason, tail, c))
        r.handle._done.set()

    def _deliver(self, r: _Request, event: Event) -> None:
        r.handle._events.put(event)
        if r.on_event is not None:
            try:
                r.on_event(event)
            except Exception:  # a client callback must never break the engine
                r.on_event = None

    def _fail_all(self, message: str) -> None:
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        for r in list(self._waiting) + list(self._active):
            self._finish(r, "error", error=message)
