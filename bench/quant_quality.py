"""Quantization quality: perplexity and bits per byte of RTN, GPTQ and AWQ at 8/4/3 bits.

Runs on the team reference model (``bench/reference.py``: micro preset, hidden 192, trained
on the stdlib) and scores every variant on the ``stdlib`` validation split with
``slmkit.eval.perplexity.perplexity`` (same windows and tokens for all):

* fp32 (dense);
* int8 RTN per channel, symmetric;
* 4-bit, group 64: RTN, GPTQ, AWQ (the issue asks for group 128, but 128 does not divide
  the micro model's hidden size 192; group 64 is the closest valid grid);
* 4-bit, group 32: RTN, GPTQ, AWQ;
* bonus: 3-bit group 64 RTN and GPTQ.

4- and 3-bit rows use the asymmetric grid (zero points), GPTQ uses act-order. Quantized
models run through ``QuantLinear``'s real kernels (bf16 activations), as users get them.

Bars (issue 4): int8 RTN within +1% perplexity of fp32; at 4 bit (group 64 standing in for
128) GPTQ and AWQ each recover at least half of the perplexity increase RTN causes.
Published anchors, for context: OPT-125M per channel, WikiText-2: fp16 27.65, RTN 4-bit
37.28, GPTQ 31.12; LLaMA-7B g128: fp16 5.68, RTN 5.96, AWQ 5.78.

Run under the team lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/quant_quality.py

Writes ``bench/results/quant_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = [
    ("fp32", None),
    ("int8 RTN", dict(method="rtn", bits=8, group_size=-1, sym=True)),
    ("4-bit g64 RTN", dict(method="rtn", bits=4, group_size=64, sym=False)),
    ("4-bit g64 GPTQ", dict(method="gptq", bits=4, group_size=64, sym=False, act_order=True)),
    ("4-bit g64 AWQ", dict(method="awq", bits=4, group_size=64, sym=False)),
    ("4-bit g32 RTN", dict(method="rtn", bits=4, group_size=32, sym=False)),
    ("4-bit g32 GPTQ", dict(method="gptq", bits=4, group_size=32, sym=False, act_order=True)),
    ("4-bit g32 AWQ", dict(method="awq", bits=4, group_size=32, sym=False)),
    ("4-bit per-channel RTN", dict(method="rtn", bits=4, group_size=-1, sym=False)),
    ("4-bit per-channel GPTQ", dict(method="gptq", bits=4, group_size=-1, sym=False,
                                    act_order=True)),
    ("4-bit per-channel AWQ", dict(method="awq", bits=4, group_size=-1, sym=False)),
    ("3-bit g64 RTN", dict(method="rtn", bits=3, group_size=64, sym=False)),
    ("3-bit g64 GPTQ", dict(method="gptq", bits=3, group_size=64, sym=False, act_order=True)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model dir (default: the reference model)")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens scored")
    ap.add_argument("--seq-len", type=int, default=256, help="perplexity window")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="variant names to run (default all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                    "quant_quality.json")
    args = ap.parse_args(argv)

    import torch

    from slmkit.compress.quantize import make_config, quantize_model
    from slmkit.console import print_table
    from slmkit.eval.perplexity import perplexity
    from slmkit.models import load_model

    torch.set_num_threads(args.threads)
    if args.model is None:
        sys.path.insert(0, str(ROOT / "bench"))
        from reference import reference_model_dir

        args.model = reference_model_dir()
    results = []
    for name, opts in VARIANTS:
        if args.only and name not in args.only and name != "fp32":
            continue
        model, tok = load_model(args.model)
        t0 = time.perf_counter()
        bpw = 32.0
        if opts is not None:
            cfg = make_config(**opts, calib_samples=args.calib_samples,
                              calib_seq_len=args.calib_seq_len)
            bpw = quantize_model(model, tok, cfg)["bits_per_weight"]
        secs = time.perf_counter() - t0
        ppl = perplexity(model, tok, data="stdlib", split="val", seq_len=args.seq_len,
                         max_tokens=args.eval_tokens)
        results.append({"variant": name, "options": opts, "ppl": ppl["ppl"],
                        "bits_per_byte": ppl["bits_per_byte"], "loss": ppl["loss"],
                        "tokens": ppl["tokens"], "bits_per_weight": bpw,
                        "quantize_seconds": round(secs, 1)})
        print(f"{name}: ppl {ppl['ppl']:.3f}  bpb {ppl['bits_per_byte']:.4f}  "
              f"({secs:.0f}s)", flush=True)

    by = {r["variant"]: r for r in results}
    fp32 = by["fp32"]["ppl"]
    rows = []
    for r in results:
        rows.append((r["variant"], f"{r['bits_per_weight']:.2f}", f"{r['ppl']:.3f}",
                     f"{(r['ppl'] / fp32 - 1) * 100:+.2f}%", f"{r['bits_per_byte']:.4f}",
                     f"{r['quantize_seconds']:.0f}s"))
    print_table(f"quantization quality on {args.model} (stdlib val, "
                f"{results[0]['tokens']:,} tokens)", rows,
                header=("variant", "bits/weight", "ppl", "vs fp32", "bits/byte", "time"))
    bars = []
    if "int8 RTN" in by:
        d = by["int8 RTN"]["ppl"] / fp32 - 1
        bars.append(("int8 RTN within +1% of fp32", d <= 0.01, f"{d * 100:+.2f}%"))
    for g in ("g64", "g32", "per-channel"):
        rtn = by.get(f"4-bit {g} RTN")
        for method in ("GPTQ", "AWQ"):
            r = by.get(f"4-bit {g} {method}")
            if rtn is None or r is None:
                continue
            rise = rtn["ppl"] - fp32
            recovered = (rtn["ppl"] - r["ppl"]) / rise if rise > 0 else float("nan")
            bars.append((f"4-bit {g} {method} recovers >= 1/2 of RTN's rise",
                         recovered >= 0.5, f"{recovered:.0%} recovered"))
    print_table("bars (issue 4; g64 stands in for g128)",
                [(b, "PASS" if ok else "FAIL", v) for b, ok, v in bars],
                header=("bar", "result", "measured"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "eval_tokens": args.eval_tokens,
                                    "seq_len": args.seq_len,
                                    "calib": [args.calib_samples, args.calib_seq_len],
                                    "results": results,
                                    "bars": {b: ok for b, ok, _ in bars}}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
