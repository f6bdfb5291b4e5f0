"""Speculative decoding: tokens/s with and without drafts, on the built-in model, greedy.

Model: ``builtin:smollm2-135m`` (SmolLM2-135M-Instruct, fp32, native decode step), chat
template, temperature 0. Two prompt sets:

* **copying** (the output copies the input): a RAG answer quoting its passage, code edits
  (rename, add a docstring), a text to repeat with its typos fixed, a list to reformat;
* **open chat**: questions whose answers are not in the prompt.

Drafts (``Engine(draft=...)``, what ``slm generate/serve --draft`` build):

* ``ngram``: prompt lookup;
* ``model``: a draft model sharing the tokenizer. ``--draft-model DIR`` takes one (e.g. a
  student from ``slm distill``); without it the draft is the target's own quantized copy
  (RTN, embeddings included; ``--draft-quant int8``, per channel, the default, or ``int4``
  g32), built in memory, because no distilled student of the built-in model ships with
  slmkit and training one does not fit in a benchmark. The fp32 target's decode step streams
  4 bytes a weight, the int8 copy's 1 (measured on the loaded box: a draft step costs 0.29 of
  a target step, int4 0.25) and the int8 copy agrees with the target far more often. This
  row drafts with the model alone (a bare ``ModelDrafter``);
* ``model+lookup``: what ``--draft DIR`` builds: prompt lookup where the prompt and output
  so far have a match, the same draft model otherwise (``LookupThenModel``).

For every prompt the configurations run in turn (baseline, ngram, model, baseline, ngram,
... ``--rounds`` times, A B C A B C), each with its own engine, so a busy machine's drift
hits them alike; each keeps its median time. Reported: decode tokens/s (tokens after the
first over the time after the first), the ratio to the baseline, whether the tokens are
identical to the baseline's (they must be), acceptance and whether drafting switched
itself off. Bars (issue 32): >= 1.3x on the copying prompts with identical output, never
below 0.95x on open chat (per-set ratio of total tokens over total time).

    nice -n 10 .venv/bin/python bench/speculative.py

Writes ``bench/results/speculative.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PASSAGE = ("The Rhine is a river that begins in the Swiss Alps, flows along the border "
           "between Germany and France, and reaches the North Sea in the Netherlands. It is "
           "about 1,230 kilometres long, and for centuries it has been one of the most "
           "important trade routes in Europe.")
CODE = '''def total_price(items, tax):
    result = 0
    for item in items:
        result = result + item.price * item.quantity
    result = result * (1 + tax)
    return round(result, 2)
'''
COPYING = [
    f"Read this passage:\n\n{PASSAGE}\n\nQuote the sentence of the passage that says how "
    "long the Rhine is, word for word.",
    f"Rename the variable `result` to `total` in this Python function and show the whole "
    f"function:\n\n```python\n{CODE}```",
    f"Add a one-line docstring to this Python function and show the whole function:"
    f"\n\n```python\n{CODE}```",
    "Repeat this text exactly, but fix the spelling mistakes: 'The comittee will meet on "
    "Tuesday to dicsuss the new budget. Every departmant must send its report before the "
    "meeting, and all reports must be writen in English.'",
    "Rewrite this list as a numbered list, keeping every item as it is: apples, green "
    "pears, red grapes, two lemons, a bag of oranges, fresh strawberries, and one melon.",
]
CHAT = [
    "Tell me a short story about a dragon who is afraid of the dark.",
    "What are three good habits for staying healthy?",
    "Explain how a rainbow forms.",
    "Write a short poem about autumn leaves.",
    "Why do cats purr?",
]


def load(args):
    from slmkit.models import load_model

    model, tok = load_model(args.model)
    return model, tok


def draft_model(args, model, tok):
    """The draft (a directory, or a ``(model, tokenizer)`` pair) and its description."""
    import copy

    from slmkit.compress.quantize import make_config, quantize_model

    if args.draft_model:
        return args.draft_model, args.draft_model
    draft = copy.deepcopy(model)
    scheme = dict(bits=8, group_size=-1) if args.draft_quant == "int8" else \
        dict(bits=4, group_size=32)
    quantize_model(draft, tok, make_config(method="rtn", quantize_embeddings=True, **scheme))
    g = "per channel" if scheme["group_size"] == -1 else f"g{scheme['group_size']}"
    return (draft, tok), (f"the target's {args.draft_quant} RTN copy ({g}, embeddings too), "
                          "in memory")


def engine_for(model, tok, draft, threads, max_seq_len):
    from slmkit.engine import Engine

    return Engine(model, tok, max_batch=1, max_seq_len=max_seq_len, background=False,
                  threads=threads, draft=draft)


def run_one(engine, ids, params):
    t0 = time.perf_counter()
    c = engine.generate(ids, params)
    total = time.perf_counter() - t0
    return c, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--draft-model", default=None, help="a draft model dir (default: the "
                    "target's RTN copy, see --draft-quant)")
    ap.add_argument("--draft-quant", default="int8", choices=["int8", "int4"],
                    help="the in-memory draft: the target's int8 (per channel) or int4 (g32) "
                    "RTN copy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="engine threads (1: a shared "
                    "machine's second core is often busy, and two threads would then time "
                    "spin barriers rather than decoding)")
    ap.add_argument("--limit", type=int, default=None, help="prompts per set (default all)")
    ap.add_argument("--drafts", default="ngram,model,model+lookup")
    ap.add_argument("--sets", default="copying,chat")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speculative.json"))
    args = ap.parse_args()

    import torch

    from slmkit.engine import SamplingParams
    from slmkit.engine.generate import chat_stop_ids, encode_prompt

    torch.manual_seed(0)
    model, tok = load(args)
    names = ["baseline"] + [d for d in args.drafts.split(",") if d]
    drafts = {"baseline": None, "ngram": "ngram"}
    notes = {}
    max_seq = 1024
    if "model" in names or "model+lookup" in names:
        from slmkit.engine.speculative import ModelDrafter
        from slmkit.models import load_model
        from slmkit.models.presets import output_vocab_size

        pair, notes["model draft"] = draft_model(args, model, tok)
        drafts["model+lookup"] = pair
        dm = pair[0] if isinstance(pair, tuple) else load_model(pair)[0]
        drafts["model"] = ModelDrafter(dm, 1, max_seq, output_vocab_size(model), name="model")
    engines = {n: engine_for(model, tok, drafts[n], args.threads, max_seq) for n in names}
    print(f"engine path: {engines['baseline'].path}; threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    sets = {"copying": COPYING, "chat": CHAT}
    stop = chat_stop_ids(tok)
    rows = []
    for set_name in args.sets.split(","):
        for pi, prompt in enumerate(sets[set_name][:args.limit]):
            ids = encode_prompt(tok, prompt, chat=True)
            params = lambda: SamplingParams(max_tokens=args.max_tokens, temperature=0,  # noqa
                                            stop_token_ids=stop)
            times = {n: [] for n in names}
            comps = {}
            for _ in range(args.rounds):          # A B C A B C ...
                for n in names:
                    c, total = run_one(engines[n], ids, params())
                    decode = total - c.ttft_s
                    times[n].append(decode)
                    comps[n] = c
            base = comps["baseline"]
            n_dec = max(1, len(base.token_ids) - 1)
            row = {"set": set_name, "prompt": pi, "prompt_tokens": len(ids),
                   "tokens": len(base.token_ids), "text": base.text}
            for n in names:
                t = statistics.median(times[n])
                row[n] = {"decode_s": round(t, 4), "tok_s": round(n_dec / t, 2),
                          "identical": comps[n].token_ids == base.token_ids,
                          "spec": comps[n].speculative}
            for n in names[1:]:
                row[n]["ratio"] = round(row["baseline"]["decode_s"] / row[n]["decode_s"], 3)
            rows.append(row)
            print(f"[{set_name} {pi}] {len(base.token_ids)} tokens; "
                  + "; ".join(f"{n} {row[n]['tok_s']:.1f} tok/s"
                              + (f" x{row[n]['ratio']:.2f}"
                                 f" {'same' if row[n]['identical'] else 'DIFFERENT'}"
                                 f" acc {row[n]['spec']['accepted']}/"
                                 f"{row[n]['spec']['drafted']}"
                                 f"{' OFF' if row[n]['spec']['off'] else ''}"
                                 if n != 'baseline' else '')
                              for n in names), flush=True)
    summary = {}
    for set_name in args.sets.split(","):
        rs = [r for r in rows if r["set"] == set_name]
        for n in names[1:]:
            tok_total = sum(max(1, r["tokens"] - 1) for r in rs)
            base_t = sum(r["baseline"]["decode_s"] for r in rs)
            t = sum(r[n]["decode_s"] for r in rs)
            summary[f"{set_name}/{n}"] = {
                "ratio": round(base_t / t, 3), "baseline_tok_s": round(tok_total / base_t, 2),
                "tok_s": round(tok_total / t, 2),
                "identical": all(r[n]["identical"] for r in rs),
                "turned_off": sum(bool(r[n]["spec"]["off"]) for r in rs)}
    bars = {}
    for n in names[1:]:
        if f"copying/{n}" in summary:
            s = summary[f"copying/{n}"]
            bars[f"copying/{n} >= 1.3x, identical"] = s["ratio"] >= 1.3 and s["identical"]
        if f"chat/{n}" in summary:
            bars[f"chat/{n} >= 0.95x"] = summary[f"chat/{n}"]["ratio"] >= 0.95
    print("\nset/draft        ratio  tok/s (base -> spec)  identical  turned off")
    for k, s in summary.items():
        print(f"{k:16s} {s['ratio']:5.2f}  {s['baseline_tok_s']:6.1f} -> {s['tok_s']:6.1f}"
              f"       {s['identical']!s:5s}      {s['turned_off']}")
    for k, ok in bars.items():
        print(f"bar {k}: {'PASS' if ok else 'FAIL'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "threads": args.threads,
                               "rounds": args.rounds, "max_tokens": args.max_tokens,
                               "notes": notes, "load_average_end": os.getloadavg(),
                               "rows": rows, "summary": summary, "bars": bars}, indent=1))
    print(f"wrote {out} (load average at end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
