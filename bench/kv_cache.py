"""KV cache dtypes side by side: decode step time and cache bytes, fp16 vs int8 (vs fp32).

The model is bench/decode.py's random SmolLM2-135M-shaped Llama (30 layers, 3 KV heads of
64), quantized as there (``--precision``, default int4). One :class:`FastRunner` per cache
dtype holds ``--rows`` sequences whose caches are filled to each ``--contexts`` length; a
decode step of 1 and of ``--rows`` rows at that length is then timed on each runner in
turn, ``--rounds`` times (median kept), so the dtypes compare within minutes of each other.
The int8 cache (``kv_cache="int8"``: int8 codes plus one float32 scale per cached row) is
half of fp16's bytes; what it costs in quality is in ``bench/decode_ppl.py``.

Run under the team lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/kv_cache.py

Writes ``bench/results/kv_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="int4", choices=("fp32", "int8", "int4"))
    ap.add_argument("--kv", default="fp16,int8", help="comma-separated cache dtypes")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--contexts", default="64,512,1024")
    ap.add_argument("--steps", type=int, default=10, help="decode steps per timing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv_cache.json")
    args = ap.parse_args(argv)

    import torch

    import decode as D
    from slmkit.console import print_table
    from slmkit.engine.runner import make_runner

    torch.set_num_threads(args.threads)
    kvs = args.kv.split(",")
    contexts = sorted(int(c) for c in args.contexts.split(","))
    model = D.quantize(D.build_model(torch.float32), args.precision)
    runners = {kv: make_runner(model, args.rows, contexts[-1] + args.steps + 8, kv_cache=kv)
               for kv in kvs}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, model.config.vocab_size, (1, contexts[-1]), generator=g)
    for r in runners.values():
        for slot in range(args.rows):
            r.forward(prompt, [slot], [0])
    times: dict = {}
    for _ in range(args.rounds):
        for ctx in contexts:
            for rows in sorted({1, args.rows}):
                tok = torch.randint(1, model.config.vocab_size, (rows, 1), generator=g)
                for kv, r in runners.items():   # each dtype in turn, same minute
                    r.forward(tok, list(range(rows)), [ctx] * rows)   # warm
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        r.forward(tok, list(range(rows)), [ctx] * rows)
                    times.setdefault((ctx, rows, kv), []).append(
                        (time.perf_counter() - t) / args.steps * 1e3)
    base = kvs[0]
    table, results = [], []
    for ctx in contexts:
        for rows in sorted({1, args.rows}):
            for kv in kvs:
                ms = statistics.median(times[(ctx, rows, kv)])
                ratio = statistics.median(b / a for a, b in zip(times[(ctx, rows, kv)],
                                                                times[(ctx, rows, base)]))
                # bytes of cache one step reads: every row's keys and values up to ctx
                c = runners[kv].cache
                per_pos = c.nbytes / (c.n_slots * c.max_seq_len)
                read = rows * ctx * per_pos
                table.append((str(ctx), str(rows), kv, f"{ms:.2f}", f"{rows * 1e3 / ms:.0f}",
                              f"{read / 1e6:.0f} MB", f"{ratio:.2f}x"))
                results.append({"context": ctx, "rows": rows, "kv_cache": kv, "ms_per_step": ms,
                                "tok_s": rows * 1e3 / ms, "cache_bytes_read": read,
                                f"speed_vs_{base}": ratio})
    print_table(f"{args.precision} decode step by KV cache dtype, median of {args.rounds} "
                f"rounds", table, header=("context", "rows", "KV cache", "ms/step", "tok/s",
                                          "KV read/step", f"vs {base}"))
    sizes = [(kv, f"{runners[kv].cache.nbytes / 1e6:.1f} MB") for kv in kvs]
    print_table(f"KV cache bytes, {args.rows} x {runners[base].max_seq_len} positions", sizes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"precision": args.precision, "rows": args.rows,
                                    "rounds": args.rounds, "results": results,
                                    "cache_bytes": {kv: runners[kv].cache.nbytes for kv in kvs}},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
