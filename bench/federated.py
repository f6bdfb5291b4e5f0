"""Federated LoRA benchmark (issue 30): centralised vs client-alone vs FedAvg vs exact vs DP.

Model: the built-in SmolLM2-135M-Instruct (``--model``, default ``builtin:smollm2-135m``).
Task: the built-in ``stdlib-docstring`` (a function's source without its docstring -> its
one-line summary), split **non-IID** over ``--clients`` clients by stdlib package
(``slmkit.federated.split``: whole packages per client). Each client keeps its first
``--train`` rows for training and its next ``--eval`` rows for the held-out set; the
held-out set is the union of all clients' (every client's distribution is scored). The
figure is the completion loss (token-weighted cross-entropy of the docstring, plain
template) on that set, lower is better; *improvement* is the base model's loss minus an
arm's.

Arms, all in slmkit's one training loop with the same LoRA (r, alpha, targets), learning
rate, batch, sequence length and seed:

* ``base``: no training;
* ``central``: LoRA on the union of the clients' training rows, ``rounds x local-steps``
  steps of ``clients x batch-size`` samples: the same samples and the same number of
  sequential updates as the federation (each round's average is one step of K clients);
* ``alone``: each client alone, ``rounds x local-steps`` steps on its own rows (the mean
  over clients is reported, and each);
* ``fedavg``, ``exact``: ``slm federate`` (``run_federate``, simulation: a Flower SuperLink
  and one SuperNode per client as processes on 127.0.0.1), FedAvg of the factors vs the
  exact average of the products (FedEx-LoRA);
* ``dp``: FedAvg with DP-FedAvg at ``--epsilon`` (noise multiplier from Opacus's RDP
  accountant for ``--rounds`` releases, clip ``--dp-clip``).

Also reported: the share of the update FedAvg drops (the exact run's residual ``U V``
against the whole update, Frobenius, summed over layers), bytes each client sends per
round against the adapter's size, and each federated run's wall time and peak memory (the
sum of resident memory over all its processes).

Threads: every process runs one thread (``--threads``), the clients in parallel.
Writes ``bench/results/federated.json``; work dirs under ``.cache/bench-federated/``.

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/federated.py
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_split(args, work: Path, tok) -> tuple[list[str], str, dict]:
    """Client JSONL files and the held-out file; returns (client paths, eval path, facts)."""
    from slmkit.federated.split import package_of, split_by_package
    from slmkit.train.task_data import builtin_task_rows

    rows = [r for r in builtin_task_rows("stdlib-docstring")
            if len(tok(r["prompt"] + r["completion"])["input_ids"]) < args.seq_len]
    parts = split_by_package(rows, args.clients)
    paths, held, facts = [], [], {}
    for k, part in enumerate(parts):
        random.Random(k).shuffle(part)
        train, ev = part[:args.train], part[args.train:args.train + args.eval]
        path = work / f"client-{k + 1}.jsonl"
        path.write_text("".join(json.dumps({"prompt": r["prompt"],
                                            "completion": r["completion"]}) + "\n"
                                for r in train))
        paths.append(str(path))
        held += ev
        facts[f"client-{k + 1}"] = {"train": len(train), "eval": len(ev),
                                    "packages": len({package_of(r["source"]) for r in part})}
    ev_path = work / "heldout.jsonl"
    ev_path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion":
                                           r["completion"]}) + "\n" for r in held))
    return paths, str(ev_path), facts


def local_arm(cfg, data: list[str] | str, steps: int, heldout: list, batch: int | None = None
              ) -> dict:
    """LoRA in the one loop on ``data`` for ``steps`` steps, scored on the held-out set."""
    from slmkit.federated.adapters import build_adapted
    from slmkit.federated.local import heldout_loss, load_examples, train_round

    t0 = time.perf_counter()
    if batch:
        cfg = cfg.model_copy(update={"batch_size": batch})
    model, tok = build_adapted(cfg)
    examples = load_examples(cfg, data, tok)
    train_round(model, tok, examples, cfg, 1, steps=steps)
    return {"eval_loss": heldout_loss(model, tok, heldout, cfg),
            "seconds": time.perf_counter() - t0, "samples": len(examples)}


def residual_share(out: Path, rnd: int, scale: float) -> float:
    """||U V|| / ||s B̄ Ā + U V|| summed over layers, from the exact run's last checkpoint."""
    from safetensors.torch import load_file

    from slmkit.federated.server import unpack_residual

    ck = out / "checkpoints" / f"round-{rnd:04d}"
    f = load_file(ck / "adapter.safetensors")
    res = unpack_residual(load_file(ck / "residual.safetensors"))
    dropped = total = 0.0
    for key, (U, V) in res.items():
        uv = U @ V
        whole = scale * f[f"{key}::B"] @ f[f"{key}::A"] + uv
        dropped += float(uv.norm() ** 2)
        total += float(whole.norm() ** 2)
    return (dropped / total) ** 0.5 if total else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--train", type=int, default=32, help="training rows per client")
    ap.add_argument("--eval", type=int, default=6, help="held-out rows per client")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--dp-clip", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", default="central,alone,fedavg,exact,dp")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "federated.json"))
    args = ap.parse_args()

    import torch

    from slmkit.federated.config import FederateConfig
    from slmkit.federated.launch import run_federate
    from slmkit.federated.local import load_examples
    from slmkit.models import load_tokenizer
    from slmkit.models.io import resolve_ref

    torch.set_num_threads(args.threads)
    arms = args.arms.split(",")
    work = ROOT / ".cache" / "bench-federated"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = str(resolve_ref(args.model))
    tok = load_tokenizer(model_dir)
    clients, heldout_path, facts = write_split(args, work, tok)
    cfg = FederateConfig(model=model_dir, clients=clients, rounds=args.rounds,
                         local_steps=args.local_steps, rank=args.rank, lr=args.lr,
                         seq_len=args.seq_len, batch_size=args.batch_size, template="plain",
                         threads=args.threads, eval_data=heldout_path)
    heldout = load_examples(cfg, heldout_path, tok)
    results: dict = {"config": vars(args), "split": facts, "arms": {}}
    steps = args.rounds * args.local_steps

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))

    if "central" in arms:
        results["arms"]["central"] = local_arm(cfg, clients, steps, heldout,
                                               batch=args.clients * args.batch_size)
        print("central", results["arms"]["central"], flush=True)
        save()
    if "alone" in arms:
        each = [local_arm(cfg, c, steps, heldout) for c in clients]
        results["arms"]["alone"] = {"eval_loss": sum(e["eval_loss"] for e in each) / len(each),
                                    "each": each}
        print("alone", results["arms"]["alone"], flush=True)
        save()
    fed = {"fedavg": {}, "exact": {"aggregation": "exact"},
           "dp": {"dp_clip": args.dp_clip, "dp_epsilon": args.epsilon}}
    for arm, extra in fed.items():
        if arm not in arms:
            continue
        out = work / arm
        r = run_federate(cfg.model_copy(update={"out": str(out), **extra}))
        figs = {k: v for k, v in r.figures.items() if not isinstance(v, (list, dict))}
        figs["round_eval_loss"] = [h.get("eval_loss") for h in json.loads(
            (out / "slmkit.json").read_text())["metrics"]["round_history"]]
        if arm == "exact":
            figs["fedavg_drops_share"] = residual_share(out, args.rounds, 16.0 / args.rank)
        results["arms"][arm] = figs
        results["base_eval_loss"] = figs.get("eval_loss_start")
        print(arm, figs, flush=True)
        save()
    report(results)
    save()


