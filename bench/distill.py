"""Distillation benchmark (issue 6): students of the reference model at one token budget.

Teacher: the team reference model (``bench/reference.py``, micro preset trained on the
stdlib), or ``--teacher DIR``. Every student sees the same number of training tokens of the
stdlib train split, in the same order (same seed, sequence length and batch):

* **(a)** ``nano`` from scratch with the plain LM loss (``slm train``);
* **(b)** ``nano`` from scratch with KD from the teacher (``slm distill``);
* **(c)** the teacher structurally pruned (``slm prune --structured``) to ``--prune-to`` of
  its parameters, then KD (the Minitron path: Muralidharan et al. 2024);
* **(d)** (c) without any retraining;
* **(e)** a freshly initialised model of (c)'s exact shape with KD (the control for (c)).

All KD runs use forward KL, ``T = 1``, ``alpha = 0.5`` and one shared top-K cache
(``--topk 64``): the teacher runs once per training chunk, in (b); (c) and (e) read its
targets from disk. ``--topk 0`` uses full-vocabulary targets instead. Learning rates: 3e-3 from scratch, ``--pruned-lr`` (1e-3) for the pruned
teacher, whose weights are already trained (continued-pretraining practice).

Each model is scored with ``slmkit.eval.perplexity.perplexity`` on the stdlib validation
split (held-out perplexity and bits per byte), by parameter count and weight bytes, and by
batch-1 decode speed (``slmkit.eval.speed.measure_speed``), timed right after the teacher
and reported as a ratio to it, so machine noise largely cancels. Bars:

* (b) beats (a) by at least 5% in perplexity;
* (c) beats (e), the fresh student of the same shape with the same KD budget.

Run under the team lock (the machine is shared)::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/distill.py

Writes ``bench/results/distill.json``; work dirs under ``.cache/bench-distill/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def common_options(args) -> dict:
    """Training options every student shares (budget, data order, evaluation)."""
    return dict(data="stdlib", max_tokens=args.tokens, seq_len=args.seq_len,
                batch_size=args.batch_size, warmup_steps=args.warmup, eval_every=10**6,
                checkpoint_every=10**6, eval_tokens=8192, seed=0, threads=args.threads,
                overwrite=True)


def train_lm(args, teacher: Path, out: Path) -> dict:
    from slmkit.train.config import TrainConfig
    from slmkit.train.run import run_train

    cfg = TrainConfig(model="nano", tokenizer=str(teacher), out=str(out), lr=3e-3,
                      **common_options(args))
    return run_train(cfg).figures


def distill(args, teacher: Path, student: str | Path, out: Path, lr: float) -> dict:
    from slmkit.train.distill import DistillConfig, run_distill

    cache = str(args.work / "topk-cache") if args.topk else None
    cfg = DistillConfig(teacher=str(teacher), student=str(student), out=str(out), lr=lr,
                        loss="fkl", temperature=1.0, alpha=args.alpha,
                        topk_cache=args.topk or None,
                        topk_cache_dir=cache, **common_options(args))
    return run_distill(cfg).figures


def prune_teacher(args, teacher: Path, out: Path) -> dict:
    """(d): the teacher pruned to ``args.prune_to`` of its parameters, saved to ``out``."""
    from slmkit.compress.prune.structured import StructuredOptions, structured_prune
    from slmkit.models import load_model, save_model

    model, tok = load_model(teacher)
    if args.prune_drop_layers or args.prune_mlp_channels:      # an explicit split
        st = StructuredOptions(drop_layers=args.prune_drop_layers,
                                mlp_channels=args.prune_mlp_channels, calib_samples=32)
    else:
        st = StructuredOptions(target_params=args.prune_to, calib_samples=32)
    result = structured_prune(model, tok, st)
    save_model(result.model, tok, out, step="prune", overwrite=True,
               params={"structured": True, **st.as_dict()}, metrics=result.metrics())
    return result.metrics()


def fresh_like(shape_dir: Path, out: Path, seed: int = 0) -> None:
    """(e)'s starting point: random init (transformers' own) with ``shape_dir``'s config."""
    import torch
    from transformers import AutoModelForCausalLM

    from slmkit.models import load_config, load_tokenizer, save_model

    _, config = load_config(shape_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.slmkit_lineage = []
    save_model(model, load_tokenizer(shape_dir), out, step="init", overwrite=True,
               params={"like": str(shape_dir), "seed": seed})


def teacher_from_checkpoint(ckpt: Path, work: Path) -> Path:
    """A model dir from a checkpoint of the reference run (micro preset, reference tokenizer).

    For when the reference is still training: its ``checkpoints/step-N`` holds the weights
    only. The result is recorded as a partially trained reference.
    """
    from safetensors.torch import load_model as load_safetensors

    from reference import RECIPE, reference_tokenizer_dir
    from slmkit.models import load_tokenizer, save_model
    from slmkit.models.presets import init_model

    out = work / f"teacher-{ckpt.name}"
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(reference_tokenizer_dir())
    model = init_model(RECIPE["model"], tok)
    load_safetensors(model, str(ckpt / "model.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())["state"]
    save_model(model, tok, out, step="train", overwrite=True,
               params={"reference_checkpoint": str(ckpt)},
               metrics={"steps": state["step"], "tokens": state["tokens"]})
    return out


def score(model_dir: Path, teacher_model, args) -> dict:
    """Held-out perplexity / bits per byte, size, and decode speed next to the teacher's."""
    from slmkit.eval.perplexity import perplexity
    from slmkit.eval.speed import measure_speed
    from slmkit.models import load_model
    from slmkit.models.presets import count_params

    model, tok = load_model(model_dir)
    ppl = perplexity(model, tok, data="stdlib", split="val", seq_len=args.seq_len,
                     max_tokens=args.eval_tokens)

    def speed(m):
        return measure_speed(m, tok, prompt_lengths=(32,), decode_tokens=args.decode_tokens,
                             repeats=3)["decode_tok_s"]

    s_teacher, s_model = (math.nan, math.nan) if args.skip_speed else \
        (speed(teacher_model), speed(model))
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return {"ppl": ppl["ppl"], "loss": ppl["loss"], "bits_per_byte": ppl["bits_per_byte"],
            "eval_tokens": ppl["tokens"], "params": count_params(model)["total"],
            "weight_bytes": weights, "decode_tok_s": s_model,
            "decode_vs_teacher": s_model / s_teacher}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, help="teacher dir (default: the reference model)")
    ap.add_argument("--tokens", type=int, default=131_072, help="training tokens per student")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5, help="LM-loss weight in KD runs")
    ap.add_argument("--topk", type=int, default=0, help="top-K cache shared by KD runs "
                    "(0: full-vocabulary targets, teacher runs for every student)")
    ap.add_argument("--prune-to", type=float, default=0.5, help="(c) parameter fraction")
    ap.add_argument("--prune-drop-layers", type=int, help="(c) explicit split: layers to drop")
    ap.add_argument("--prune-mlp-channels", type=int, help="(c) explicit split: MLP channels "
                    "to remove per layer")
    ap.add_argument("--pruned-lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="students to (re)run, e.g. a b")
    ap.add_argument("--reuse", action="store_true", help="score students already trained in "
                    "--work instead of training them again")
    ap.add_argument("--train-only", action="store_true", help="with --only a: train (a) "
                    "(it needs only --tokenizer), score later with --reuse")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer for --train-only a")
    ap.add_argument("--teacher-checkpoint", type=Path, help="a reference-run checkpoint dir "
                    "(checkpoints/step-N) to use as the teacher while the reference trains")
    ap.add_argument("--skip-speed", action="store_true", help="no decode timing (when the "
                    "bench lock is not held); perplexity does not depend on load")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-distill")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distill.json")
    args = ap.parse_args(argv)

    import torch

    from slmkit.console import configure, print_table
    from slmkit.models import load_model

    configure()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    w = args.work
    sys.path.insert(0, str(ROOT / "bench"))
    if args.teacher_checkpoint is not None:
        args.teacher = teacher_from_checkpoint(args.teacher_checkpoint, w)
    if args.teacher is None and not args.train_only:
        from reference import reference_model_dir

        args.teacher = reference_model_dir()
    if args.train_only:
        for key in args.only or []:
            if key == "a":        # needs only the tokenizer, so it can run before the teacher
                train_lm(args, args.tokenizer or args.teacher, w / "a")
        return 0
    teacher_model, _ = load_model(args.teacher)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results: dict = previous.get("results", {}) if args.only else {}

    def want(key):
        return not args.only or key in args.only

    def timed(key, fn, model_dir):
        if args.reuse and key != "teacher" and (model_dir / "config.json").is_file():
            record = json.loads((model_dir / "slmkit.json").read_text())
            train = record.get("metrics", {})    # trained by an earlier (--train-only) run
            return {"train_minutes": train.get("train_minutes", 0.0),
                    "train_tokens": train.get("tokens"), "train": train, "reused": True}
        t0 = time.perf_counter()
        train = fn()
        return {"train_minutes": (time.perf_counter() - t0) / 60,
                "train_tokens": (train or {}).get("tokens"), "train": train}

    steps = [
        ("teacher", lambda: None, args.teacher),
        ("a", lambda: train_lm(args, args.teacher, w / "a"), w / "a"),
        ("b", lambda: distill(args, args.teacher, "nano", w / "b", 3e-3), w / "b"),
        ("d", lambda: prune_teacher(args, args.teacher, w / "d"), w / "d"),
        ("c", lambda: distill(args, args.teacher, w / "d", w / "c", args.pruned_lr), w / "c"),
        ("e", lambda: (fresh_like(w / "d", w / "e-init"),
                       distill(args, args.teacher, w / "e-init", w / "e", 3e-3))[1], w / "e"),
    ]
    for key, fn, model_dir in steps:
        if not want(key) and key in results:
            continue
        run = timed(key, fn, model_dir)
        results[key] = {**run, **score(model_dir, teacher_model, args), "dir": str(model_dir)}
        print(f"{key}: ppl {results[key]['ppl']:.3f}", file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": results}, indent=1, default=str))

    labels = {"teacher": "teacher (reference)", "a": "(a) nano, LM loss",
              "b": "(b) nano, KD", "c": f"(c) pruned to {args.prune_to:.0%}, KD",
              "d": "(d) pruned, no retraining", "e": "(e) fresh same shape as (c), KD"}
    rows = [(labels[k], f"{r['ppl']:.2f}", f"{r['bits_per_byte']:.3f}",
             f"{r['params'] / 1e6:.2f}M", f"{r['weight_bytes'] / 1e6:.1f} MB",
             f"{r['decode_tok_s']:.0f}", f"x{r['decode_vs_teacher']:.2f}",
             f"{r['train_minutes']:.1f}")
            for k, r in results.items()]
    print_table(f"distill bench: {args.tokens:,} training tokens per student, stdlib val "
                f"({args.eval_tokens:,} tokens)", rows,
                header=("student", "ppl", "bits/byte", "params", "weights", "decode tok/s",
                        "vs teacher", "minutes"))
    bars = {}
    if {"a", "b"} <= results.keys():
        gain = 1 - results["b"]["ppl"] / results["a"]["ppl"]
        bars["(b) beats (a) by >= 5% ppl"] = f"{'PASS' if gain >= 0.05 else 'FAIL'} " \
                                              f"({gain:+.1%})"
    if {"c", "e"} <= results.keys():
        c, e = results["c"]["ppl"], results["e"]["ppl"]
        bars["(c) beats (e)"] = f"{'PASS' if c < e else 'FAIL'} ({c:.2f} vs {e:.2f})"
    print_table("bars (issue 6)", list(bars.items()))
    args.out.write_text(json.dumps({
        "teacher": str(args.teacher), "args": {k: str(v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(), "results": results, "bars": bars},
        indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(w / "topk-cache", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
