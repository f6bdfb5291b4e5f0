"""Constrained decoding: grammar libraries compared, and the engine's masking overhead.

Part 1 -- the candidate libraries, side by side on the SmolLM2 tokenizer (49,152 tokens,
from ``builtin:smollm2-135m``) and the same JSON schemas (:data:`SCHEMAS`, nested
objects, arrays, enums, bounded numbers, optional fields, patterns, a tool-call union):

* compile time per schema (p50 / p95, cold: no cache);
* time to compute one token mask and apply it to ``[V]`` logits (p50 / mean), walking
  96 tokens per schema with random logits (the same seeds for every library), the
  first mask of the run reported apart (a one-off per tokenizer for some libraries).

Candidates: llguidance, xgrammar, outlines-core (whichever import; a missing one is
listed as such). slmkit uses llguidance: see ``slmkit/engine/grammar.py`` for why.

Part 2 -- the engine on the real model (``builtin:smollm2-135m``), same prompts, free
vs under a JSON schema whose answers cannot close before ``--tokens`` tokens, at batch 1
and 8. Decode tok/s counts only the steps in which all the batch's rows decode (prefill
steps left out), rounds alternate free / constrained and each keeps its median. The time
the engine spends in its mask hook (``Engine._constrain``: computing every constrained
row's mask and applying it) is also summed, as a share of decode time and per token: a
direct figure that machine noise between the two runs cannot blur.

Part 3 -- each schema once on the real model (greedy, the schema in the prompt, batched):
how many answers finish within ``--parse-tokens`` and, of those, parse and validate.

Run timings under the team lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/grammar.py

Writes ``bench/results/grammar.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Passive OpenMP waits on a busy machine (see bench/decode.py for the measurements).
if os.getloadavg()[0] > (os.cpu_count() or 1):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmkit.engine import Engine, SamplingParams  # noqa: E402
from slmkit.engine.grammar import JSON_STYLE, Grammar  # noqa: E402
from slmkit.engine.tools import Tool, call_schema  # noqa: E402

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                      "temp": {"type": "number", "minimum": -50, "maximum": 60},
                                      "unit": {"enum": ["C", "F"]}},
     "required": ["city", "unit"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
            "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}},
        "note": {"type": "string"}}, "required": ["items"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "email": {"type": "string", "format": "email"},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}}},
        "required": ["id", "roles"]}, "active": {"type": "boolean"}},
     "required": ["user", "active"]},
    {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 2,
     "maxItems": 5},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"},
                                      "tags": {"type": "array", "items": {"type": "string"}},
                                      "score": {"type": "number"}}, "required": ["date"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "unsure"]},
                                      "confidence": {"type": "integer", "minimum": 0,
                                                     "maximum": 100}},
     "required": ["answer", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "minLength": 3},
                                      "sections": {"type": "array", "items": {
                                          "type": "object", "properties": {
                                              "heading": {"type": "string"},
                                              "words": {"type": "integer"}},
                                          "required": ["heading"]}}},
     "required": ["title", "sections"]},
    call_schema([Tool("get_weather", "", {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}),
                 Tool("add", "", {"type": "object", "properties": {
                     "a": {"type": "number"}, "b": {"type": "number"}},
                     "required": ["a", "b"]})]),
    {"type": "object", "properties": {"phone": {"type": "string",
                                                "pattern": "^\\+[0-9]{2} [0-9]{3} [0-9]{4}$"},
                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
     "required": ["phone", "zip"]},
]

#: Part 2's schema: 8 required items, so an answer runs past --tokens before it can close.
LONG = {"type": "object", "properties": {"items": {
    "type": "array", "minItems": 8, "maxItems": 8, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                         "note": {"type": "string", "maxLength": 200}},
        "required": ["name", "note"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}
PROMPTS = ["List eight fruits with a note each.", "Name eight rivers and describe them.",
           "Give eight tips for writing.", "List eight animals and what they eat.",
           "Eight cities worth visiting, with a reason.", "Eight hobbies and why.",
           "Eight programming languages and their strengths.", "Eight famous paintings."]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class _Lib:
    """One candidate library: compile a schema, then mask + advance one token at a time."""

    def __init__(self, name: str, tok, vocab: int):
        self.name, self.vocab = name, vocab
        if name == "llguidance":
            import llguidance
            import llguidance.hf
            import llguidance.torch as lt

            self.mod, self.lt = llguidance, lt
            self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        elif name == "xgrammar":
            import xgrammar as xgr

            self.mod = xgr
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
            self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        else:
            from outlines_core import Index, Vocabulary

            self.Index = Index
            self.vocabulary = Vocabulary(tok.eos_token_id, _byte_vocab(tok))
            self.eos = tok.eos_token_id

    def compile(self, schema: dict):
        text = json.dumps(schema)
        if self.name == "llguidance":
            m = self.mod.LLMatcher
            return m(self.tok, m.grammar_from_json_schema(text, defaults=JSON_STYLE))
        if self.name == "xgrammar":
            return self.compiler.compile_json_schema(text, any_whitespace=False,
                                                     separators=(", ", ": "))
        from outlines_core.json_schema import build_regex_from_schema

        return self.Index(build_regex_from_schema(text), self.vocabulary)

    def walker(self, compiled):
        """A function ``logits -> token or None (done)`` that masks, picks, advances."""
        V = self.vocab
        if self.name == "llguidance":
            mask = self.lt.allocate_token_bitmask(1, V)

            def step(logits):
                self.lt.fill_next_token_bitmask(compiled, mask, 0)
                from slmkit.engine.grammar import mask_rows_

                mask_rows_(logits[None], [0], mask)
                t = int(torch.argmax(logits))
                compiled.consume_token(t)
                return None if compiled.is_stopped() or compiled.is_error() else t
            return step
        if self.name == "xgrammar":
            xgr = self.mod
            matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, V)

            def step(logits):
                matcher.fill_next_token_bitmask(mask)
                xgr.apply_token_bitmask_inplace(logits, mask[0])
                t = int(torch.argmax(logits))
                matcher.accept_token(t)
                return None if matcher.is_terminated() else t
            return step
        from outlines_core import Guide

        guide = Guide(compiled)

        def step(logits):
            bias = torch.full((V,), float("-inf"))
            bias[torch.tensor(guide.get_tokens())] = 0
            t = int(torch.argmax(logits + bias))
            if t == self.eos:
                return None
            guide.advance(t)
            return None if guide.is_finished() else t
        return step


def _byte_vocab(tok) -> dict[bytes, list[int]]:
    """Byte-level BPE token strings -> their bytes (GPT-2's byte-to-unicode table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + \
        list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    inverse = {chr(c): b for b, c in zip(bs, cs)}
    out: dict[bytes, list[int]] = {}
    for text, i in tok.get_vocab().items():
        if i == tok.eos_token_id:
            continue
        raw = bytes(inverse[c] for c in text) if all(c in inverse for c in text) else \
            text.encode()
        out.setdefault(raw, []).append(i)
    return out


def compare_libraries(tok, vocab: int) -> dict:
    rows = {}
    for name in ("llguidance", "xgrammar", "outlines_core"):
        try:
            lib = _Lib(name, tok, vocab)
        except ImportError as e:
            rows[name] = {"error": f"not installed ({e.name})"}
            continue
        compile_s, mask_s, first = [], [], []
        for k, schema in enumerate(SCHEMAS):
            t0 = time.perf_counter()
            try:
                compiled = lib.compile(schema)
            except Exception as e:  # a schema this library cannot compile
                rows.setdefault(name, {}).setdefault("refused", []).append(
                    f"schema {k}: {str(e).splitlines()[0][:80]}")
                continue
            compile_s.append(time.perf_counter() - t0)
            step, gen = lib.walker(compiled), torch.Generator().manual_seed(k)
            for i in range(96):
                logits = torch.randn(vocab, generator=gen)
                t0 = time.perf_counter()
                done = step(logits) is None
                (first if not first else mask_s).append(time.perf_counter() - t0)
                if done:
                    break
        rows[name] = {**rows.get(name, {}),
                      "compile_ms_p50": round(pct(compile_s, 0.5) * 1e3, 2),
                      "compile_ms_p95": round(pct(compile_s, 0.95) * 1e3, 2),
                      "first_mask_ms": round(first[0] * 1e3, 1),
                      "mask_us_p50": round(statistics.median(mask_s) * 1e6, 1),
                      "mask_us_mean": round(statistics.mean(mask_s) * 1e6, 1),
                      "masks": len(mask_s)}
        print(name, rows[name], flush=True)
    return rows


def decode_rate(engine: Engine, prompts: list[list[int]], tokens: int,
                grammar: Grammar | None) -> float:
    """Decode tok/s over the steps where every row of the batch decodes."""
    params = [SamplingParams(max_tokens=tokens, temperature=0, grammar=grammar,
                             ignore_eos=grammar is None) for _ in prompts]
    handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    made, spent = 0, 0.0
    engine.mask_s = 0.0
    while not all(h.done for h in handles):
        active = engine._active  # every row holds a slot and has prefilled: a decode step
        full = len(active) == len(prompts) and all(r.next_token is not None for r in active)
        t0 = time.perf_counter()
        engine.step()
        if full:
            made += len(prompts)
            spent += time.perf_counter() - t0
    for h in handles:
        c = h.result()
        if grammar is not None and c.finish_reason != "length":
            raise AssertionError(f"a constrained answer closed early: {c.text!r}")
    engine.decode_s = spent
    return made / spent


def _timed_constrain(engine: Engine) -> None:
    """Count the seconds the engine spends computing and applying grammar masks."""
    inner = engine._constrain

    def constrain(reqs, logits):
        t0 = time.perf_counter()
        try:
            return inner(reqs, logits)
        finally:
            engine.mask_s += time.perf_counter() - t0
    engine._constrain = constrain


def engine_overhead(model, tok, tokens: int, rounds: int, batches: list[int]) -> dict:
    grammar = Grammar.json_schema(LONG)
    out = {}
    for b in batches:
        engine = Engine(model, tok, max_batch=b, background=False,
                        threads=torch.get_num_threads())
        engine.grammars.warm()
        _timed_constrain(engine)
        chat = [tok.apply_chat_template([{"role": "user", "content": p}],
                                        add_generation_prompt=True, tokenize=True)
                for p in PROMPTS[:b]]
        chat = [c["input_ids"] if hasattr(c, "keys") else c for c in chat]
        decode_rate(engine, chat, 8, None)  # warm-up
        free, bound, share = [], [], []
        for _ in range(rounds):
            free.append(decode_rate(engine, chat, tokens, None))
            bound.append(decode_rate(engine, chat, tokens, grammar))
            share.append(engine.mask_s / engine.decode_s)
        mask_us = statistics.median(share) / statistics.median(bound) * 1e6  # per token
        out[f"batch{b}"] = {"free_tok_s": round(statistics.median(free), 1),
                            "json_schema_tok_s": round(statistics.median(bound), 1),
                            "ratio": round(statistics.median(bound) / statistics.median(free),
                                           3),
                            "mask_share_of_decode": round(statistics.median(share), 4),
                            "mask_us_per_token": round(mask_us, 1)}
        print(f"batch {b}", out[f"batch{b}"], flush=True)
    return out


def parse_rate(model, tok, max_tokens: int) -> dict:
    """Part 3: every schema of :data:`SCHEMAS` once on the real model, greedy, batched;
    how many answers finish, parse and validate (``jsonschema``)."""
    import jsonschema

    engine = Engine(model, tok, max_batch=len(SCHEMAS), background=False,
                    threads=torch.get_num_threads())
    handles = []
    for schema in SCHEMAS:
        ids = tok.apply_chat_template([{"role": "user", "content": "Reply with JSON that "
                                        f"matches this schema: {json.dumps(schema)}"}],
                                      add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        handles.append(engine.submit(ids, SamplingParams(
            max_tokens=max_tokens, temperature=0, grammar=Grammar.json_schema(schema))))
    finished = valid = 0
    cut = []
    for k, (schema, h) in enumerate(zip(SCHEMAS, handles)):
        c = h.result()
        if c.finish_reason != "stop":
            cut.append(f"schema {k}: ...{c.text[-40:]!r}")
            continue
        finished += 1
        try:
            jsonschema.validate(json.loads(c.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    out = {"schemas": len(SCHEMAS), "finished": finished, "valid_of_finished": valid,
           "cut_by_max_tokens": cut}
    print("parse rate", out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request in part 2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-libraries", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--parse-tokens", type=int, default=256,
                    help="part 3: token budget per answer (0 skips part 3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from slmkit.models import load_model

    model, tok = load_model("builtin:smollm2-135m")
    from slmkit.models.presets import output_vocab_size

    vocab = output_vocab_size(model)
    result = {"threads": args.threads, "vocab": vocab, "schemas": len(SCHEMAS)}
    if not args.skip_libraries:
        result["libraries"] = compare_libraries(tok, vocab)
    if not args.skip_engine:
        result["engine"] = engine_overhead(model, tok, args.tokens, args.rounds, args.batches)
    if args.parse_tokens:
        result["parse"] = parse_rate(model, tok, args.parse_tokens)
    out = Path(__file__).parent / "results" / "grammar.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