def report(results: dict) -> None:
    base = results.get("base_eval_loss")
    a = results["arms"]
    print(f"\nheld-out completion loss (base {base:.4f}); improvement = base - arm")
    for name, r in a.items():
        imp = base - r["eval_loss"] if base is not None else float("nan")
        print(f"  {name:8s} loss {r['eval_loss']:.4f}  improvement {imp:+.4f}")
    if base is not None and "central" in a:
        c = base - a["central"]["eval_loss"]
        for name in ("fedavg", "exact"):
            if name in a and c > 0:
                share = (base - a[name]["eval_loss"]) / c
                results[f"{name}_share_of_central"] = share
                print(f"  {name} reaches {share:.0%} of central's improvement "
                      f"({'PASS' if share >= 0.9 else 'FAIL'} >= 90%)")
        if "alone" in a and "fedavg" in a:
            beats = a["fedavg"]["eval_loss"] < a["alone"]["eval_loss"]
            print(f"  fedavg beats the average client alone: {'PASS' if beats else 'FAIL'}")
    for name in ("fedavg", "exact", "dp"):
        if name in a:
            r = a[name]
            print(f"  {name}: {r['adapter_bytes']:,} adapter bytes, "
                  f"{r['upload_bytes_per_client_round']:,} sent per client per round, "
                  f"wall {r['wall_seconds']:.0f} s, peak {r.get('peak_memory_bytes', 0) / 1e9:.2f} GB"
                  + (f", epsilon {r['dp_epsilon']:.2f}" if "dp_epsilon" in r else ""))


if __name__ == "__main__":
    main()
