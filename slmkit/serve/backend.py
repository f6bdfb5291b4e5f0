"""The engine seen from asyncio: admission control and async event streams.

:class:`~slmkit.engine.Engine` runs its continuous-batching loop in a background thread
and calls ``on_event`` from that thread. :class:`AsyncEngine` turns those callbacks into
per-request :class:`asyncio.Queue`\\ s (``loop.call_soon_threadsafe``), so a request
handler simply awaits the next event. It also owns the admission rule of the server:

* at most ``max_batch`` requests decode at once (the engine's KV-cache slots);
* at most ``max_queue`` more wait for a slot; one more is refused with 429 and a
  ``Retry-After`` estimated from recent latencies.

A request counts as in flight from :meth:`AsyncEngine.submit` until the engine delivers
its :class:`~slmkit.engine.FinishEvent` -- also after a cancel, which the engine turns
into a ``"cancelled"`` finish at its next step, freeing the slot. So ``in_flight`` never
counts a request the engine has already forgotten, and vice versa.
"""

from __future__ import annotations

import asyncio
import math
import time

from slmkit.engine import Engine, FinishEvent, SamplingParams, TokenEvent
from slmkit.serve.protocol import APIError

Event = TokenEvent | FinishEvent


class Generation:
    """One submitted request, consumed with ``await gen.next_event(deadline)``."""

    def __init__(self, handle, events: asyncio.Queue):
        self.handle, self._events = handle, events
        self.finish: FinishEvent | None = None
        #: why the server cancelled it ("cancelled" for a client that left, "timeout").
        self.cancel_reason: str | None = None
        self.context: dict = {}  # free-form data for the ``on_finish`` callback
        #: the answer's confidence summary, set at the finish when monitoring is on
        self.confidence: dict | None = None
        #: what the request log needs besides the completion (endpoint, prompt text)
        self.monitor: dict = {}

    @property
    def done(self) -> bool:
        return self.finish is not None

    async def next_event(self, deadline: float | None = None) -> Event:
        """The next event; raises :class:`TimeoutError` once ``time.monotonic() > deadline``."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            event = await asyncio.wait_for(self._events.get(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError from None
        if isinstance(event, FinishEvent):
            self.finish = event
        return event

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to stop (its slot is freed at the next engine step)."""
        if not self.done and not self.handle.done:
            self.cancel_reason = self.cancel_reason or reason
            self.handle.cancel()


class AsyncEngine:
    """Admission control plus async event delivery around one :class:`Engine`.

    Args:
        engine: a background-thread engine (``Engine(..., background=True)``).
        max_queue: requests allowed to wait when every slot is busy.
        on_finish: called on the event loop as ``on_finish(generation, finish_event)`` once
            per request when the engine is done with it (metrics, logs).

    Use only from the event loop thread (the counters are not locked).
    """

    def __init__(self, engine: Engine, max_queue: int, on_finish=None):
        if not engine.background:
            raise ValueError("AsyncEngine needs an Engine with background=True")
        self.engine = engine
        self.capacity = engine.max_batch + max_queue
        self.in_flight = 0
        self._latency_ewma = 1.0  # seconds, for Retry-After
        self.on_finish = on_finish
        self.active: set[Generation] = set()

    @property
    def running(self) -> int:
        """Requests holding a KV-cache slot (prefilling or decoding)."""
        return min(self.in_flight, self.engine.max_batch - self.engine.free_slots)

    @property
    def queue_depth(self) -> int:
        """Requests admitted but still waiting for a slot."""
        return max(0, self.in_flight - self.running)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: queue drain time estimate, 1..60."""
        waves = (self.queue_depth + 1) / self.engine.max_batch
        return int(min(60, max(1, math.ceil(waves * self._latency_ewma))))

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> Generation:
        """Admit and queue a request.

        Raises:
            APIError: 429 with ``Retry-After`` when slots and queue are full.
            ConfigError: from the engine, for a prompt it cannot hold.
        """
        if self.in_flight >= self.capacity:
            raise APIError(429, f"The server is at capacity ({self.engine.max_batch} running, "
                           f"{self.capacity - self.engine.max_batch} queued); retry later.",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after())})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        started = time.monotonic()

        generation: Generation | None = None

        def finished(event: FinishEvent) -> None:
            self.in_flight -= 1
            self.active.discard(generation)
            self._latency_ewma = 0.8 * self._latency_ewma + 0.2 * (time.monotonic() - started)
            if self.on_finish is not None:
                self.on_finish(generation, event)

        def deliver(event: Event) -> None:  # event loop; bookkeeping before the reader wakes
            if isinstance(event, FinishEvent):
                finished(event)
            events.put_nowait(event)

        def on_event(event: Event) -> None:  # engine thread
            loop.call_soon_threadsafe(deliver, event)

        handle = self.engine.submit(prompt_ids, params, on_event=on_event,
                                    request_id=request_id)
        self.in_flight += 1
        generation = Generation(handle, events)
        self.active.add(generation)
        return generation

    def drain(self, reason: str = "shutdown") -> int:
        """Cancel every request in flight (server shutdown); returns how many."""
        for generation in list(self.active):
            generation.cancel(reason)
        return len(self.active)

    def close(self) -> None:
        """Cancel everything and stop the engine thread."""
        self.engine.close()
