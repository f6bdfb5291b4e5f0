"""Perplexity through the decode path: does the native step's arithmetic cost quality?

The native decode step (``slmkit/engine/native``) rounds activations to int8 for int8/int4
layers (one scale per 256 columns for int8 weights, per 32 for int4, as llama.cpp's Q8_0
scheme does), where the torch loop feeds them to ``QuantLinear`` in bf16. This scores the
reference model teacher-forced, one decode step per token (``FastRunner.forward`` with
T = 1, 8 windows of 256 tokens side by side), through both paths, in fp32 and quantized:
same tokens, same model, only the decode arithmetic differs. Quantized models are also
scored on the native step with an fp32 KV cache, to show what the engine's default fp16
cache for them costs, and every model with the opt-in int8 cache (``kv_cache="int8"``).

    .venv/bin/python bench/decode_ppl.py                      # ~1 min on 2 cores

Writes ``bench/results/decode_ppl.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"fp32": None, "int8 RTN per channel": (8, -1), "int4 RTN g32": (4, 32)}


def decode_ppl(model, windows: list[list[int]], native: bool, rows: int = 8,
               kv_cache: str = "auto") -> tuple[float, str]:
    """Perplexity of next-token predictions made one T = 1 step at a time."""
    import torch

    from slmkit.engine.runner import FastRunner

    width = len(windows[0])
    runner = FastRunner(model, rows, width, native=native, kv_cache=kv_cache)
    nll, n = 0.0, 0
    with torch.inference_mode():
        for g in range(0, len(windows), rows):
            x = torch.tensor(windows[g:g + rows])                       # [rows, W]
            for p in range(width - 1):
                logits = runner.forward(x[:, p:p + 1], list(range(rows)), [p] * rows)
                nll -= torch.log_softmax(logits, -1).gather(1, x[:, p + 1:p + 2]).sum().item()
                n += rows
    path = "native" if runner.native is not None else f"torch ({runner.native_reason})"
    return math.exp(nll / n), f"{path}, {str(runner.cache.k[0].dtype).removeprefix('torch.')} KV"



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the reference model")
    ap.add_argument("--tokens", type=int, default=8192, help="validation tokens")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decode_ppl.json")
    args = ap.parse_args(argv)

    import torch

    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.console import print_table
    from slmkit.eval.perplexity import encode_documents, load_texts
    from slmkit.models import load_model

    torch.set_num_threads(args.threads)
    if args.model is None:
        from bench.reference import reference_model_dir

        args.model = reference_model_dir()
    _, tok = load_model(args.model)
    ids: list[int] = []
    for doc in encode_documents(tok, load_texts("stdlib", "val"), args.tokens)[0]:
        ids += [tok.eos_token_id] + doc
    windows = [ids[i:i + args.window] for i in range(0, len(ids) - args.window, args.window)]
    windows = windows[:len(windows) // 8 * 8]
    rows, out = [], []
    for name, scheme in VARIANTS.items():
        model, _ = load_model(args.model)
        if scheme:
            quantize_model(model, tok, QuantizeOptions(method="rtn", bits=scheme[0],
                                                      group_size=scheme[1], ignore=[],
                                                      quantize_embeddings=True))
        res = {"variant": name}
        runs = [("native", True, "auto"), ("torch", False, "auto")]
        if scheme:
            runs.append(("native fp32 KV", True, "fp32"))
        runs.append(("native int8 KV", True, "int8"))
        for key, native, kv in runs:
            t0 = time.perf_counter()
            ppl, path = decode_ppl(model, windows, native, kv_cache=kv)
            res[key] = {"ppl": ppl, "path": path, "seconds": time.perf_counter() - t0}
        out.append(res)
        fp32_kv = res.get("native fp32 KV", res["native"])["ppl"]
        rows.append((name, f"{res['native']['ppl']:.3f}", f"{fp32_kv:.3f}",
                     f"{res['native int8 KV']['ppl']:.3f}", f"{res['torch']['ppl']:.3f}",
                     f"{100 * (res['native']['ppl'] / res['torch']['ppl'] - 1):+.2f}%",
                     res["native"]["path"]))
    print_table(f"teacher-forced decode perplexity, {len(windows) * (args.window - 1)} tokens "
                f"of stdlib val ({args.model})", rows,
                header=("weights", "native step", "native, fp32 KV", "native, int8 KV", "torch loop",
                        "native vs torch", "native path"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "window": args.window,
                                    "results": out}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
