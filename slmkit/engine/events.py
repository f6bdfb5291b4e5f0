"""What the engine reports: per-token events, the finish event and the final completion.

A client consumes a request as a stream of events. Every event has a ``text`` field that
is a *delta*: appending ``event.text`` of every event, in order, gives the final text
(``Completion.text``). The last event of every request is a :class:`FinishEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Finish reasons: a stop token/string was hit, max_tokens or the context ran out, the
#: client cancelled, or the engine failed (``FinishEvent.error`` says why).
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token.

    Attributes:
        request_id: the request it belongs to.
        index: 0 for the first generated token, then 1, 2, ...
        token_id: the token.
        text: newly completed text (may be "" while a multi-byte character or a possible
            stop string is incomplete, or for a stop token).
        logprob: log-probability of ``token_id`` under the model (if requested).
        top_logprobs: the most likely ``(token_id, logprob)`` alternatives (if requested).
    """

    request_id: str
    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Completion:
    """The full result of one request.

    Attributes:
        token_ids: generated ids, including a final stop/eos token when one ended it
            (its text is not part of ``text``).
        text: the generated text (without any stop string).
        finish_reason: one of :data:`FINISH_REASONS`.
        logprobs, top_logprobs: per generated token, when requested (else None).
        speculative: with drafts (``Engine(draft=...)``), what drafting did: drafted and
            accepted tokens, steps with and without drafts, the final k, and why it turned
            itself off (None while it paid).
        ttft_s: seconds from submission to the first token.
        duration_s: seconds from submission to the end.
        error: for ``finish_reason == "error"``, what went wrong.
        confidence: with ``SamplingParams.confidence``, one ``(logprob, entropy, offset,
            margin)`` per generated token except a final stop token: its log-probability,
            the entropy (nats) of the distribution it was drawn from, where its text starts
            in ``text`` (characters; a token whose text is held back, e.g. a partial stop
            string, gets the offset at the time it was generated), and its log-probability
            minus the best other token's (the top-1 / top-2 margin of a greedy choice).
        hidden_mean: with confidence on and a hidden-state tap set
            (:meth:`~slmkit.engine.Engine.set_hidden_tap`), the mean over the generated
            tokens fed back as inputs of the hidden state after the tapped block (the
            monitor's probe reads it); None when some step had no tap (the generic runner,
            speculative verification) or no token was fed back.
    """

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    speculative: dict | None = None
    ttft_s: float | None = None
    duration_s: float | None = None
    error: str | None = None
    confidence: list[tuple[float, float, int, float]] | None = None
    hidden_mean: list[float] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generated tokens after the first, per second after the first token."""
        if self.ttft_s is None or self.duration_s is None or self.completion_tokens < 2:
            return None
        span = self.duration_s - self.ttft_s
        return (self.completion_tokens - 1) / span if span > 0 else None


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a request.

    Attributes:
        request_id: the request.
        reason: one of :data:`FINISH_REASONS`.
        text: any text released only at the end (usually "").
        completion: the full result.
    """

    request_id: str
    reason: str
    text: str
    completion: Completion
