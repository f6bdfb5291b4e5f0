"""`slm train` in one process vs the same command under `torchrun --nproc-per-node 2`.

Both runs train the same model on the same data with the same global batch (``--batch-size``
is the job's batch, split over the processes), so they take the same steps; the bench
reports what the second process costs or gains on this machine. Runs alternate (1p, 2p, 1p,
2p, ...) so load from other users of a shared machine hits both. One process gets every
core (``--threads`` = cores); each of the 2 processes gets half (torchrun's
``OMP_NUM_THREADS``), the fair split of one box.

Figures per run, from the run's ``slmkit.json``: the loop's steady throughput (tokens/s over
the last logged steps, the loop's own figure) and the wall time of the whole command
(start-up, setup and saving included); plus the final train loss, which must agree.

Usage::

    nice -n 10 .venv/bin/python bench/ddp_throughput.py [--model builtin:smollm2-135m]

Writes ``bench/results/ddp_throughput.json``. On a 2-core machine expect no speed-up:
the point of the 2-process run is that it is the same training, not that it is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def train_args(model: str, out: Path, steps: int, seq_len: int, batch: int) -> list[str]:
    return ["train", "--model", model, "--data", "stdlib-prose", "--out", str(out),
            "--max-steps", str(steps), "--seq-len", str(seq_len), "--batch-size", str(batch),
            "--lr", "3e-4", "--warmup-steps", "2", "--log-every", "1", "--val-fraction", "0",
            "--checkpoint-every", "100000", "--precision", "fp32", "--overwrite"]


def one_run(nproc: int, args: list[str], threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "slmkit.cli", *args, "--threads", str(threads)]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, threads // nproc))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "-m", "slmkit.cli", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed:\n{r.stderr[-3000:]}")
    out = Path(args[args.index("--out") + 1])
    record = json.loads((out / "slmkit.json").read_text())["metrics"]
    hist = json.loads((out / "train_log.json").read_text())["history"]
    return {"nproc": nproc, "wall_s": round(wall, 2), "tokens_per_s": record["tokens_per_s"],
            "world_size": record["world_size"], "final_loss": hist[-1]["loss"],
            "losses": [h["loss"] for h in hist]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slm-ddp-bench"))
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    # warm-up (not counted): imports the model and tokenizes the corpus into the cache
    one_run(1, train_args(a.model, a.workdir / "warmup", 1, a.seq_len, a.batch_size), a.threads)
    shutil.rmtree(a.workdir / "warmup", ignore_errors=True)
    runs = []
    for rep in range(a.repeats):
        for nproc in (1, 2):
            out = a.workdir / f"run-{nproc}p"
            res = one_run(nproc, train_args(a.model, out, a.steps, a.seq_len, a.batch_size),
                          a.threads)
            res["repeat"] = rep
            runs.append(res)
            print(f"repeat {rep} {nproc} process(es): {res['tokens_per_s']:,.0f} tokens/s "
                  f"(loop), {res['wall_s']:.1f} s wall, final loss {res['final_loss']:.4f}",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
    by = {n: [r for r in runs if r["nproc"] == n] for n in (1, 2)}
    tps = {n: statistics.median(r["tokens_per_s"] for r in by[n]) for n in (1, 2)}
    wall = {n: statistics.median(r["wall_s"] for r in by[n]) for n in (1, 2)}
    loss_gap = max(abs(x - y) for r1, r2 in zip(by[1], by[2])
                   for x, y in zip(r1["losses"], r2["losses"]))
    summary = {"model": a.model, "steps": a.steps, "seq_len": a.seq_len,
               "global_batch": a.batch_size, "threads_total": a.threads,
               "tokens_per_s_1p": tps[1], "tokens_per_s_2p": tps[2],
               "ratio_2p_over_1p": tps[2] / tps[1], "wall_s_1p": wall[1], "wall_s_2p": wall[2],
               "max_loss_gap": loss_gap, "runs": runs}
    print(f"median: 1 process {tps[1]:,.0f} tokens/s, 2 processes {tps[2]:,.0f} tokens/s "
          f"(ratio {tps[2] / tps[1]:.2f}); wall {wall[1]:.1f} s vs {wall[2]:.1f} s; "
          f"largest loss gap at a step {loss_gap:.2e}")
    path = Path(__file__).parent / "results" / "ddp_throughput.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
