"""Constrained decoding: one grammar state per request masks the logits at every step.

A request whose :class:`~slmkit.engine.SamplingParams` carries a :class:`Grammar` gets a
:class:`GrammarState`. Before each token is chosen the engine asks every constrained row
of the batch for its allowed-token bitmask, sets the logits of every other token to
``-inf`` (so greedy, sampling, top-k/p and min-p all pick among allowed tokens only), and
after the choice advances the state by that token. Rows without a grammar are untouched,
so constrained and free requests share one batched forward (continuous batching).

Grammar compilation and token masks are delegated to **llguidance** (Microsoft's Rust
core of Guidance; ``pip install llguidance``). Measured on this project's 2-core CPU with
the SmolLM2 tokenizer (49,152 tokens; ``bench/grammar.py``), against xgrammar 0.2.9 and
outlines-core 0.2.14:

* compile a JSON schema: llguidance 1-2 ms, xgrammar 5-7 ms, outlines-core 16-118 ms;
* one token mask: llguidance ~0.1 ms median, xgrammar ~0.07 ms, outlines-core ~5 ms;
  both of the first two are under 1 % of a 135M model's decode step on this CPU;
* llguidance is one wheel with no dependencies (xgrammar declares torch, transformers and
  triton, a multi-hundred-MB GPU compiler this CPU package has no use for);
* llguidance reads Lark grammars with embedded JSON schemas (``%json {...}``), which is
  how a tool choice of ``auto`` says "plain text or a tool call" in one grammar, and it
  names the schema keywords it cannot enforce, which the server turns into a 400.

Its one-off cost is the first mask for a tokenizer (~1.5 s: it builds the token trie);
:meth:`GrammarCompiler.warm` pays it up front.

JSON output uses fixed separators (``", "`` and ``": "``, no newlines): a small model
given free whitespace can emit newlines until ``max_tokens`` and never close the object.

**Output parses even when the token budget runs out.** llguidance has no notion of a
budget, so the engine keeps one (:meth:`GrammarState.advance_within`). A *closing plan*
is the token sequence a fixed policy takes from the current grammar state to an accepting
one: among the allowed tokens, the one that closes the most strings, arrays and objects net
of those it opens, of commas and of number/literal characters (tracking whether the output
is inside a JSON string), then the longest (which writes a forced key or a
pattern's literal in as few tokens as the vocabulary allows). A request under a budget
holds a plan from its first token on (its grammar's start plan, cached), and every model
token is checked: it is taken when a plan from the state after it fits in the tokens left,
else it is replaced by the held plan's next one, so the output closes by the last token
(the finish reason is then ``"length"``: the value was cut short, though it parses). A
request whose ``max_tokens`` is below the start plan's length (the schema's shortest
output under that policy) is refused at submit.

The check is cheap, so it runs on every token (it once started only within a margin of
the budget, and a model that opened ``[{`` of an array of required-key objects just
before that margin could not be closed in time): a token the held plan starts with keeps
the rest of it; after another token the held plan is first tried as is (it still closes
after text inside a string) by consuming it, not by masks; only then is a new plan
computed, and it ends with the rest of the held one as soon as the policy's next token is
on it and that rest closes (:meth:`GrammarCompiler.closing_plan`'s ``tail``), so it
costs about two masks instead of eight. A plan step reads the mask in a precomputed
score order instead of a 49k-wide pass (:func:`_first_allowed`). On the structured
bench's batch-8 rows (3 rounds, 683 tokens replayed) this cut the check's CPU time 4.4x
while checking every token (the margin had covered 488), and took the same tokens. A
grammar with no plan from its start state (none found in 256 tokens) is only checked in
its last 16 tokens, as before.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from slmkit.errors import ConfigError

#: How JSON is laid out under a schema (llguidance's ``x-guidance`` options).
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class GrammarError(ConfigError):
    """A grammar or JSON schema that cannot be compiled or enforced (names the feature)."""


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match.

    Build one with :meth:`json_schema`, :meth:`json_object`, :meth:`lark` or :meth:`regex`.
    Equal grammars share one compiled form (the cache key is ``(kind, source)``).
    """

    kind: Literal["json_schema", "lark", "regex"]
    source: str

    @classmethod
    def json_schema(cls, schema: dict | str) -> Grammar:
        """Output is one JSON value valid under ``schema`` (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"The JSON schema is not valid JSON ({e.msg}); fix it.") \
                    from None
        if not isinstance(schema, dict):
            raise GrammarError("A JSON schema must be a JSON object (e.g. {\"type\": "
                               "\"object\", ...}); wrap it in one.")
        return cls("json_schema", json.dumps(schema, sort_keys=False, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> Grammar:
        """Output is any JSON object (OpenAI's ``response_format: json_object``)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (``start`` rule; ``%json {...}`` allowed)."""
        return cls("lark", text)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Output matches a regular expression (Rust ``regex`` syntax, no look-around)."""
        return cls("regex", pattern)


def _llg():
    import llguidance

    return llguidance


def to_llguidance(grammar: Grammar) -> str:
    """The llguidance grammar text for ``grammar`` (not yet checked)."""
    M = _llg().LLMatcher
    if grammar.kind == "json_schema":
        return M.grammar_from_json_schema(grammar.source, defaults=JSON_STYLE)
    if grammar.kind == "lark":
        return M.grammar_from_lark(grammar.source)
    if grammar.kind == "regex":
        return M.grammar_from_regex(grammar.source)
    raise GrammarError(f"Unknown grammar kind '{grammar.kind}'; use json_schema, lark or regex.")


def check(grammar: Grammar) -> str:
    """Compile-check ``grammar`` without a tokenizer; returns llguidance's grammar text.

    Raises:
        GrammarError: naming what cannot be enforced (an unimplemented schema keyword such
            as ``uniqueItems``, ``not``, ``if``; a regex look-around; a dangling ``$ref``).
            Warnings count as errors: a keyword the grammar would skip is not enforced.
    """
    what = {"json_schema": "JSON schema", "lark": "grammar", "regex": "regex"}[grammar.kind]
    try:
        text = to_llguidance(grammar)
        failed, messages = _llg().LLMatcher.validate_grammar_with_warnings(text)
    except (ValueError, TypeError, RuntimeError) as e:
        raise GrammarError(f"The {what} cannot be compiled: {e}.") from None
    # a token named by id (``<[512]>``, a tool-call marker) is checked once a tokenizer
    # compiles the grammar, not here
    messages = [m for m in messages if "can't validate <[" not in str(m)]
    if failed or messages:
        first = " ".join(str(messages[0]).split()) if messages else "unknown error"
        raise GrammarError(f"The {what} uses something constrained decoding cannot enforce "
                           f"({first}); remove or rewrite that part.")
    return text


class GrammarCompiler:
    """Compiles grammars for one tokenizer and caches them (LRU by grammar).

    Args:
        tokenizer: the Hugging Face tokenizer the engine decodes with.
        vocab_size: the model's output width (may exceed ``len(tokenizer)``; the extra ids
            are never allowed).
        cache_size: compiled grammars kept.

    Thread-safe: the server compiles on its event loop while the engine thread masks.
    """

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 64):
        import llguidance.hf

        self.vocab_size = int(vocab_size)
        self.words = (self.vocab_size + 31) // 32
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[Grammar, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self._hf = tokenizer
        self._scores: np.ndarray | None = None
        self._ends: np.ndarray | None = None
        self._order: np.ndarray | None = None
        self._short: np.ndarray | None = None
        #: per grammar, the closing plan from its start state (None: none found)
        self._start: dict[Grammar, list[int] | None] = {}
        self._need: dict[Grammar, int | None] = {}  # its length

    def _prototype(self, grammar: Grammar):
        with self._lock:
            proto = self._cache.get(grammar)
            if proto is not None:
                self._cache.move_to_end(grammar)
                self.hits += 1
                return proto
        matcher = _llg().LLMatcher(self.tokenizer, check(grammar))
        if matcher.is_error():
            raise GrammarError(f"The grammar cannot be compiled: {matcher.get_error()}.")
        with self._lock:
            self.misses += 1
            self._cache[grammar] = matcher
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def state(self, grammar: Grammar, budget: int | None = None) -> GrammarState:
        """A fresh per-request state (a copy of the cached compiled grammar).

        ``budget``: tokens the request may generate; the state then closes its output
        within it (:meth:`GrammarState.advance_within`).

        Raises:
            GrammarError: the grammar cannot be enforced (see :func:`check`), or its
                shortest output is longer than ``budget`` tokens.
        """
        proto = self._prototype(grammar)
        state = GrammarState(proto.deep_copy(), self.words, self)
        if budget is not None:
            self._lexer()
            if grammar not in self._need:
                plan = self.closing_plan(proto)
                self._start[grammar] = plan
                self._need[grammar] = None if plan is None else len(plan)
            need = self._need[grammar]
            if need is not None and need > budget:
                raise GrammarError(f"max_tokens ({budget}) is below the shortest output this "
                                   f"grammar allows ({need} tokens); raise max_tokens.")
            if need is None:  # no plan to hold: try for one in the last tokens only
                state.margin = 16
            else:  # every token is checked against a held plan
                state.margin, state._plan = budget, list(self._start[grammar])
        return state

    def _lexer(self) -> tuple[np.ndarray, np.ndarray]:
        """The closing policy's tables, built once per tokenizer: for each JSON lexical
        state ``s`` (0 outside a string, 1 inside, 2 inside after a backslash) and token
        id, ``scores[s, id]`` (strings and brackets closed minus opened and commas, and
        minus two per number or literal character outside strings, * 4096, plus the
        piece's length) and ``ends[s, id]`` (the state after the piece). Ids the tokenizer
        lacks rank lowest; a grammar that is not JSON just gets a length preference.
        Also ``self._order[s]``: the ids below ``vocab_size`` best score first (ties: the
        lower id first, as an argmax picks), so a plan step finds its token by reading
        the mask in that order (:func:`_first_allowed`)."""
        if self._scores is None:
            n = len(self._hf)
            pieces = self._hf.convert_ids_to_tokens(list(range(n)))
            size = self.words * 32
            scores = np.full((3, size), -(1 << 40), dtype=np.int64)
            ends = np.tile(np.arange(3, dtype=np.int8)[:, None], (1, size))
            for i, piece in enumerate(pieces):
                if piece is None:
                    continue
                for s0 in range(3):
                    state, net = s0, 0
                    for ch in piece:
                        if state == 2:
                            state = 1
                        elif state == 1:
                            if ch == "\\":
                                state = 2
                            elif ch == '"':
                                state, net = 0, net + 1
                        elif ch == '"':
                            state, net = 1, net - 1
                        elif ch in "]}":
                            net += 1
                        elif ch in "[{,":
                            net -= 1
                        elif ch.isalnum() or ch in ".-+":  # a number or literal goes on
                            net -= 2
                    scores[s0, i] = net * 4096 + min(len(piece), 4095)
                    ends[s0, i] = state
            self._order = np.argsort(-scores[:, :self.vocab_size], axis=1,
                                     kind="stable").astype(np.int32)
            self._scores, self._ends = scores, ends
        return self._scores, self._ends

    def closing_plan(self, matcher, lex: int = 0, limit: int = 256,
                     tail: list[int] | None = None) -> list[int] | None:
        """Tokens the closing policy takes from ``matcher``'s state (left untouched; ``lex``
        its JSON lexical state, see :meth:`_lexer`) to an accepting state; ``[]`` when it
        accepts already, None when not within ``limit`` tokens.

        ``tail``: a plan that closed from an earlier state (the one held before the model
        left it). Once the policy's next token is one of ``tail``'s and the rest of
        ``tail`` from there closes (checked by consuming it), that rest ends the plan: the
        policy would mostly write the same tokens (measured on the structured bench: of
        a new plan's ~8 tokens, ~6 end the old one), and consuming them costs far less
        than computing their masks."""
        plan = self._plan_with(matcher, lex, limit, short=False, tail=tail)
        return plan if plan is not None else self._plan_with(matcher, lex, limit, short=True)

    def _plan_with(self, matcher, lex: int, limit: int, short: bool,
                   tail: list[int] | None = None) -> list[int] | None:
        """One closing policy: ``short=False`` prefers long tokens (few steps through forced
        keys), ``short=True`` short tokens not used before in the plan (walks a string
        pattern with an unbounded repeat, where the longest token repeats for ever)."""
        at: dict[int, list[int]] = {}  # tail token -> its positions, last first
        for j in range(len(tail or ()) - 1, -1, -1):
            at.setdefault(tail[j], []).append(j)
        scores, ends = self._lexer()
        if short:
            if self._short is None:
                net = scores // 4096
                self._short = np.where(scores < -(1 << 30), scores,
                                       net * (1 << 24) - scores % 4096)
            scores = self._short
        used: dict[int, int] = {}
        m = matcher.deep_copy()
        bitmask = torch.empty(1, self.words, dtype=torch.int32)
        ok = bitmask[0].numpy().view(np.uint8)
        plan: list[int] = []
        while not m.is_accepting():
            if len(plan) >= limit or m.is_error():
                return None
            m.unsafe_compute_mask_ptr(bitmask.data_ptr(), self.words * 4)
            if not short:  # the common case: read the mask in score order, no 49k-wide ops
                token = _first_allowed(ok.view(np.uint32), self._order[lex], scores[lex])
                if token is None:
                    return None
            else:
                bits = np.unpackbits(ok, bitorder="little").view(bool)
                bits[self.vocab_size:] = False
                if not bits.any():
                    return None
                row = scores[lex]
                if used:
                    row = row.copy()
                    ids = np.fromiter(used, dtype=np.int64)
                    row[ids] -= np.fromiter(used.values(), dtype=np.int64) * 4096
                token = int(np.where(bits, row, np.iinfo(np.int64).min).argmax())
            for j in at.get(token, ()):
                rest = tail[j:]
                if len(plan) + len(rest) <= limit and _closes(m, rest):
                    return plan + rest
            if not m.consume_token(token):
                return None
            lex = int(ends[lex, token])
            plan.append(token)
            used[token] = used.get(token, 0) + 1
        return plan

    def warm(self) -> None:
        """Pay the tokenizer's one-off first-mask cost (~1.5 s on 49k tokens) now."""
        self.state(Grammar.json_object()).fill(torch.empty(1, self.words, dtype=torch.int32))


class GrammarState:
    """One request's position in its grammar.

    Args:
        matcher: an ``llguidance.LLMatcher`` of its own.
        words: int32 words per bitmask row (``ceil(vocab / 32)``).
    """

    def __init__(self, matcher, words: int, compiler: GrammarCompiler | None = None):
        self.matcher, self.words, self.compiler = matcher, words, compiler
        #: budget (tokens left) at which every token is checked against the closing plan
        self.margin = 0
        self._plan: list[int] | None = None
        #: JSON lexical state of the output so far (for the closing policy)
        self.lex = 0
        #: the budget replaced a model token: the output was cut short (finish "length")
        self.forced = False

    def advance_within(self, token_id: int, left: int, stop_ids: list[int] = ()) -> int | None:
        """Consume ``token_id``, the model's choice with ``left`` tokens of budget left
        (this one included), unless that would leave too few tokens to close the output;
        then consume the closing plan's next token instead (or, in an accepting state, a
        stop token is returned, not consumed). Returns the token taken, None if the
        grammar rejects ``token_id`` (never, after a mask)."""
        token_id = int(token_id)
        if left > self.margin or self.compiler is None:
            return token_id if self.advance(token_id) else None
        plan = self._plan
        if plan is None:  # (a plan longer than ``left`` could not close in time anyway)
            plan = self.compiler.closing_plan(self.matcher, self.lex, limit=left)
        if plan and token_id == plan[0]:
            self._plan = plan[1:]
            return token_id if self.advance(token_id) else None
        if not self.advance(token_id):
            return None
        if plan and len(plan) <= left - 1 and _closes(self.matcher, plan):
            self._plan = plan  # the held plan still closes from here (text in a string)
            return token_id
        after = self.compiler.closing_plan(self.matcher, self.lex, limit=left - 1, tail=plan)
        if after is not None:
            self._plan = after
            return token_id
        if plan is None:  # no way to close found from before either: keep the choice
            self._plan = after
            return token_id
        self._rollback()
        if not plan:  # accepting already: end here
            if stop_ids:
                self._plan, self.forced = [], True
                return int(stop_ids[0])
            self.advance(token_id)
            self._plan = after
            return token_id
        self._plan, self.forced = plan[1:], True
        return plan[0] if self.advance(plan[0]) else None

    def fill(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed-token bits into ``bitmask[row]`` (``[B, words]`` int32)."""
        out = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)

    def advance(self, token_id: int) -> bool:
        """Consume the chosen token; False if the grammar rejects it (never, after a mask)."""
        if not self.matcher.consume_token(int(token_id)):
            return False
        if self.compiler is not None and self.compiler._ends is not None:
            self._lex_before, self.lex = self.lex, int(self.compiler._ends[self.lex, token_id])
        return True

    def _rollback(self) -> None:
        self.matcher.rollback(1)
        self.lex = getattr(self, "_lex_before", 0)

    def allow_stops(self, bitmask: torch.Tensor, row: int, stop_ids: list[int]) -> None:
        """Once the grammar accepts, also allow the request's own stop tokens in
        ``bitmask[row]`` (llguidance allows only the tokenizer's EOS; a chat model may end
        its turn with another token, e.g. ``<|im_end|>`` when EOS is ``<|endoftext|>``)."""
        if stop_ids and self.matcher.is_accepting():
            words = bitmask[row].numpy().view(np.uint32)
            for t in stop_ids:
                if t // 32 < len(words):
                    words[t // 32] |= np.uint32(1 << (t % 32))

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows no further token (end of output)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def _closes(matcher, tokens: list[int]) -> bool:
    """Whether ``tokens`` take ``matcher`` to an accepting state (its state unchanged;
    consuming tokens costs far less than computing the masks of a new plan)."""
    n = matcher.try_consume_tokens(tokens)
    ok = n == len(tokens) and matcher.is_accepting()
    if n:
        matcher.rollback(n)
    return ok


def _first_allowed(words: np.ndarray, order: np.ndarray, scores: np.ndarray,
                   head: int = 512, few: int = 64) -> int | None:
    """The allowed id (bit set in ``words``, a uint32 bitmask row) of the highest
    ``scores`` (ties: the lowest id, as an argmax picks), None if no id below
    ``len(order)`` is allowed; ``order``: those ids best score first.

    A 49k-wide ``np.where`` then ``argmax`` costs ~0.2 ms of CPU, as much as the mask, so
    it is the last resort: the head of ``order`` is read first (the token is there when
    most tokens are allowed, as inside a string), then, when few mask words are nonzero
    (a forced key, digits), only those words are expanded (~0.01 ms each way).
    ``head`` and ``few`` size those two paths.
    """
    first = order[:head]
    hit = (words[first >> 5] >> (first & 31).astype(np.uint32)) & 1
    k = int(hit.argmax())
    if hit[k]:
        return int(first[k])
    nz = np.flatnonzero(words)
    if len(nz) <= few:
        bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").view(bool)
        ids = (nz[:, None] * 32 + np.arange(32)).ravel()[bits]
        ids = ids[ids < len(order)]
        return int(ids[scores[ids].argmax()]) if ids.size else None
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").view(bool)[:len(order)]
    if not bits.any():
        return None
    return int(np.where(bits, scores[:len(order)], np.iinfo(np.int64).min).argmax())


def allowed(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """``[B, words]`` int32 bitmask -> ``[B, vocab_size]`` bool (bit ``i % 32`` of word
    ``i // 32`` says whether token ``i`` is allowed; little-endian, as llguidance writes)."""
    return np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab_size,
                         bitorder="little").view(bool)


def mask_rows_(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set ``logits[rows[j], t] = -inf`` wherever ``bitmask[j]`` forbids token ``t``.

    ``logits``: ``[B, V]`` float, changed in place; ``bitmask``: ``[len(rows), words]``.
    Done in numpy, on one thread: torch's masked_fill splits a 49k-wide row over the
    OpenMP pool, and on a busy 2-core machine the waits cost 5-40 ms per step (measured,
    batch 1-8) against ~0.2 ms per row here; the native library's loop over the mask
    words, when built, costs a few microseconds per row.
    """
    from slmkit.engine import native

    if native.mask_rows(logits, rows, bitmask):
        return
    forbidden = ~allowed(bitmask, logits.shape[1])
    if logits.dtype == torch.float32:
        view = logits.numpy()
        for j, i in enumerate(rows):
            np.copyto(view[i], -np.inf, where=forbidden[j])
        return
    with torch.inference_mode():  # the runners return inference tensors
        for j, i in enumerate(rows):
            logits[i].masked_fill_(torch.from_numpy(forbidden[j]), float("-inf"))
