"""Function calling (issue 26): base vs LoRA-tuned SmolLM2-135M on the built-in held-out split.

Task: the built-in ``function-calling`` set (:mod:`slmkit.eval.function_calling`): four
tools (calculator, convert_units, find_module over the stdlib, a get_weather stub) and a
few requests no tool answers, every item offering all four tools with ``tool_choice:
"auto"`` (the server's default). Scored as ``slm eval --tasks function-calling`` scores it:
BFCL-style exact call (name and arguments compared as parsed values), greedy, once free
and once under the grammar ``slm serve`` enforces for ``tool_choice: "auto"`` (plain text
or a well-formed call of the offered tools).

Arms, all on the held-out (``val``) split:

* ``base``: the built-in model as it ships;
* ``tuned``: ``slm finetune --method lora --merge`` on the ``train`` split, written out
  as an OpenAI-format ``tools.jsonl`` (request, assistant ``tool_calls``, ``tool`` result,
  final answer; the loss on assistant turns only), exactly what a user would run.

Bar (issue 26): tuned + constrained beats base by >= 30 points of exact-call accuracy
(against the better of base's two modes, so the bar cannot be met by the grammar alone).

Training is bounded by steps (``--max-steps``, default 11: about one pass over the 48
default rows at batch 4), not by time, so the result does not depend on how busy the
machine is (a minutes cap once gave 8 steps on a loaded box and 11 on a quieter one, +29 vs
+46 points). ``--max-minutes`` (default 60) is only a safety; if it stops training before
``--max-steps`` the run says so and gives no verdict.

    nice -n 10 .venv/bin/python bench/function_calling.py    # 48 rows, 11 steps, 24 items: ~35 min on 2 busy cores
    .venv/bin/python bench/function_calling.py --eval-items 0   # the whole held-out split (119 items)
    .venv/bin/python bench/function_calling.py --quick          # smoke test

Writes ``bench/results/function_calling.json``; work dir ``.cache/bench-fc/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def finetune(args, work: Path) -> tuple[Path, dict]:
    from slmkit.eval.function_calling import training_rows

    data = work / "tools.jsonl"
    rows = training_rows("train", args.train_rows)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = work / "tuned"
    cmd = [sys.executable, "-m", "slmkit.cli", "finetune", args.model, "--data", str(data),
           "--out", str(out), "--overwrite", "--method", "lora", "--merge",
           "--rank", str(args.rank), "--alpha", str(2 * args.rank), "--lr", str(args.lr),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--max-steps", str(args.max_steps), "--max-minutes", str(args.max_minutes),
           "--warmup-steps", "5", "--threads", str(args.threads), "--log-every", "10",
           "--json"]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"slm finetune failed ({r.returncode}):\n{r.stderr[-3000:]}")
    start = r.stdout.find("{")
    info = json.loads(r.stdout[start:]) if start >= 0 else {}
    return out, {"rows": len(rows), "wall_s": wall, "command": " ".join(cmd[2:]),
                 "result": info}


def score(ref: str, items, threads: int) -> dict:
    import torch

    from slmkit.eval.function_calling import score_function_calls
    from slmkit.models import load_model

    torch.set_num_threads(threads)
    model, tok = load_model(ref)
    out = {}
    for mode in ("constrained", "unconstrained"):
        t0 = time.perf_counter()
        res = score_function_calls(model, tok, items, modes=(mode,), batch=8)
        suffix = "" if mode == "constrained" else "_unconstrained"
        out[mode] = {"exact_call": res[f"exact_call{suffix}"], "parsed": res[f"parsed{suffix}"],
                     "name_match": res[f"name_match{suffix}"],
                     "seconds": time.perf_counter() - t0,
                     "examples": [p[f"prediction{suffix}"] for p in res["predictions"][:4]],
                     "per_tool": _per_tool(items, res["predictions"], suffix)}
        print(f"  {ref} {mode}: exact {out[mode]['exact_call']:.3f} parsed "
              f"{out[mode]['parsed']:.3f} ({out[mode]['seconds']:.0f} s)", flush=True)
    return out


def _per_tool(items, predictions, suffix) -> dict:
    acc: dict[str, list[int]] = {}
    for it, p in zip(items, predictions):
        name = it["answer"][0]["name"] if it["answer"] else "(no call)"
        acc.setdefault(name, []).append(int(p[f"exact{suffix}"]))
    return {k: f"{sum(v)}/{len(v)}" for k, v in sorted(acc.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--train-rows", type=int, default=48)
    ap.add_argument("--eval-items", type=int, default=24, help="0: the whole held-out split")
    ap.add_argument("--max-steps", type=int, default=11, help="LoRA steps (what bounds training)")
    ap.add_argument("--max-minutes", type=float, default=60.0,
                    help="safety cap only: a run it cuts short gets no verdict")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=640)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64,
                    help="per item (a call is ~35 tokens)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.train_rows, args.eval_items, args.max_steps = 16, 8, 4
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from slmkit.eval.function_calling import builtin_items

    items = [{**it, "max_new_tokens": args.max_new_tokens}
             for it in builtin_items("val", args.eval_items or None)]
    work = ROOT / ".cache" / "bench-fc"
    work.mkdir(parents=True, exist_ok=True)
    print(f"held-out items: {len(items)}", flush=True)
    t0 = time.perf_counter()
    base = score(args.model, items, args.threads)
    tuned_dir, train = finetune(args, work)
    print(f"finetune: {train['wall_s']:.0f} s, {train['rows']} rows", flush=True)
    tuned = score(str(tuned_dir), items, args.threads)

    best_base = max(base["constrained"]["exact_call"], base["unconstrained"]["exact_call"])
    gain = tuned["constrained"]["exact_call"] - best_base
    steps = train["result"].get("steps")
    complete = steps == args.max_steps
    bar = gain >= 0.30 if complete else None
    print("\n| model | exact call, constrained | exact call, free | parses (free) |")
    print("|---|---|---|---|")
    for name, r in (("base", base), ("LoRA-tuned", tuned)):
        print(f"| {name} | {r['constrained']['exact_call']:.3f} | "
              f"{r['unconstrained']['exact_call']:.3f} | {r['unconstrained']['parsed']:.3f} |")
    verdict = (("PASS" if bar else "FAIL") if complete else
               f"NO VERDICT: --max-minutes stopped training at {steps} of {args.max_steps} steps")
    print(f"\ntuned ({steps} LoRA steps) + constrained - best base = {gain * 100:+.1f} points: "
          f"{verdict} (bar: >= 30)")
    res = {"model": args.model, "items": len(items), "args": vars(args), "base": base,
           "tuned": tuned, "train": train, "steps": steps, "gain_points": gain * 100,
           "bar_pass": bar,
           "wall_s": time.perf_counter() - t0}
    name = "function_calling-quick.json" if args.quick else "function_calling.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
