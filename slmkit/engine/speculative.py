"""Speculative decoding: a draft proposes k tokens, the target verifies them in one step.

A decode step of a small model on a CPU streams every weight once for however few rows it
runs, so checking ``k`` guessed tokens costs little more than generating one. The
:class:`Speculator` rides along the engine's continuous batching: each step, every decoding
request whose draft has a guess contributes its last token plus ``k`` drafts as ``k + 1``
rows, the others one row, and the target runs all rows in one batched call
(:meth:`~slmkit.engine.runner.FastRunner.forward_rows`; on the native step each row is
computed exactly as a decode step would compute it).

Acceptance (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", ICML; Chen et al. 2023, arXiv:2302.01318):

* greedy requests keep drafts while each equals the target's argmax at its row, then take
  the target's own token, so the output is the output without drafts;
* sampled requests accept draft ``d`` with probability ``min(1, p(d) / q(d))`` and on
  rejection draw from ``norm(max(0, p - q))`` (:func:`accept_sampled`), where ``p`` is the
  target's processed distribution (penalty, temperature, top-k/p, min-p) and ``q`` the
  draft's (one-hot for prompt lookup), so every token follows ``p`` exactly. When all
  drafts pass, the last row gives one more token from ``p``.

Drafts: :class:`NgramDrafter` (prompt lookup: the continuation of the latest earlier
occurrence of the last 2-3 tokens in the prompt and the output so far; Saxena 2023,
"Prompt Lookup Decoding") and :class:`ModelDrafter` (a small model sharing the tokenizer,
e.g. a student distilled from the target, with its own KV cache slots).

Pay-off (:class:`SpecState`): k starts at the drafter's ``k0`` (4 for prompt lookup, whose
drafts are free; 2 for a draft model, whose every draft costs one of its steps), grows by
one when all drafts pass and shrinks by one when one fails (1..k_max). A request drafts from
its first decode step; after a few drafted steps it runs two steps without drafts to time a
plain token (and one more every 32 drafted steps), and stops drafting when its time per
token with drafts is not below its plain time per token (a draft model's prefill of the
prompt left out: it is paid once, like the target's). ``Completion.speculative["off"]``
says why.
Requests under a grammar decode without drafts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from slmkit.errors import ConfigError


def accept_sampled(p: torch.Tensor, q: torch.Tensor | None, draft: int,
                   generator: torch.Generator) -> tuple[bool, int]:
    """The rejection rule for one drafted token.

    Args:
        p: ``[V]`` target probabilities at this position.
        q: ``[V]`` draft probabilities the draft was drawn from (None: the draft was
            deterministic, ``q`` is one-hot at ``draft``).
        draft: the drafted token.
        generator: the request's generator.

    Returns:
        ``(accepted, token)``: the draft itself, or a token from ``norm(max(0, p - q))``.
        Either way, the token is distributed as ``p`` (tested statistically).
    """
    qd = 1.0 if q is None else float(q[draft])
    pd = float(p[draft])
    u = float(torch.rand((), generator=generator))
    if qd > 0 and u * qd < pd:          # u < p/q without dividing
        return True, draft
    if q is None:
        residual = p.clone()
        residual[draft] = 0
    else:
        residual = (p - q).clamp_min_(0)
    total = float(residual.sum())
    if total <= 0:                      # p == q up to rounding: any draw from p is right
        residual = p
    return False, int(torch.multinomial(residual, 1, generator=generator))


def draft_reason(runner) -> str | None:
    """Why ``runner`` cannot verify drafts (None when it can)."""
    if not all(hasattr(runner, a) for a in ("forward_rows", "truncate", "draft_reason")):
        return f"the engine's {type(runner).__name__} has no draft verification"
    return runner.draft_reason()


# --------------------------------------------------------------------------- drafts


class NgramDrafter:
    """Prompt lookup: propose what followed the latest earlier occurrence of the last n
    tokens (n from ``max_n`` down to ``min_n``) in the prompt and the output so far.

    Per request it keeps a dict from each n-gram to the positions after its first and its
    latest occurrence, updated with the new tokens each step (O(new tokens) per step). The
    latest occurrence is used unless fewer than k tokens follow it (a run of repeats).
    """

    name = "ngram"
    k0 = 4      #: drafts to start with: a lookup costs nothing, only the verify rows

    def __init__(self, max_n: int = 3, min_n: int = 2):
        if not 1 <= min_n <= max_n:
            raise ConfigError(f"n-gram sizes must satisfy 1 <= min_n <= max_n (got {min_n}, "
                              f"{max_n}).")
        self.max_n, self.min_n = max_n, min_n
        self._index: dict[int, tuple[dict, list[int]]] = {}  # request key -> (grams, seq)

    def propose(self, reqs: list, ks: list[int]) -> list[tuple[list[int], list | None]]:
        out = []
        for r, k in zip(reqs, ks):
            grams, seq = self._index.setdefault(id(r), ({}, []))
            full_len = len(r.prompt) + len(r.completion.token_ids)
            start = len(seq)
            seq.extend(r.prompt[start:] if start < len(r.prompt) else [])
            seq.extend(r.completion.token_ids[len(seq) - len(r.prompt):])
            # index n-grams ending before each new position e: [first e, latest e] (e is
            # where what followed them starts)
            for e in range(max(1, start), full_len):
                for n in range(self.min_n, self.max_n + 1):
                    if e >= n:
                        seen = grams.setdefault(tuple(seq[e - n:e]), [e, e])
                        seen[1] = e
            drafts: list[int] = []
            for n in range(self.max_n, self.min_n - 1, -1):
                if full_len < n:
                    continue
                hit = grams.get(tuple(seq[full_len - n:]))
                if hit is not None:   # the latest, unless it is too close to the end
                    e = hit[1] if full_len - hit[1] >= k else hit[0]
                    drafts = seq[e:e + k]
                    break
            out.append((drafts, None))
        return out

    def accepted(self, r, seq_len: int, n_accepted: int, n_drafted: int) -> None:
        pass

    def release(self, r) -> None:
        self._index.pop(id(r), None)


def check_shared_tokenizer(target_tok, draft_tok, where: str) -> None:
    """Refuse a draft whose tokenizer maps text to ids differently from the target's."""
    if target_tok is None:
        raise ConfigError("A draft model needs the target's tokenizer to check that the draft "
                          "shares it; pass one to Engine(...).")
    if draft_tok is None:
        raise ConfigError(f"The draft model {where} has no tokenizer; a draft must share the "
                          "target's tokenizer (copy its tokenizer files).")
    if draft_tok.get_vocab() != target_tok.get_vocab():
        raise ConfigError(f"The draft model {where} has a different tokenizer from the target "
                          "(their vocabularies differ); a draft must share the target's "
                          "tokenizer, e.g. a student distilled from it.")


