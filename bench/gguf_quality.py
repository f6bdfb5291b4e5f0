"""GGUF quality: slmkit's calibrated 4-bit blocks vs llama.cpp's own quantizer, in llama.cpp.

Setup, on the reference model (``bench/reference.py``, micro Llama trained on the stdlib):

* export f32 with ``slm export``; quantize that file with llama.cpp's own quantizer
  (``llama_model_quantize``) to Q8_0, Q4_0 and Q4_1: its default tensor mix (the tied
  embedding / output matrix is kept in Q6_K, or Q8_0 when its rows are not a multiple of
  256, as in ``micro``) and ``pure`` (every matrix in the named type);
* export slmkit's RTN Q8_0/Q4_0/Q4_1 packing directly (bit-exact with llama.cpp's RTN);
* quantize with slmkit RTN, GPTQ and AWQ (4 bit, symmetric, group size 32) and export the
  calibrated weights directly as Q4_0 blocks, with the remaining matrix (the tied
  embedding, which these methods do not touch) as Q4_0 (same bits as llama.cpp ``pure``)
  or Q8_0 (close to llama.cpp's default mix).

Measure: held-out perplexity of every file computed through llama.cpp itself from its
logits (stdlib validation split, non-overlapping windows), and bits per weight from the
file size. Goal: slmkit GPTQ/AWQ Q4_0 below llama.cpp's own Q4_0 at the same bits per
weight.

It measures quality, not speed, so it need not hold the team's timing lock; run it
niced (needs ``pip install -e ".[llamacpp]"``)::

    nice -n 10 .venv/bin/python bench/gguf_quality.py

Writes ``bench/results/gguf_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reference import reference_model_dir  # noqa: E402
from slmkit.console import print_table  # noqa: E402
from slmkit.export import llamacpp  # noqa: E402
from slmkit.export.gguf_export import export_gguf  # noqa: E402


def val_windows(model_dir: Path, seq_len: int, n: int) -> list[list[int]]:
    """``n`` non-overlapping windows of the stdlib validation token stream."""
    from slmkit.data.tokens import token_stream
    from slmkit.models import load_tokenizer

    stream = token_stream("stdlib", load_tokenizer(model_dir), "val", progress=False)
    return [stream[i * seq_len:(i + 1) * seq_len].astype(int).tolist() for i in range(n)
            if (i + 1) * seq_len <= len(stream)]


def reference_or_checkpoint(work: Path) -> tuple[Path, str]:
    """The finished reference model, or else its latest training checkpoint as a model dir.

    The reference model trains for a fixed number of steps (~20 min on idle cores, much
    longer on a shared machine); until it is done, its newest checkpoint is the best trained
    model there is. It is assembled from the ``micro`` preset config, the checkpoint's
    weights and the reference tokenizer.
    """
    import bench.reference as reference

    model_dir = reference._model_dir()
    if (model_dir / "config.json").is_file():
        return model_dir, "reference model"
    ckpts = sorted((model_dir / "checkpoints").glob("step-*/model.safetensors"))
    if not ckpts:
        return reference_model_dir(), "reference model"          # trains it (long)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from slmkit.models import load_tokenizer, save_model
    from slmkit.models.presets import build_config

    tok = load_tokenizer(reference.reference_tokenizer_dir())
    model = AutoModelForCausalLM.from_config(build_config(reference.RECIPE["model"], tok))
    state = load_file(str(ckpts[-1]))
    if "model.embed_tokens.weight" not in state:          # tied: saved once, as lm_head
        state["model.embed_tokens.weight"] = state["lm_head.weight"]
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    step = ckpts[-1].parent.name
    out = save_model(model.eval(), tok, work / f"reference-{step}", step="checkpoint",
                     params={"checkpoint": str(ckpts[-1])})
    return out, f"reference training checkpoint {step} (training not finished)"


def slmkit_quantized(ref: Path, work: Path, method: str, calib: int) -> Path:
    from slmkit.compress.quantize import QuantizeConfig, run_quantize

    out = work / f"{method}-w4g32"
    run_quantize(QuantizeConfig(model=str(ref), out=str(out), method=method, bits=4,
                                group_size=32, sym=True, calib_samples=calib,
                                calib_seq_len=256))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=24, help="validation windows scored")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--model", default=None, help="model dir (default: the reference model, "
                    "or its latest checkpoint while it trains)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "gguf_quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ref, what = (Path(args.model), "given model") if args.model \
            else reference_or_checkpoint(work)
        print(f"model: {what} ({ref})", file=sys.stderr)
        windows = val_windows(ref, args.seq_len, args.windows)
        files: list[tuple[str, str, Path]] = []   # (label, quantizer, path)
        f32 = work / "f32.gguf"
        res = export_gguf(str(ref), f32, quant="f32")
        params = res.params
        files.append(("f32", "slmkit export", f32))
        for q in ("q8_0", "q4_0", "q4_1"):
            files.append((q, "llama.cpp default mix",
                          llamacpp.quantize(f32, work / f"lcpp-{q}.gguf", q, args.threads)))
            files.append((q, "llama.cpp pure",
                          llamacpp.quantize(f32, work / f"lcpp-pure-{q}.gguf", q,
                                            args.threads, pure=True)))
            path = work / f"slm-rtn-{q}.gguf"
            export_gguf(str(ref), path, quant=q)
            files.append((q, "slmkit RTN blocks", path))
        for method in args.methods.split(","):
            t = time.perf_counter()
            qdir = slmkit_quantized(ref, work, method, args.calib_samples)
            print(f"{method}: quantized in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            for rest in ("q4_0", "q8_0"):
                path = work / f"slm-{method}-q4_0-embed-{rest}.gguf"
                export_gguf(str(qdir), path, quant=rest)
                files.append(("q4_0", f"slmkit {method.upper()} g32 (embedding {rest})", path))
        for label, who, path in files:
            ppl = llamacpp.perplexity(llamacpp.load(path, n_ctx=args.seq_len,
                                                    threads=args.threads), windows)
            bpw = 8 * path.stat().st_size / params
            results.append({"type": label, "quantizer": who, "bits_per_weight": bpw,
                            "ppl": ppl["ppl"], "loss": ppl["loss"], "tokens": ppl["tokens"]})
    base = results[0]["ppl"]
    for r in results:
        rows.append((r["type"], r["quantizer"], f"{r['bits_per_weight']:.2f}",
                     f"{r['ppl']:.3f}", f"{(r['ppl'] / base - 1) * 100:+.2f}%"))
    print_table(f"held-out perplexity through llama.cpp ({results[0]['tokens']:,} tokens, "
                f"stdlib val) -- {what}", rows,
                header=("GGUF type", "quantizer", "bits/weight", "ppl", "vs f32"))
    goal = []
    for theirs, rest in (("llama.cpp pure", "q4_0"), ("llama.cpp default mix", "q8_0")):
        base_row = next(r for r in results if r["type"] == "q4_0" and r["quantizer"] == theirs)
        for method in args.methods.split(","):
            label = f"slmkit {method.upper()} g32 (embedding {rest})"
            ours = next((r for r in results if r["quantizer"] == label), None)
            if ours is not None and method != "rtn":
                goal.append((f"{method.upper()} vs {theirs} Q4_0 "
                             f"({ours['bits_per_weight']:.2f} vs "
                             f"{base_row['bits_per_weight']:.2f} bits)",
                             f"{ours['ppl']:.3f} vs {base_row['ppl']:.3f}: "
                             + ("lower" if ours["ppl"] < base_row["ppl"] else "NOT lower")))
    print_table("goal: slmkit GPTQ/AWQ Q4_0 below llama.cpp's own Q4_0 at equal bits", goal)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": what, "seq_len": args.seq_len,
                                          "windows": len(windows), "params": params,
                                          "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
