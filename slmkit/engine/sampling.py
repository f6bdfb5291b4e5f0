"""Sampling parameters and the per-request sampler.

Each request owns its sampler, with its own ``torch.Generator``: a seeded request draws
the same tokens whether it runs alone or inside a batch, because no random state is
shared between requests.

The processing order matches ``transformers`` ``generate()``: repetition penalty, then
temperature, top-k, top-p, min-p, then a multinomial draw (or argmax when
``temperature == 0``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from slmkit.engine import native, ops
from slmkit.engine.grammar import Grammar
from slmkit.errors import ConfigError


@dataclass
class SamplingParams:
    """How one request is decoded.

    Attributes:
        max_tokens: new tokens to generate at most (finish reason ``"length"``).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        min_p: drop tokens below ``min_p * p_max`` (0 = off).
        repetition_penalty: CTRL penalty over prompt and output tokens (1.0 = off).
        seed: seed of this request's generator; None draws a fresh random seed.
        stop: stop strings. Generation ends when the text contains one; the text returned
            ends just before it (the stop string is not included).
        stop_token_ids: extra token ids that end generation (not included in the text).
        ignore_eos: do not stop at the model's end-of-sequence tokens.
        logprobs: report the log-probability of each chosen token.
        top_logprobs: also report the N most likely alternatives at each step.
        grammar: the output must match this :class:`~slmkit.engine.grammar.Grammar` (a JSON
            schema, a Lark grammar or a regex); tokens it forbids are never chosen, and the
            request ends with ``"stop"`` once the grammar is complete.
        confidence: record each generated token's log-probability, the entropy of the
            distribution it was drawn from and its margin over the best other token
            (``Completion.confidence``; what :mod:`slmkit.monitor.confidence` summarises).
            Costs one ``log_softmax`` and one top-2 per token.

    Log-probabilities are those of the model's raw distribution (``log_softmax`` of the
    logits before penalty, temperature and filters), so they can be compared across
    sampling settings and summed into a sequence log-likelihood.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: Grammar | None = None
    confidence: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0 turns it off)"),
            (0 <= self.top_logprobs <= 20, "top_logprobs must be between 0 and 20"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Invalid sampling parameters: {message}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Choice:
    """One sampled token with its log-probability information."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    #: entropy (nats) of the model's raw distribution at this step, with ``confidence``
    entropy: float | None = None
    #: with ``confidence``: ``logprob`` minus the best other token's log-probability (the
    #: top-1 / top-2 margin for a greedy choice; negative when a sample took a lesser token)
    margin: float | None = None


class RequestSampler:
    """Turns one request's logits into tokens; holds its generator and its seen tokens.

    Args:
        params: the request's sampling parameters.
        prompt_ids: the prompt (counts for the repetition penalty, as in transformers).
    """

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._seen = list(prompt_ids)
        self._seen_tensor: torch.Tensor | None = None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no repetition penalty: the token is the logits' argmax."""
        return self.params.greedy and self.params.repetition_penalty == 1.0

    def penalized(self, logits: torch.Tensor, extra: list[int] = ()) -> torch.Tensor:
        """``[V]`` float32 logits after the repetition penalty over the seen tokens and
        ``extra`` (tokens after them: speculative decoding's drafts)."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty == 1.0:
            return logits
        if extra:
            seen = torch.tensor(self._seen + list(extra), dtype=torch.long)
        else:
            if self._seen_tensor is None or self._seen_tensor.numel() != len(self._seen):
                self._seen_tensor = torch.tensor(self._seen, dtype=torch.long)
            seen = self._seen_tensor
        return ops.apply_repetition_penalty(logits, seen, p.repetition_penalty)

    def distribution(self, logits: torch.Tensor, extra: list[int] = ()) -> torch.Tensor:
        """The ``[V]`` probabilities a sampled request (temperature > 0) draws its next token
        from: penalty (over the seen tokens and ``extra``), temperature, top-k, top-p, min-p."""
        p = self.params
        processed = self.penalized(logits, extra) / p.temperature
        processed = ops.filter_top_k(processed, p.top_k)
        processed = ops.filter_top_p(processed, p.top_p)
        processed = ops.filter_min_p(processed, p.min_p)
        return torch.softmax(processed, dim=-1)

    def choose(self, logits: torch.Tensor, argmax: int | None = None,
               raw: torch.Tensor | None = None, token: int | None = None) -> Choice:
        """Pick the next token from ``[V]`` float32 logits and record it as seen.

        ``argmax``: the logits' argmax when the caller already has it (a batched argmax);
        used only when :attr:`plain_greedy`. ``raw``: the model's logits before a grammar
        mask was applied to ``logits`` (log-probabilities are reported from these).
        ``token``: the token is already decided (speculative decoding's rejection rule drew
        it from :meth:`distribution`); it is recorded with its log-probabilities.
        """
        p = self.params
        logits = logits.float()
        if token is not None:
            token = int(token)
        elif p.greedy:
            token = argmax if argmax is not None and self.plain_greedy else \
                int(torch.argmax(self.penalized(logits)))
        else:
            probs = self.distribution(logits)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self._seen.append(token)
        choice = Choice(token)
        source = logits if raw is None else raw.float()
        if p.confidence and not p.top_logprobs:  # one native pass, when built
            fast = native.confidence(source, token)
            if fast is not None:
                choice.logprob, choice.entropy, other = fast
                # a grammar that allows one token leaves no rival: no margin is recorded
                choice.margin = float(source[token]) - other if math.isfinite(other) else None
                return choice
        if p.logprobs or p.top_logprobs or p.confidence:
            logprobs = torch.log_softmax(source, dim=-1)
            choice.logprob = float(logprobs[token])
            if p.confidence:  # H = -sum p log p; 0 * -inf counts as 0
                probs = logprobs.exp()
                choice.entropy = float(-torch.special.xlogy(probs, probs).sum())
                top = torch.topk(logprobs, 2)
                other = float(top.values[1] if int(top.indices[0]) == token else top.values[0])
                # a grammar that allows one token leaves no rival: no margin is recorded
                # (the monitor then bounds it from the token's own probability)
                choice.margin = choice.logprob - other if math.isfinite(other) else None
            if p.top_logprobs:
                choice.top_logprobs = ops.top_logprobs(logprobs, p.top_logprobs)
        return choice