class ModelDrafter:
    """A small causal LM that shares the target's tokenizer, with its own KV cache slots
    (same slot numbers as the target's requests).

    Args:
        model: the draft LM (any model the engine runs; the fast path when it fits).
        n_slots, max_seq_len: as the target engine's.
        vocab: the target's output vocabulary (draft logits are cut or padded to it).
        name: for reports.
    """

    #: drafts to start with: each costs a draft step, so a request whose drafts fail wastes
    #: 2 + 1 + 1 + 1 of them before the pay-off check, not 4 + 3 + 2 + 1
    k0 = 2

    def __init__(self, model, n_slots: int, max_seq_len: int, vocab: int, name: str = "model",
                 prefill_chunk: int = 256):
        from slmkit.engine.runner import make_runner

        self.runner = make_runner(model, n_slots, max_seq_len)
        reason = draft_reason(self.runner)
        if reason is not None:
            raise ConfigError(f"The draft model {name}: {reason}.")
        self.vocab, self.name, self.chunk = vocab, name, prefill_chunk
        self._pos: dict[int, int] = {}   # request key -> tokens in the draft's cache
        self._sunk: dict[int, float] = {}   # request key -> seconds of its prompt's prefill

    def sunk(self, r) -> float:
        """Seconds this step spent prefilling ``r``'s prompt into the draft's cache (once
        per request: a cost of the prompt, like the target's prefill, so the pay-off check
        leaves it out); 0 after the first call."""
        return self._sunk.pop(id(r), 0.0)

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, Vd]`` draft logits as ``[B, V]`` over the target's vocabulary."""
        Vd = logits.shape[-1]
        if Vd == self.vocab:
            return logits
        if Vd > self.vocab:
            return logits[..., :self.vocab]
        pad = logits.new_full((*logits.shape[:-1], self.vocab - Vd), float("-inf"))
        return torch.cat([logits, pad], -1)

    def _pick(self, r, logits: torch.Tensor, drafts: list[int]) -> tuple[int, torch.Tensor | None]:
        if r.params.greedy:
            return int(torch.argmax(logits)), None
        q = r.sampler.distribution(logits, drafts)
        return int(torch.multinomial(q, 1, generator=r.sampler.generator)), q

    def propose(self, reqs: list, ks: list[int]) -> list[tuple[list[int], list | None]]:
        drafts: list[list[int]] = [[] for _ in reqs]
        qs: list[list] = [[] for _ in reqs]
        last = []
        for i, r in enumerate(reqs):   # catch up with the tokens the draft has not seen
            seq = r.prompt + r.completion.token_ids
            pos = self._pos.get(id(r), 0)
            logits = None
            t0 = time.perf_counter() if pos == 0 else None
            while pos < len(seq):
                chunk = seq[pos:pos + self.chunk]
                logits = self.runner.forward(torch.tensor([chunk]), [r.slot], [pos])
                pos += len(chunk)
            self._pos[id(r)] = pos
            if t0 is not None:
                self._sunk[id(r)] = time.perf_counter() - t0
            token, q = self._pick(r, self._fit(logits[0]), [])
            drafts[i].append(token)
            qs[i].append(q)
            last.append(token)
        for j in range(1, max(ks)):    # then one batched step per further draft
            live = [i for i, k in enumerate(ks) if k > j]
            tokens = torch.tensor([[drafts[i][-1]] for i in live])
            slots = [reqs[i].slot for i in live]
            starts = [self._pos[id(reqs[i])] for i in live]
            logits = self._fit(self.runner.forward(tokens, slots, starts))   # [B, V]
            for b, i in enumerate(live):
                self._pos[id(reqs[i])] += 1
                token, q = self._pick(reqs[i], logits[b], drafts[i])
                drafts[i].append(token)
                qs[i].append(q)
        return [(d, None if reqs[i].params.greedy else qs[i]) for i, d in enumerate(drafts)]

    def accepted(self, r, seq_len: int, n_accepted: int, n_drafted: int) -> None:
        """The draft's cache stays valid up to the accepted drafts it has seen."""
        key = id(r)
        if key in self._pos:
            self._pos[key] = min(self._pos[key], seq_len + n_accepted)
            if r.slot is not None:
                self.runner.truncate(r.slot, self._pos[key])

    def release(self, r) -> None:
        self._sunk.pop(id(r), None)
        if self._pos.pop(id(r), None) is not None and r.slot is not None:
            self.runner.release(r.slot)


