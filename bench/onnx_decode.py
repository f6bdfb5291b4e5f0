"""Decode speed: ONNX Runtime (fp32 and dynamic int8) vs the slmkit engine, in one run.

Model: the random SmolLM2-135M-shaped Llama of ``bench/decode.py`` (same builder, so the
figures sit beside that benchmark's). It is exported with ``slmkit.export.onnx_export``
(KV-cache decoder) to a temp dir, fp32 and ``--int8``.

Measured side by side, batch 1, greedy, 2 threads each (``--threads``):

* time to first token (prefill of ``--prompt-len`` tokens) and decode tok/s;
* each as a ratio to the slmkit engine (``slmkit.engine.stream_tokens``, fp32) measured in
  the same run;
* rounds are interleaved (engine, ONNX fp32, ONNX int8, again) and the best of each kept,
  so a change in machine load hits all three alike;
* a correctness check: the first 16 greedy tokens of ONNX fp32 equal the engine's.

Run under the team lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/onnx_decode.py

Writes ``bench/results/onnx_decode.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import build_model, slmkit_runner  # noqa: E402
from slmkit.console import print_table  # noqa: E402
from slmkit.engine import stream_tokens  # noqa: E402
from slmkit.export.onnx_export import write_decoder  # noqa: E402
from slmkit.export.onnx_runner import OnnxRunner  # noqa: E402


def time_onnx(runner: OnnxRunner, prompt: list[int], n: int, rounds: int = 2) -> dict:
    """TTFT and decode tok/s of :meth:`OnnxRunner.stream_tokens` (best of ``rounds``)."""
    for _ in runner.stream_tokens(prompt[:8], 4, stop_at_eos=False):  # warm up
        pass
    best = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        stream = runner.stream_tokens(prompt, n, stop_at_eos=False)
        next(stream)
        t1 = time.perf_counter()
        count = sum(1 for _ in stream)
        t2 = time.perf_counter()
        run = {"ttft_s": t1 - t0, "prefill_tok_s": len(prompt) / (t1 - t0),
               "decode_tok_s": count / (t2 - t1)}
        if best is None or run["decode_tok_s"] > best["decode_tok_s"]:
            best = run
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best kept)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "onnx_decode.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(torch.float32)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, int8 in (("onnx fp32", False), ("onnx int8", True)):
            d = Path(tmp) / name.replace(" ", "-")
            d.mkdir()
            t = time.perf_counter()
            write_decoder(model, d, int8=int8, eos_token_id=model.config.eos_token_id)
            print(f"exported {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            runners[name] = OnnxRunner(d, threads=args.threads)
        engine_once = slmkit_runner(model, prompt, args.new_tokens)
        for _ in range(args.rounds):       # interleaved, best of rounds: load drifts
            runs = {"slmkit engine fp32": max((engine_once() for _ in range(2)),
                                              key=lambda r: r["decode_tok_s"])}
            for name, runner in runners.items():
                runs[name] = time_onnx(runner, prompt, args.new_tokens)
            for name, r in runs.items():
                if name not in results or r["decode_tok_s"] > results[name]["decode_tok_s"]:
                    results[name] = r
        ours = list(runners["onnx fp32"].stream_tokens(prompt, 16, stop_at_eos=False))
        engine = list(stream_tokens(model, prompt, 16))
    base = results["slmkit engine fp32"]
    rows = []
    for name, r in results.items():
        r["decode_vs_engine"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["ttft_vs_engine"] = r["ttft_s"] / base["ttft_s"]
        rows.append((name, f"{r['decode_tok_s']:.1f}", f"{r['decode_vs_engine']:.2f}x",
                     f"{r['ttft_s'] * 1000:.0f}", f"{r['ttft_vs_engine']:.2f}x"))
    print_table(f"decode, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
                f"{args.threads} threads", rows,
                header=("runtime", "decode tok/s", "vs engine", "TTFT ms", "TTFT vs engine"))
    same = ours == engine
    print_table("check", [("first 16 greedy tokens, onnx fp32 vs engine",
                           "same" if same else f"differ: {ours} vs {engine}")])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": "random SmolLM2-135M-shaped Llama (bench/decode.py)",
        "threads": args.threads, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "machine": platform.processor() or platform.machine(),
        "greedy_match_16": same, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
