"""Quantized decode speed: tokens/s at batch 1 for fp32, int8 and int4 weights.

The model is a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads / 3 KV heads,
MLP 1536, vocabulary 49152, tied embeddings) with random weights, built from a config (no
download). Variants, all decoded through the same loop (``slmkit.engine.stream_tokens``,
the engine's fastest path for the model):

* fp32 dense (the baseline) and bf16 dense (for context);
* int8 RTN per channel, symmetric: ``torch._weight_int8pack_mm``;
* int4 RTN group 64, symmetric: ``torch._weight_int4pack_mm_for_cpu`` (576 = 4.5 x 128:
  group 128 cannot divide the hidden size);
* each quantized variant twice: decoder linears only, and also the tied embedding / LM
  head (``--quantize-embeddings``), which in this model is 28M of the 134M weights and so
  bounds the speed-up when left in fp32; and int4 layers with an int8 table / head
  (``--embedding-bits 8``).

Each variant is timed in interleaved rounds with the fp32 model; the table shows the best
tokens/s of each and the ratio to fp32 (machine noise cancels). Bars (issue 4): int8
>= 2.5x fp32, int4 >= 4x fp32 (weights shrink 4x / 8x; batch-1 decode is bound by memory
bandwidth).

Run under the team lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/quant_speed.py

Writes ``bench/results/quant_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    max_position_embeddings=2048, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)


def build_model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    return LlamaForCausalLM(config).eval()


def stream_fn():
    from slmkit.engine import stream_tokens

    return stream_tokens, "slmkit.engine.stream_tokens"


def decode_tps(model, stream, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens/s after the first token (prefill excluded)."""
    import torch

    with torch.no_grad():
        it = stream(model, prompt, new_tokens + 1)
        next(it)                                     # prefill + first token
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        return n / (time.perf_counter() - t0)


def make_variants(layers: int):
    import copy

    import torch

    from slmkit.compress.quantize import make_config, quantize_model

    base = build_model(layers)
    variants = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    schemes = {"int8": dict(bits=8, group_size=-1), "int4 g64": dict(bits=4, group_size=64)}
    for label, scheme in schemes.items():
        for head in (False, True):
            m = copy.deepcopy(base)
            # +head: --quantize-embeddings, so the tied embedding table and the LM head
            # share one quantized copy (every weight shrinks, as in a Q8_0 / Q4_0 GGUF)
            quantize_model(m, None, make_config(method="rtn", sym=True,
                                                quantize_embeddings=head, **scheme))
            variants[f"{label}{' +head' if head else ''}"] = m
    # 4-bit layers with an int8 table / head (--embedding-bits 8)
    m = copy.deepcopy(base)
    quantize_model(m, None, make_config(method="rtn", sym=True, bits=4, group_size=64,
                                        quantize_embeddings=True, embedding_bits=8))
    variants["int4 g64 +int8 head"] = m
    return variants


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.dim() < 1:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per timing")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                    "quant_speed.json")
    args = ap.parse_args(argv)

    import torch

    from slmkit.console import print_table
    from slmkit.nn.quant_linear import QuantLinear

    torch.set_num_threads(args.threads)
    stream, loop = stream_fn()
    variants = make_variants(args.layers)
    prompt = list(range(100, 100 + args.prompt))
    for m in variants.values():                        # warm-up: kernels, packing, caches
        decode_tps(m, stream, prompt, 4)
    best = {k: 0.0 for k in variants}
    for _ in range(args.rounds):
        for name, m in variants.items():
            best[name] = max(best[name], decode_tps(m, stream, prompt, args.tokens))
    from slmkit.engine.runner import FastRunner

    kernels = {}   # what decodes: the engine's native step, else the torch loop's kernels
    for name, m in variants.items():
        if FastRunner(m, 1, 8).native is not None:
            kernels[name] = "native step"
            continue
        ks = {q.kernel_name() for q in m.modules() if isinstance(q, QuantLinear)}
        kernels[name] = "torch " + (",".join(sorted(ks)) or "dense")
    base_bytes = weight_bytes(variants["fp32"])
    rows, results = [], []
    for name, m in variants.items():
        tps = best[name]
        ratio = tps / best["fp32"]
        wb = weight_bytes(m)
        rows.append((name, kernels[name], f"{wb / 1e6:.0f} MB", f"{base_bytes / wb:.1f}x",
                     f"{tps:.1f}", f"{1000 / tps:.1f}", f"{ratio:.2f}x"))
        results.append({"variant": name, "kernel": kernels[name], "weight_bytes": wb,
                        "tokens_per_s": round(tps, 2), "ms_per_token": round(1000 / tps, 2),
                        "speedup_vs_fp32": round(ratio, 3)})
    print_table(f"decode at batch 1, {args.layers} layers, {loop}, {args.threads} threads",
                rows, header=("variant", "decode path", "weights", "smaller", "tok/s",
                              "ms/token", "vs fp32"))
    bars = [("int8 >= 2.5x fp32", best["int8 +head"] / best["fp32"] >= 2.5,
             f"{best['int8 +head'] / best['fp32']:.2f}x (layers only "
             f"{best['int8'] / best['fp32']:.2f}x)"),
            ("int4 >= 4x fp32", best["int4 g64 +head"] / best["fp32"] >= 4.0,
             f"{best['int4 g64 +head'] / best['fp32']:.2f}x (layers only "
             f"{best['int4 g64'] / best['fp32']:.2f}x)")]
    print_table("bars (issue 4)", [(b, "PASS" if ok else "FAIL", v) for b, ok, v in bars],
                header=("bar", "result", "measured"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"layers": args.layers, "loop": loop,
                                    "threads": args.threads, "prompt": args.prompt,
                                    "tokens": args.tokens, "rounds": args.rounds,
                                    "results": results,
                                    "bars": {b: ok for b, ok, _ in bars}}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
