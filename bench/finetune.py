"""Fine-tuning benchmark (issue 7): base vs LoRA vs QLoRA vs full vs LoRA on augmented data.

Model: the team reference model (``bench/reference.py``: ``micro`` trained on the stdlib),
or ``--model DIR``. Task: the built-in ``stdlib-docstring`` (given a function's source
without its docstring, write the one-line summary). Training rows are the first
``--train-rows`` items mined from the corpus TRAIN split (a scarce-data setting, where
augmentation is meant to help); scores are ROUGE-L and exact match of greedy completions on
the first ``--eval-items`` items of the VAL split, through ``slmkit.eval.tasks.score_task``
(what ``slm eval --tasks stdlib-docstring`` reports). Every method gets the same step
budget, batch, sequence length and data order (seed), with the plain template:

* ``base``: the reference model, no training;
* ``lora``: ``slm finetune --method lora --rank 8`` (peft), merged for scoring;
* ``qlora``: ``--method qlora --rank 8`` (4-bit RTN QuantLinear base, our LoRA wrapper);
* ``full``: ``--method full`` (``--full-lr``, lower than ``--lora-lr``: every weight moves);
* ``lora-aug``: ``slm augment`` of the same rows with the reference model as teacher, then
  LoRA. Default ``--aug-mode paraphrase``: ``--aug-n`` rewrites per row (the teacher, a code
  LM, re-samples the second half of the function body; the signature, the cue line and the
  real docstring are kept), filtered by ``--aug-min-logprob``. ``completions`` mode is
  there too, but the base model closes the docstring at once, so its completions come back
  empty and the arm would equal plain LoRA.

Each method trains in its own subprocess, so memory is per method: ``peak RSS`` is the
process's high-water mark (``wait4``), ``fit peak`` the high-water mark during
``Trainer.fit`` alone (reset through ``/proc/self/clear_refs`` just before it, so model
loading, quantization and merging are excluded), both minus nothing; ``idle RSS`` is the
process after its imports, for reference. Wall time is the subprocess's, trainable fraction
the one ``slm finetune`` records.

Learning rates are not tuned: 5e-3 for the adapters (on the v1 reference model, 30 LoRA
steps reached a completion loss of 7.13 at 1e-2 and 7.33 at 2e-3, from 7.75) and 1e-3 for
full fine-tuning (``slm finetune``'s default). Memory at this scale: the micro model's
weights are ~19 MB in fp32, while one fit step holds ~1 GB (logits ``[8, T, 8192]``, their
gradients, activations, the Python/torch runtime), so a 4-bit base (QLoRA) saves a few MB of
about a GB; QLoRA's memory edge shows on models whose weights dominate.

Bars (issue 7), printed PASS/FAIL:

* LoRA trains < 1% of the parameters and beats base by >= 5 ROUGE-L points;
* LoRA is within 3 ROUGE-L points of full fine-tuning;
* QLoRA is within 3 ROUGE-L points of LoRA at a lower fit peak.

The memory arm (``--memory-steps``, default 3) trains LoRA and QLoRA for a few steps on a
random SmolLM2-135M-shaped model and compares their fit peaks: there the fp32 weights (540
MB) dominate a step, as they do for real SLMs, which the micro reference cannot show.
``--target-modules q_proj,v_proj`` runs the adapters on the LoRA paper's targets (Hu et
al. 2021 adapt W_q and W_v), which keeps r = 8 under 1% of the micro model's parameters;
the default, every attention and MLP projection, is 4.6% of it (and 1.8% of a 135M model).

Run under the team lock (the machine is shared)::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/finetune.py          # ~10-15 min
    .venv/bin/python bench/finetune.py --quick                               # smoke test

Writes ``bench/results/finetune.json`` (``--quick``: ``finetune-quick.json``); work dirs
under ``.cache/bench-finetune/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASK = "stdlib-docstring"
METHODS = ("base", "lora", "qlora", "full", "lora-aug")


# --------------------------------------------------------------------------- worker side

def _vm(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(spec: dict) -> dict:
    """Run one fine-tuning or augment job in this process and measure it."""
    import torch

    torch.set_num_threads(spec["threads"])
    import slmkit.train.loop as loop
    from slmkit.train.augment import AugmentConfig, run_augment
    from slmkit.train.finetune import FinetuneConfig, run_finetune

    idle = _vm("VmRSS")
    fit_peak = {}
    fit = loop.Trainer.fit

    def measured_fit(self, *a, **kw):              # bench instrumentation only
        try:
            Path("/proc/self/clear_refs").write_text("5")   # reset the RSS high-water mark
            fit_peak["reset"] = True
        except OSError:
            fit_peak["reset"] = False
        try:
            return fit(self, *a, **kw)
        finally:
            fit_peak["bytes"] = _vm("VmHWM")

    loop.Trainer.fit = measured_fit
    if spec["kind"] == "augment":
        res = run_augment(AugmentConfig(**spec["cfg"])).figures
    else:
        res = run_finetune(FinetuneConfig(**spec["cfg"])).figures
    return {"metrics": res, "idle_rss": idle,
            "fit_peak_rss": fit_peak.get("bytes") if fit_peak.get("reset") else None}


def run_worker(spec: dict, work: Path) -> dict:
    """Run :func:`worker` in a subprocess; add its wall time and whole-process peak RSS."""
    out = work / f"{spec['name']}.worker.json"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec),
                             "--worker-out", str(out)], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{spec['name']} failed (exit {proc.returncode}); see its output above")
    res = json.loads(out.read_text())
    return {**res, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024}


# --------------------------------------------------------------------------- parent side

def score(model_dir: Path, items: list[dict], threads: int) -> dict:
    """ROUGE-L / EM of greedy completions on the val items."""
    import torch

    from slmkit.eval.tasks import score_task
    from slmkit.models import load_model

    torch.set_num_threads(threads)
    model, tok = load_model(model_dir, dtype="fp32")
    res = score_task(model, tok, items)
    params = sum(p.numel() for p in model.parameters())
    return {"rouge_l": res["rouge_l"], "exact_match": res["exact_match"], "n": res["n"],
            "params": params, "examples": res["predictions"][:3]}


def finetune_cfg(args, model: Path, data: str, out: Path, method: str) -> dict:
    lr = args.full_lr if method == "full" else args.lora_lr
    return dict(model=str(model), data=data, out=str(out), method=method, rank=8, alpha=16.0,
                target_modules=args.target_modules,
                merge=method == "lora", max_samples=None if data != TASK else args.train_rows,
                template="plain", max_steps=args.steps, seq_len=args.seq_len,
                batch_size=args.batch_size, lr=lr, warmup_steps=max(1, args.steps // 10),
                precision="fp32", checkpoint_every=10**6, log_every=max(1, args.steps // 5),
                seed=0, threads=args.threads, overwrite=True)


def memory_arm(args, work: Path) -> dict:
    """LoRA vs QLoRA fit peak on a SmolLM2-135M-shaped model (random weights, memory only).

    On the micro reference the weights are 19 MB of a ~1.2 GB fit step, so QLoRA's 4-bit
    base cannot show; at 135M parameters the fp32 weights (540 MB) dominate, as they do
    for real SLMs. Same data, steps, batch and sequence length for both; no scoring.
    """
    import torch

    from bench.decode import build_model
    from bench.reference import reference_tokenizer_dir
    from slmkit.models import load_tokenizer
    from slmkit.models.io import save_model

    model_dir = work / "smollm2-135m-shape"
    if not (model_dir / "model.safetensors").is_file():
        save_model(build_model(torch.float32), load_tokenizer(reference_tokenizer_dir()),
                   model_dir, step="bench", params={"bench": "finetune memory arm"},
                   overwrite=True)
    sub = argparse.Namespace(**{**vars(args), "steps": args.memory_steps, "seq_len": 256,
                                "batch_size": 4, "train_rows": 32})
    out = {"model": "random SmolLM2-135M shape", "steps": args.memory_steps,
           "seq_len": 256, "batch_size": 4}
    for method in ("lora", "qlora"):
        print(f"--- memory arm: {method} on the 135M shape", flush=True)
        cfg = finetune_cfg(sub, model_dir, TASK, work / f"mem-{method}", method)
        cfg["merge"] = False
        run = run_worker({"name": f"mem-{method}", "kind": "finetune", "cfg": cfg,
                          "threads": args.threads}, work)
        out[method] = {"fit_peak_rss": run["fit_peak_rss"], "peak_rss": run["peak_rss"],
                       "wall_s": run["wall_s"],
                       "trainable_fraction": run["metrics"]["trainable_fraction"]}
    return out


def bars(results: dict, memory: dict | None = None) -> list[tuple[str, bool]]:
    r = {k: v for k, v in results.items() if "rouge_l" in v}
    out = []
    if {"base", "lora"} <= r.keys():
        frac = r["lora"].get("trainable_fraction", 1.0)
        out.append((f"LoRA trains < 1% of params ({frac:.2%})", frac < 0.01))
        gain = 100 * (r["lora"]["rouge_l"] - r["base"]["rouge_l"])
        out.append((f"LoRA beats base by >= 5 ROUGE-L points ({gain:+.1f})", gain >= 5))
    if {"lora", "full"} <= r.keys():
        gap = 100 * (r["full"]["rouge_l"] - r["lora"]["rouge_l"])
        out.append((f"LoRA within 3 points of full FT (full - LoRA = {gap:+.1f})", gap <= 3))
    if {"lora", "qlora"} <= r.keys():
        gap = 100 * (r["lora"]["rouge_l"] - r["qlora"]["rouge_l"])
        out.append((f"QLoRA within 3 points of LoRA (LoRA - QLoRA = {gap:+.1f})", gap <= 3))
        lp, qp = r["lora"].get("fit_peak_rss"), r["qlora"].get("fit_peak_rss")
        if lp and qp:
            out.append((f"QLoRA fit peak below LoRA's, reference ({qp / 2**20:.0f} vs "
                        f"{lp / 2**20:.0f} MiB)", qp < lp))
    if memory and memory["lora"]["fit_peak_rss"] and memory["qlora"]["fit_peak_rss"]:
        lp, qp = memory["lora"]["fit_peak_rss"], memory["qlora"]["fit_peak_rss"]
        out.append((f"QLoRA fit peak below LoRA's, 135M shape ({qp / 2**20:.0f} vs "
                    f"{lp / 2**20:.0f} MiB)", qp < lp))
    return out


def print_results(results: dict, checks: list[tuple[str, bool]],
                  memory: dict | None = None) -> None:
    from slmkit.console import print_table

    mib = lambda b: f"{b / 2**20:,.0f}" if b else "-"      # noqa: E731
    rows = []
    for name in METHODS:
        r = results.get(name)
        if not r:
            continue
        frac = r.get("trainable_fraction")
        rows.append((name, f"{100 * r['rouge_l']:.1f}", f"{100 * r['exact_match']:.1f}",
                     f"{frac:.2%}" if frac is not None else "-",
                     mib(r.get("fit_peak_rss")), mib(r.get("peak_rss")),
                     f"{r['wall_s']:.0f}" if r.get("wall_s") else "-",
                     r.get("samples", "-")))
    print_table(f"fine-tuning on {TASK}", rows, header=(
        "method", "ROUGE-L", "EM", "trainable", "fit peak MiB", "peak RSS MiB", "time s",
        "samples"))
    if memory:
        print_table(f"memory arm: {memory['model']}, {memory['steps']} steps, batch "
                    f"{memory['batch_size']} x {memory['seq_len']} tokens", [
                        (m, f"{memory[m]['trainable_fraction']:.2%}",
                         mib(memory[m]["fit_peak_rss"]), mib(memory[m]["peak_rss"]))
                        for m in ("lora", "qlora")],
                    header=("method", "trainable", "fit peak MiB", "peak RSS MiB"))
    print_table("bars", [(text, "PASS" if ok else "FAIL") for text, ok in checks])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the reference model")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-rows", type=int, default=256)
    ap.add_argument("--eval-items", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=5e-3)
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--aug-mode", choices=("paraphrase", "completions"), default="paraphrase",
                    help="paraphrase: the teacher rewrites the function body, the real "
                    "docstring is kept (the base model cannot write docstrings: its "
                    "completions come back empty)")
    ap.add_argument("--aug-n", type=int, default=2)
    ap.add_argument("--aug-temperature", type=float, default=0.7)
    ap.add_argument("--aug-min-logprob", type=float, default=None,
                    help="teacher log-prob filter (default: none)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--target-modules", default=None, type=lambda v: [m.strip() for m in
                    v.split(",") if m.strip()], help="LoRA/QLoRA targets, e.g. q_proj,v_proj "
                    "(the LoRA paper's); default: every attention and MLP projection")
    ap.add_argument("--memory-steps", type=int, default=3,
                    help="fit steps of the LoRA-vs-QLoRA memory arm on the 135M shape "
                    "(0 skips it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-finetune")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(json.loads(args.worker))
        args.worker_out.write_text(json.dumps(res, default=str))
        return 0
    if args.quick:
        args.steps, args.train_rows, args.eval_items, args.aug_n = 4, 16, 8, 1
    args.out = args.out or ROOT / "bench" / "results" / (
        "finetune-quick.json" if args.quick else "finetune.json")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    import torch

    torch.set_num_threads(args.threads)
    from slmkit.eval.mining import mine_tasks

    if args.model is None:
        from bench.reference import reference_model_dir

        args.model = reference_model_dir()
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    items = mine_tasks([TASK], split="val", limit=args.eval_items)[TASK]
    results: dict[str, dict] = {}
    if args.out.is_file() and set(methods) != set(METHODS):   # re-run a few, keep the rest
        old = json.loads(args.out.read_text())
        if old.get("model") == str(args.model) and old.get("quick") == args.quick:
            results = {k: v for k, v in old["results"].items() if k not in methods}
    t_start = time.perf_counter()
    for name in [m for m in METHODS if m in methods]:
        print(f"--- {name}", flush=True)
        if name == "base":
            results[name] = {**score(args.model, items, args.threads), "trainable_fraction": 0.0}
            continue
        data, extra = TASK, {}
        if name == "lora-aug":
            aug_cfg = dict(model=str(args.model), data=TASK, out=str(work / "augmented"),
                           mode=args.aug_mode, n_per_sample=args.aug_n,
                           temperature=args.aug_temperature, top_p=0.95, max_new_tokens=40,
                           max_samples=args.train_rows, min_logprob=args.aug_min_logprob,
                           template="plain", threads=args.threads, overwrite=True, seed=0)
            aug = run_worker({"name": "augment", "kind": "augment", "cfg": aug_cfg,
                              "threads": args.threads}, work)
            m = aug["metrics"]
            extra = {"augment_wall_s": aug["wall_s"], "augment_new_rows": m["new_rows"],
                     "augment_rows_out": m["rows_out"],
                     "augment_dropped": {k: v for k, v in m.items() if k.startswith("dropped_")},
                     "augment_teacher_logprob_new": m["teacher_logprob_new"],
                     "augment_teacher_logprob_original": m["teacher_logprob_original"]}
            data = str(work / "augmented")
        method = "lora" if name == "lora-aug" else name
        out_dir = work / name
        run = run_worker({"name": name, "kind": "finetune", "threads": args.threads,
                          "cfg": finetune_cfg(args, args.model, data, out_dir, method)}, work)
        m = run["metrics"]
        results[name] = {**score(out_dir, items, args.threads),
                         "trainable_fraction": m["trainable_fraction"],
                         "samples": m["samples"], "steps": m["steps"],
                         "train_loss": m.get("train_loss"), "wall_s": run["wall_s"],
                         "peak_rss": run["peak_rss"], "fit_peak_rss": run["fit_peak_rss"],
                         "idle_rss": run["idle_rss"], **extra}
    memory = memory_arm(args, work) if args.memory_steps > 0 else None
    checks = bars(results, memory)
    print_results(results, checks, memory)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "task": TASK, "model": str(args.model), "quick": args.quick,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("worker", "worker_out")},
        "results": results, "memory_135m": memory,
        "bars": [{"bar": t, "pass": ok} for t, ok in checks],
        "total_s": time.perf_counter() - t_start}, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
