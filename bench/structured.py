"""Structured output on the built-in model: 50+ JSON schemas, every answer parses and validates.

``builtin:smollm2-135m`` answers one prompt per schema under that schema (greedy, batch 8,
``--max-tokens`` per answer; the budget guard of ``slmkit/engine/grammar.py`` closes an
answer the model has not finished, so a cut answer must parse too). Reported:

* parse / validate counts (``jsonschema``) over :func:`schemas` -- 12 written out plus
  generated ones (a seeded mix of string, pattern, enum, bounded integer and number,
  boolean, array, nested object, optional and nullable fields), deterministic;
* which schema features llguidance refuses (:data:`PROBES`, one feature each, through
  ``slmkit.engine.grammar.check``: what the server answers with a 400);
* grammar compile time per schema, cold (a fresh compiler, no cache): p50 / p95;
* decode tok/s under the schema vs free, the same prompts, batch 1 and 8: rounds
  alternate free / constrained in one process, each side keeps its median, and only steps
  where every row of the batch decodes count. The ratio is the figure; absolute tok/s on
  a machine shared with other jobs are not speed claims.

    nice -n 10 .venv/bin/python bench/structured.py

Writes ``bench/results/structured.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from slmkit.engine.grammar import Grammar, GrammarCompiler, GrammarError, check  # noqa: E402

WRITTEN = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string"},
                                      "temp": {"type": "number", "minimum": -50, "maximum": 60},
                                      "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["sku", "qty"], "additionalProperties": False}},
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
    {"anyOf": [{"type": "object", "properties": {"error": {"type": "string"}},
                "required": ["error"]},
               {"type": "object", "properties": {"result": {"type": "number"}},
                "required": ["result"]}]},
    {"type": "object", "properties": {"point": {"type": "array", "prefixItems": [
        {"type": "number"}, {"type": "number"}], "items": False, "minItems": 2}},
     "required": ["point"]},
    {"type": "object", "properties": {"title": {"type": "string", "minLength": 3,
                                                "maxLength": 40},
                                      "year": {"type": ["integer", "null"]},
                                      "kind": {"const": "book"}},
     "required": ["title", "year", "kind"]},
    {"$defs": {"person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "phone": {
            "type": "string", "pattern": "^\\+?[0-9]{7,12}$"}}, "required": ["name"]}},
     "type": "object", "properties": {"author": {"$ref": "#/$defs/person"},
                                      "editors": {"type": "array", "maxItems": 2,
                                                  "items": {"$ref": "#/$defs/person"}}},
     "required": ["author"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 3, "items": {
        "type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": -9,
                                                   "maximum": 9}}}},
     "required": ["matrix"], "additionalProperties": False},
]

#: one schema feature each; the report says which llguidance refuses
PROBES = {
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "not": {"not": {"type": "string"}},
    "if/then/else": {"type": "object", "if": {"properties": {"a": {"const": 1}}},
                     "then": {"required": ["b"]}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "string"}}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "minProperties": {"type": "object", "minProperties": 2},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
    "format: date-time": {"type": "string", "format": "date-time"},
    "format: uuid": {"type": "string", "format": "uuid"},
    "pattern with look-ahead": {"type": "string", "pattern": "^(?=.*[0-9]).+$"},
    "recursive $ref": {"$defs": {"n": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}}}}, "$ref": "#/$defs/n"},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"required": ["a"]}]},
}

FIELDS = ["name", "city", "color", "size", "count", "price", "ok", "tags", "owner", "code",
          "level", "ratio", "notes", "id", "status", "parts"]


def _field(rng: random.Random, depth: int) -> dict:
    kind = rng.choice(["string", "pattern", "enum", "integer", "number", "boolean", "array",
                       "object" if depth < 2 else "enum", "nullable"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.choice([8, 20, 40])}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(
            ["^[A-Z]{2}[0-9]{3}$", "^[a-z]+-[0-9]{1,3}$", "^#[0-9a-f]{6}$",
             "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "on", "off",
                                    "low", "high"], rng.randint(2, 4))}
    if kind == "integer":
        lo = rng.randint(-100, 10)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.choice([5, 50, 1000])}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 100, 1e4])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "nullable":
        return {"type": ["string", "null"], "maxLength": 16}
    if kind == "array":
        return {"type": "array", "items": _field(rng, depth + 1),
                "minItems": rng.randint(0, 1), "maxItems": rng.randint(2, 4)}
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(FIELDS, rng.randint(2, 4))
    props = {n: _field(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7] or names[:1]  # the rest optional
    out = {"type": "object", "properties": props, "required": required}
    if rng.random() < 0.5:
        out["additionalProperties"] = False
    return out


def schemas(n: int) -> list[dict]:
    """:data:`WRITTEN` plus generated schemas up to ``n`` (seeded: the same every run)."""
    return WRITTEN + [_object(random.Random(k)) for k in range(n - len(WRITTEN))]


def _prompt(tok, schema: dict) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": "Reply with JSON that matches "
                                    f"this schema: {json.dumps(schema)}"}],
                                  add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def refused_features(tok, vocab: int) -> dict:
    out = {}
    for name, schema in PROBES.items():
        try:
            check(Grammar.json_schema(schema))
            out[name] = "accepted"
        except GrammarError as e:
            out[name] = "refused: " + str(e)[:160]
    return out


def compile_times(tok, vocab: int, items: list[dict]) -> dict:
    compiler = GrammarCompiler(tok, vocab)
    compiler.warm()
    times = []
    for schema in items:
        g = Grammar.json_schema(schema)
        t0 = time.perf_counter()
        compiler.state(g)
        times.append(time.perf_counter() - t0)
    return {"schemas": len(times), "compile_ms_p50": round(pct(times, 0.5) * 1e3, 2),
            "compile_ms_p95": round(pct(times, 0.95) * 1e3, 2),
            "compile_ms_max": round(max(times) * 1e3, 2)}


def validity(model, tok, items: list[dict], max_tokens: int, batch: int) -> dict:
    import jsonschema

    engine = Engine(model, tok, max_batch=batch, background=False,
                    threads=torch.get_num_threads())  # --threads (Engine sets its own)
    handles = [engine.submit(_prompt(tok, s), SamplingParams(
        max_tokens=max_tokens, temperature=0, grammar=Grammar.json_schema(s))) for s in items]
    parsed = valid = 0
    reasons: dict[str, int] = {}
    failures = []
    for k, (schema, h) in enumerate(zip(items, handles)):
        c = h.result()
        reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
        try:
            value = json.loads(c.text)
            parsed += 1
            jsonschema.validate(value, schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            failures.append(f"schema {k}: {type(e).__name__}: {c.text[-60:]!r}")
    out = {"schemas": len(items), "parsed": parsed, "valid": valid, "finish": reasons,
           "max_tokens": max_tokens, "failures": failures}
    print("validity", out, flush=True)
    return out


def _rate(engine: Engine, prompts, grammars, tokens: int) -> float:
    handles = [engine.submit(p, SamplingParams(max_tokens=tokens, temperature=0, grammar=g,
                                               ignore_eos=g is None))
               for p, g in zip(prompts, grammars)]
    made, spent = 0, 0.0
    while not all(h.done for h in handles):
        active = engine._active
        full = len(active) == len(prompts) and all(r.next_token is not None for r in active)
        t0 = time.perf_counter()
        engine.step()
        if full:
            made += len(prompts)
            spent += time.perf_counter() - t0
    for h in handles:
        h.result()
    return made / spent if spent else float("nan")


def speed(model, tok, items: list[dict], batches: list[int], tokens: int, rounds: int) -> dict:
    out = {}
    for b in batches:
        engine = Engine(model, tok, max_batch=b, background=False,
                        threads=torch.get_num_threads())  # --threads
        engine.grammars.warm()
        fit = []  # schemas whose shortest answer fits in --tokens (others are refused)
        for s in items:
            try:
                engine.grammars.state(Grammar.json_schema(s), budget=tokens)  # compiled now
                fit.append(s)
            except GrammarError:
                pass
        free, bound = [], []
        for r in range(rounds):  # each round its own schemas, the same for both sides
            chosen = [fit[(r * b + i) % len(fit)] for i in range(b)]
            prompts = [_prompt(tok, s) for s in chosen]
            grammars = [Grammar.json_schema(s) for s in chosen]
            if r == 0:
                _rate(engine, prompts, [None] * b, 4)  # warm-up
            free.append(_rate(engine, prompts, [None] * b, tokens))
            bound.append(_rate(engine, prompts, grammars, tokens))
            print(f"batch {b} round {r}: free {free[-1]:.1f} tok/s, "
                  f"constrained {bound[-1]:.1f} tok/s", flush=True)
        ratios = [y / x for x, y in zip(free, bound)]
        out[f"batch{b}"] = {"free_tok_s": round(statistics.median(free), 1),
                            "json_schema_tok_s": round(statistics.median(bound), 1),
                            "ratio_of_medians": round(statistics.median(bound)
                                                      / statistics.median(free), 3),
                            "ratio_median_per_round": round(statistics.median(ratios), 3),
                            "ratios_per_round": [round(x, 3) for x in ratios],
                            "schemas_fitting": len(fit)}
        print(f"batch {b}", out[f"batch{b}"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemas", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request, speed part")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-validity", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from slmkit.models import load_model
    from slmkit.models.presets import output_vocab_size

    model, tok = load_model("builtin:smollm2-135m")
    vocab = output_vocab_size(model)
    items = schemas(args.schemas)
    result = {"model": "builtin:smollm2-135m", "threads": args.threads,
              "load_average_at_start": os.getloadavg()[0],
              "refused_features": refused_features(tok, vocab),
              "compile": compile_times(tok, vocab, items)}
    print(json.dumps(result, indent=1), flush=True)
    if not args.skip_validity:
        result["validity"] = validity(model, tok, items, args.max_tokens, 8)
    if not args.skip_speed:
        result["speed"] = speed(model, tok, items, args.batches, args.tokens, args.rounds)
    out = Path(__file__).parent / "results" / "structured.json"
    out.parent.mkdir(exist_ok=True)
    if out.exists():  # a partial run keeps the other parts of the last one
        result = {**json.loads(out.read_text()), **result}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