class LookupThenModel:
    """A draft model with prompt lookup in front: a request whose prompt and output so far
    have a match drafts the lookup's continuation (free), the others ask the model. The
    draft's cache catches up on the skipped tokens in one chunk when the model is next asked.

    Per request, lookup is preferred while its acceptance rate stays at least half the
    model's (both start at 1/1): on text that copies its input it wins nearly every step;
    on open chat, where 2-token matches are common but rarely continue, the model takes over.
    """

    def __init__(self, model: ModelDrafter, lookup: NgramDrafter | None = None):
        self.model, self.lookup = model, lookup or NgramDrafter()
        self.name, self.k0 = f"{model.name}+lookup", model.k0
        self._stats: dict[int, list[int]] = {}   # request key -> [lookup acc, drafted, model acc, drafted]
        self._src: dict[int, str] = {}

    def sunk(self, r) -> float:
        return self.model.sunk(r)

    def _prefer_lookup(self, r) -> bool:
        la, ld, ma, md = self._stats.setdefault(id(r), [0, 0, 0, 0])
        return (la + 1) / (ld + 1) >= 0.5 * (ma + 1) / (md + 1)

    def propose(self, reqs: list, ks: list[int]) -> list[tuple[list[int], list | None]]:
        out = self.lookup.propose(reqs, ks)
        ask = [i for i, (r, (d, _)) in enumerate(zip(reqs, out))
               if not d or not self._prefer_lookup(r)]
        for i, r in enumerate(reqs):
            self._src[id(r)] = "model" if i in ask else "lookup"
            self._stats.setdefault(id(r), [0, 0, 0, 0])
        if ask:
            for i, got in zip(ask, self.model.propose([reqs[i] for i in ask],
                                                      [ks[i] for i in ask])):
                out[i] = got
        return out

    def accepted(self, r, seq_len: int, n_accepted: int, n_drafted: int) -> None:
        st = self._stats.get(id(r))     # None: the request finished in this step (released)
        if st is not None:
            j = 0 if self._src.get(id(r)) == "lookup" else 2
            st[j], st[j + 1] = st[j] + n_accepted, st[j + 1] + n_drafted
        self.model.accepted(r, seq_len, n_accepted, n_drafted)

    def sources(self, r) -> dict:
        """Accepted/drafted per source, the step that finished the request left out."""
        la, ld, ma, md = self._stats.get(id(r), [0, 0, 0, 0])
        return {"lookup": f"{la}/{ld}", "model": f"{ma}/{md}"}

    def release(self, r) -> None:
        self._stats.pop(id(r), None)
        self._src.pop(id(r), None)
        self.lookup.release(r)
        self.model.release(r)


