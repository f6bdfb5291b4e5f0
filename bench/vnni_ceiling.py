"""The compute ceiling of the engine's int4 tiles: VNNI instructions per ns on one core.

From 8 activation rows on, an int4 decode step is bound by the VNNI units, not by memory
(one pass over the weights serves all rows). This measures, on one core and from cache:

* ``vnni_alone``: back-to-back ``vpdpbusd`` (the peak);
* ``vnni_cvt_mul_fma``: the same plus, per 8 of them, the int->float conversion, multiply
  and multiply-add that ``q4_panel`` spends per 32-column block and activation row;
* ``vnni_cvt_fma``: the same without the multiply;
* ``q4_panel_8``: the engine's int4 tile itself (8 rows, groups of 32), compiled from
  ``slmkit/engine/native/decode.c`` as the engine compiles it.

Each is run ``--rounds`` times in turn; the table shows medians and each rate as a
fraction of ``vnni_alone``. Needs a C compiler and an AVX-512 VNNI CPU. Run under the team
lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/vnni_ceiling.py

Writes ``bench/results/vnni_ceiling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HARNESS = ROOT / "bench" / "vnni_ceiling.c"
DECODE_C = ROOT / "slmkit" / "engine" / "native" / "decode.c"
NAMES = ("vnni_alone", "vnni_cvt_mul_fma", "vnni_cvt_fma", "q4_panel_8")


def build(out: Path) -> str | None:
    """Compile the harness into ``out``; the reason when it cannot run here, else None."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc or gcc) on PATH"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    if "avx512_vnni" not in flags.split():
        return "this CPU has no AVX-512 VNNI"
    res = subprocess.run([cc, "-O3", "-march=native", "-fopenmp", f'-DDECODE_C="{DECODE_C}"',
                          "-o", str(out), str(HARNESS), "-lm"], capture_output=True, text=True)
    if res.returncode:
        return f"{cc} failed: {res.stderr.strip()[:300]}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20_000_000, help="16-instruction groups per round")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vnni_ceiling.json")
    args = ap.parse_args(argv)

    from slmkit.console import print_table

    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "vnni_ceiling"
        why = build(exe)
        if why:
            print(f"bench/vnni_ceiling.py cannot run here: {why}.", file=sys.stderr)
            return 2
        runs: dict[str, list[float]] = {k: [] for k in NAMES}
        for _ in range(args.rounds):
            out = subprocess.run([str(exe), str(args.n)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for line in out.stdout.splitlines():
                name, rate = line.split()
                runs[name].append(float(rate))
    med = {k: statistics.median(v) for k, v in runs.items()}
    peak = med["vnni_alone"]
    print_table(f"VNNI instructions per ns, one core, median of {args.rounds}",
                [(k, f"{med[k]:.2f}", f"{med[k] / peak:.0%}",
                  f"{min(runs[k]):.2f}-{max(runs[k]):.2f}") for k in NAMES],
                header=("measurement", "per ns", "of vnni_alone", "range"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "median_per_ns": med,
                                    "runs_per_ns": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
