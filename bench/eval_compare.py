"""The reference model and its compressed variants, compared side by side with ``slm compare``.

Builds (once, cached under ``.cache/bench-eval/``) the variants of the shared reference
model that the compression verbs make, then runs one comparison on the same validation
text and task items, and prints each figure as a ratio to the reference measured in the
same run::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/eval_compare.py [--quick] [--model DIR]

Writes ``bench/results/eval_compare/`` (the report directory: results.json, report.md,
report.html, plots) and ``bench/results/eval_compare.json`` (the ratio table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: name -> slm verb arguments that make it from the reference (MODEL and --out appended).
VARIANTS = {
    "int8-rtn": ["quantize", "--method", "rtn", "--bits", "8"],
    "int4-rtn": ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "64"],
    "int4-gptq": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "64",
                  "--calib-samples", "32", "--calib-seq-len", "256"],
    "wanda-50": ["prune", "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "32",
                 "--calib-seq-len", "256"],
}


def build_variants(reference: Path, work: Path) -> list[Path]:
    """Make each variant with the real CLI; a variant that fails is reported and skipped."""
    made = []
    for name, args in VARIANTS.items():
        out = work / name
        if not (out / "config.json").is_file():
            cmd = [sys.executable, "-m", "slmkit.cli", "-q", *args, str(reference),
                   "--out", str(out)]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"[skip] {name}: {r.stderr.strip().splitlines()[-1:]}")
                continue
            print(f"[made] {name} in {time.perf_counter() - t0:.0f} s")
        made.append(out)
    return made


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 kB of text, 20 task items")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None,
                        help="base model dir (default: the shared reference model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench.reference import reference_model_dir
    from slmkit.console import configure
    from slmkit.eval.compare import compare

    configure()
    reference = args.model or reference_model_dir()
    work = ROOT / ".cache" / "bench-eval" / reference.name
    work.mkdir(parents=True, exist_ok=True)
    models = [reference, *build_variants(reference, work)]
    out = ROOT / "bench" / "results" / "eval_compare"
    t0 = time.perf_counter()
    res = compare([str(m) for m in models], out, overwrite=True,
                  task_specs=["stdlib"], task_limit=20 if args.quick else 50,
                  max_bytes=20_000 if args.quick else 200_000)
    took = time.perf_counter() - t0
    base = res["models"][0]["summary"]
    rows = []
    print(f"\nslm compare of {len(models)} models took {took:.0f} s "
          f"({args.threads} threads); ratios are to the reference, same run")
    head = (f"{'model':<22}{'size':>8}{'bits/w':>8}{'bpb':>8}{'Δbpb':>8}{'decode×':>9}"
            f"{'prefill128×':>12}{'docmc acc':>10}{'nextline EM':>12}")
    print(head)
    for m in res["models"]:
        if m.get("error"):
            print(f"{m['label']:<22} failed: {m['error']}")
            continue
        s = m["summary"]

        def ratio(key, s=s):
            return s[key] / base[key] if s.get(key) and base.get(key) else None

        row = {"model": m["label"], "size_ratio": ratio("size_on_disk"),
               "bits_per_weight": s["bits_per_weight"], "bits_per_byte": s["bits_per_byte"],
               "delta_bpb": s["bits_per_byte"] - base["bits_per_byte"],
               "decode_speed_ratio": ratio("decode_tok_s"),
               "prefill128_speed_ratio": ratio("prefill_tok_s@128"),
               "docstring_mc_acc": s.get("stdlib-docstring-mc:acc"),
               "nextline_em": s.get("stdlib-nextline:exact_match"),
               "decode_tok_s": s["decode_tok_s"]}
        rows.append(row)
        print(f"{row['model']:<22}{row['size_ratio']:>8.3f}{row['bits_per_weight']:>8.2f}"
              f"{row['bits_per_byte']:>8.4f}{row['delta_bpb']:>+8.4f}"
              f"{row['decode_speed_ratio']:>9.2f}{row['prefill128_speed_ratio']:>12.2f}"
              f"{row['docstring_mc_acc']:>10.3f}{row['nextline_em']:>12.3f}")
    (ROOT / "bench" / "results" / "eval_compare.json").write_text(json.dumps(
        {"seconds": took, "threads": args.threads, "quick": args.quick, "rows": rows},
        indent=2) + "\n")
    print(f"report: {out}/report.html")


if __name__ == "__main__":
    main()