def make_drafter(draft, engine) -> NgramDrafter | LookupThenModel:
    """``"ngram"``, a model directory / built-in name, a ``(model, tokenizer)`` pair (a draft
    model with prompt lookup in front, :class:`LookupThenModel`), or a drafter object (used
    as is: a bare :class:`ModelDrafter` drafts with the model alone)."""
    if isinstance(draft, tuple):
        model, tok = draft
        where = "(given in memory)"
    elif isinstance(draft, str):
        if draft == "ngram":
            return NgramDrafter()
        from slmkit.models import load_model

        model, tok = load_model(draft)
        where = f"'{draft}'"
    else:
        return draft
    check_shared_tokenizer(engine.tokenizer, tok, where)
    return LookupThenModel(ModelDrafter(model, engine.max_batch, engine.max_seq_len,
                                        engine.vocab_size, name=where.strip("'"),
                                        prefill_chunk=engine.prefill_chunk))


# --------------------------------------------------------------------------- control


@dataclass
class SpecState:
    """One request's drafting: current k, counts, and the timing that decides pay-off."""

    k: int
    k_max: int
    probe: int = 0                 #: plain decode steps to time next (see Speculator)
    on: bool = True
    off: str | None = None
    drafted: int = 0
    accepted: int = 0
    spec_steps: int = 0
    plain_steps: int = 0
    spec_s: float = 0.0
    spec_tokens: int = 0
    plain_s: float = 0.0
    plain_tokens: int = 0
    since_probe: int = 0
    last_emitted: int = 0
    timing: bool = False           #: plain steps were asked for the pay-off check

    def report(self, name: str) -> dict:
        return {"draft": name, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": round(self.accepted / self.drafted, 3) if self.drafted else None,
                "spec_steps": self.spec_steps, "plain_steps": self.plain_steps,
                "k": self.k, "off": self.off}


class Speculator:
    """Drafting and verification for an :class:`~slmkit.engine.engine.Engine`.

    Args:
        engine: the engine (its runner verifies; its ``_emit_token`` records tokens).
        drafter: :class:`NgramDrafter`, :class:`ModelDrafter` or anything with ``propose``,
            ``accepted``, ``release`` and ``name``.
        k: drafts per step to start with (default: the drafter's ``k0``, 4 for prompt
            lookup, 2 for a draft model); k_max: the most (k adapts in 1..k_max).
        min_steps: drafted steps before the pay-off check; reprobe: drafted steps between
            plain steps that re-time a plain token; probe_steps: plain steps timed when the
            check first needs them (after ``min_steps`` drafted steps, so a request drafts
            from its first decode step; 0: no timing, drafting stays on).
    """

    def __init__(self, engine, drafter, k: int | None = None, k_max: int = 8,
                 min_steps: int = 4, reprobe: int = 32, probe_steps: int = 2):
        if k is None:
            k = min(getattr(drafter, "k0", 4), k_max)
        if not 1 <= k <= k_max:
            raise ConfigError(f"Draft length k must satisfy 1 <= k <= k_max (got {k}, {k_max}).")
        reason = draft_reason(engine.runner)
        if reason is not None:
            raise ConfigError(f"Cannot decode with drafts: {reason}; drop the draft.")
        self.engine, self.drafter = engine, drafter
        self.k0, self.k_max, self.min_steps, self.reprobe = k, k_max, min_steps, reprobe
        self.probe_steps = probe_steps
        self.states: dict[int, SpecState] = {}

    def state(self, r) -> SpecState:
        s = self.states.get(id(r))
        if s is None:
            s = self.states[id(r)] = SpecState(k=self.k0, k_max=self.k_max)
            if r.grammar is not None:
                s.on, s.off = False, "grammar-constrained request"
        return s

    def release(self, r) -> None:
        """A request finished: its report goes into its completion."""
        s = self.states.pop(id(r), None)
        if s is not None:
            r.completion.speculative = s.report(self.drafter.name)
            if hasattr(self.drafter, "sources"):
                r.completion.speculative["sources"] = self.drafter.sources(r)
        self.drafter.release(r)

    def _room(self, r, s: SpecState) -> int:
        e = self.engine
        left = r.params.max_tokens - len(r.completion.token_ids) - 1
        return max(0, min(s.k, left, e.max_seq_len - 1 - r.position))

    def step(self, decoding: list) -> None:
        """One decode step for ``decoding`` (sorted by slot), with drafts where they pay."""
        e = self.engine
        t0 = time.perf_counter()
        cands, ks = [], []
        for r in decoding:
            s = self.state(r)
            if not s.on:
                continue
            if s.probe > 0:
                continue
            k = self._room(r, s)
            if k >= 1:
                cands.append(r)
                ks.append(k)
        proposals = {}
        if cands:
            for r, (d, q) in zip(cands, self.drafter.propose(cands, ks)):
                if d:
                    proposals[id(r)] = (d, q, len(r.prompt) + len(r.completion.token_ids))
        states = {id(r): self.state(r) for r in decoding}
        if not proposals:
            e._decode(decoding)
            dt = time.perf_counter() - t0
            for r in decoding:
                s = states[id(r)]
                if s.on:
                    s.probe = max(0, s.probe - 1)
                    s.plain_steps += 1
                    s.plain_s += dt
                    s.plain_tokens += 1
                    self._decide(s)
            return
        rows = [[r.next_token] + proposals.get(id(r), ([],))[0] for r in decoding]
        outs = e.runner.forward_rows(rows, [r.slot for r in decoding],
                                     [r.position for r in decoding])
        for r, logits in zip(decoding, outs):
            s = states[id(r)]
            if id(r) not in proposals:          # one row: an ordinary decode token
                raw = e._constrain([r], logits[:1])
                e._emit_token(r, logits[0], None, raw.get(0))
                if s.on:
                    s.probe = max(0, s.probe - 1)
                continue
            drafts, qs, seq_len = proposals[id(r)]
            m = self._verify(r, s, logits, drafts, qs)
            self.drafter.accepted(r, seq_len, m, len(drafts))
            if r.slot is not None:
                e.runner.truncate(r.slot, r.position)
        dt = time.perf_counter() - t0
        sunk = getattr(self.drafter, "sunk", None)
        if sunk is not None:             # draft prompt prefills: a one-off cost, not a step's
            dt = max(0.0, dt - sum(sunk(r) for r in cands))
        for r in decoding:
            s = states[id(r)]
            if id(r) in proposals:
                self._account(s, len(proposals[id(r)][0]), dt)
            elif s.on:              # timed with the others' drafts in the step (see doc)
                s.plain_steps += 1
                s.plain_s += dt
                s.plain_tokens += 1
                self._decide(s)

    def _verify(self, r, s: SpecState, logits: torch.Tensor, drafts: list[int], qs) -> int:
        """Emit the accepted drafts and one more token; returns drafts accepted.

        Counts go into ``s`` before each token is emitted (emitting may finish the request,
        which writes its report)."""
        e = self.engine
        c = r.completion
        before = len(c.token_ids)
        s.drafted += len(drafts)
        s.spec_steps += 1
        m = 0
        for j in range(len(drafts) + 1):
            if c.finish_reason is not None:
                break
            if j == len(drafts):                     # all passed: one more from the target
                e._emit_token(r, logits[j])
                break
            if r.params.greedy:                      # the token choose() would pick
                token = int(torch.argmax(r.sampler.penalized(logits[j])))
                ok = token == drafts[j]
            else:
                p = r.sampler.distribution(logits[j])
                ok, token = accept_sampled(p, None if qs is None else qs[j], drafts[j],
                                           r.sampler.generator)
            m += ok
            s.accepted += ok
            e._emit_token(r, logits[j], token=token)
            if not ok:
                break
        s.last_emitted = len(c.token_ids) - before
        return m

    def _account(self, s: SpecState, n_drafts: int, dt: float) -> None:
        """Time a drafted step, adapt k, and turn drafting off when it does not pay."""
        s.spec_s += dt
        s.spec_tokens += s.last_emitted
        s.since_probe += 1
        m = s.last_emitted - 1
        if m >= n_drafts and n_drafts >= s.k:
            s.k = min(s.k + 1, s.k_max)
        elif m < n_drafts:
            s.k = max(1, s.k - 1)
        if s.spec_steps >= self.min_steps and not s.plain_tokens and not s.timing:
            s.timing, s.probe = True, self.probe_steps    # time plain tokens, then decide
        if self._decide(s):
            return
        if s.since_probe >= self.reprobe:       # re-time a plain token now and then
            s.since_probe = 0
            s.probe = 1

    def _decide(self, s: SpecState) -> bool:
        """After ``min_steps`` drafted steps and the plain steps timed for the check: turn
        drafting off (True) when a token with drafts costs no less than one without."""
        if not s.on or s.spec_steps < self.min_steps or not s.plain_tokens or s.probe > 0:
            return False
        plain = s.plain_s / s.plain_tokens
        spec = s.spec_s / max(1, s.spec_tokens)
        if spec < plain:
            return False
        s.on = False
        s.off = (f"did not pay: {spec * 1000:.1f} ms per token with drafts vs "
                 f"{plain * 1000:.1f} ms without (acceptance {s.accepted}/{s.drafted})")
        return True
