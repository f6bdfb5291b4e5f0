"""Decode benchmark: slmkit engine vs transformers generate(), side by side in one run.

Model: a random SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads / 3 KV heads,
MLP 1536, vocabulary 49152, tied embeddings) built from a config, so no download is needed.
``--arch`` picks another family's real shape (:data:`SHAPES`: Qwen2.5-0.5B, Qwen3-0.6B,
Gemma 3 270M, Phi-3-mini's layout scaled to fit), run on whichever engine path it takes
(native step, family torch loop or transformers' forward: the "path" in the JSON).

Figures (all measured in this run, 2 threads by default):

* prefill tok/s, batch-1 decode tok/s and time to first token (TTFT) for slmkit
  (``stream_tokens``), for ``transformers`` ``generate()`` and for llama.cpp
  (``llama-cpp-python``, when it imports) on the same weights exported to GGUF by
  ``slmkit.export.gguf_export`` (what ``slm export --format gguf`` runs):

  - fp32: the fp32 model as an all-f32 GGUF;
  - int8: the fp32 model exported ``--quant q8_0`` (every matrix Q8_0, tied embedding too);
    slmkit's int8 is RTN per channel with the embedding and the tied LM head quantized as
    well (``quantize_embeddings``). Per-channel int8 is no GGML block type, so the two read
    slightly different bytes (the "weights MB" column);
  - int4: slmkit's own int4 model (RTN, symmetric, groups of 32, embedding and LM head
    included) exported as is: its codes and scales are Q4_0 blocks bit for bit, so both
    runtimes run exactly the same weights;
* slmkit twice: with the native decode step (``slmkit/engine/native``, the default) and
  with it turned off (the torch decode loop), so the gain is measured in the same run;
* the batch-1 runtimes run in turn, ``--rounds`` times (default 3), and each keeps its
  median run, so every ratio compares runs taken minutes apart at most;
* aggregate tok/s of the continuous-batching ``Engine`` at 1, 4, 8 and 16 streams (the
  sweep repeated ``--stream-repeats`` times, each count keeping its median);
* each as a fraction of the bandwidth limit ``bandwidth / weight bytes`` (about 30 GB/s on
  the team machines; ``--bandwidth`` to change it), the bytes a batch-1 step reads: an
  input embedding table the head does not share counts nothing (a step reads one row). For
  a mixture-of-experts shape each layer's experts count top-k / experts of their bytes (the
  router, shared expert, attention and head count whole); the total is reported beside.

llama.cpp is timed with its low-level loop (``Llama.eval`` of the prompt, then one token at
a time, greedy argmax of the last logits, EOS ignored), so it generates exactly as many
tokens as the slmkit rows (checked). Without ``llama_cpp`` (extra ``llamacpp``) or with
``--skip-llamacpp``, issue 8's published figures (f32 46.5, Q8_0 131 tok/s, same kind of
machine) are printed instead, labelled as such.

Run timings under the team lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/decode.py

Writes ``bench/results/decode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting are ruinous on a shared, oversubscribed machine: a
# spinning thread burns its time slice while the thread it waits for is descheduled, and a
# decode step has ~1000 parallel regions. Measured on the team machine (load ~14 on 2
# cores), 8-layer 135M-shaped model, 2 threads: 589 ms/step spinning vs 123 ms/step passive.
# It must be set before torch loads OpenMP.
# Passive waiting only pays off on an oversubscribed machine: measured on an idle 2-core
# machine it halved int8 decode (15.8 vs 33.0 tok/s), at load 10 it was 4-5x faster.
_busy = os.getloadavg()[0] > (os.cpu_count() or 1)
if "--omp-active" not in sys.argv and ("--omp-passive" in sys.argv or _busy):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmkit.console import print_table  # noqa: E402
from slmkit.engine import Engine, SamplingParams, stream_tokens  # noqa: E402
from slmkit.engine import native  # noqa: E402
from slmkit.engine.runner import FastRunner, make_runner  # noqa: E402, F401

LLAMA_CPP_PUBLISHED = {"fp32": 46.5, "int8": 131.0}  # decode tok/s, issue 8, 2 threads (fallback)
#: (GGUF --quant, what the file holds) per precision; see the module docstring.
GGUF_FOR = {"fp32": ("f32", "f32 GGUF"), "int8": ("q8_0", "Q8_0 GGUF from fp32"),
            "int4": ("f32", "Q4_0 GGUF = slmkit int4 codes, embedding and head included")}
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                    max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    rope_theta=100000.0, hidden_act="silu", bos_token_id=0, eos_token_id=0)


#: ``--arch`` shapes: random models of each fast family's real shape (model_type, config).
SHAPES = {
    "smollm2-135m": ("llama", SMOLLM2_135M),
    "qwen2.5-0.5b": ("qwen2", dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, max_position_embeddings=2048,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=0,
        eos_token_id=0)),
    "qwen3-0.6b": ("qwen3", dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, intermediate_size=3072, vocab_size=151936, max_position_embeddings=2048,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=0,
        eos_token_id=0)),
    # Gemma 3 270M: 5 local (window 512) : 1 global layers, head_dim 256, one KV head, a
    # 262k vocabulary tied to the head (two thirds of the weights)
    "gemma3-270m": ("gemma3_text", dict(
        hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
        head_dim=256, intermediate_size=2048, vocab_size=262144, max_position_embeddings=2048,
        sliding_window=512, query_pre_attn_scalar=256, tie_word_embeddings=True,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                     for i in range(18)], bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    # Phi-3-mini's layout (fused qkv / gate_up, head_dim 96, 32k vocabulary) at a third of
    # its width and 8 of its 32 layers, to fit the 2-core machines' time
    "phi3-mini-scaled": ("phi3", dict(
        hidden_size=1152, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
        intermediate_size=3072, vocab_size=32064, max_position_embeddings=2048,
        tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
        pad_token_id=32000)),
    # Qwen1.5-MoE-A2.7B's routing (60 experts, top 4, a gated shared expert) at a quarter
    # of its width and 8 of its 24 layers, to fit the 2-core machines' memory and time
    "qwen2-moe-scaled": ("qwen2_moe", dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=1408, moe_intermediate_size=352, shared_expert_intermediate_size=1408,
        num_experts=60, num_experts_per_tok=4, vocab_size=151936, max_position_embeddings=2048,
        tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=0,
        eos_token_id=0)),
}
ARCH = {"name": "smollm2-135m"}


def vocab() -> int:
    """The ``--arch`` shape's vocabulary (prompt ids are drawn below it)."""
    return SHAPES[ARCH["name"]][1]["vocab_size"]


def build_model(dtype: torch.dtype):
    """The random model of the ``--arch`` shape (default: SmolLM2-135M), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, fields = SHAPES[ARCH["name"]]
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dtype).eval()
    return model


def weight_bytes(model, active: bool = True) -> int:
    """Bytes read per decode step: every parameter once (tied embeddings counted once), but
    for an input embedding table the head does not share (untied, or quantized into a
    copy), of which a step reads only its tokens' rows; with ``active``, a mixture of
    experts' expert weights scaled by top-k / experts (a batch-1 step reads only the chosen
    experts). ``active=False``: the whole model."""
    cfg = model.config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    share = cfg.num_experts_per_tok / experts if experts and active else 1.0
    seen, total = set(), 0
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_ptrs = {t.data_ptr() for t in [*head.parameters(), *head.buffers()]} \
        if head is not None else set()
    if active and not any(t.data_ptr() in head_ptrs for t in emb.parameters()):
        seen |= {t.data_ptr() for t in [*emb.parameters(), *emb.buffers()]}   # rows only
    for name, p in model.named_parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n = p.numel() * p.element_size()
            total += n * share if ".experts." in name else n
    for name, b in model.named_buffers():     # quantized layers' codes (experts' too)
        if b.data_ptr() not in seen and "inv_freq" not in name:
            seen.add(b.data_ptr())
            n = b.numel() * b.element_size()
            total += n * share if ".experts." in name else n
    return int(total)


def transformers_runner(model, prompt: list[int], n: int):
    """A function timing one greedy ``generate()`` run (KV cache on): TTFT from a 1-token
    run, decode rate from an ``n``-token run minus it."""
    ids = torch.tensor([prompt])

    def run(k):
        t = time.perf_counter()
        with torch.inference_mode():
            seq = model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return time.perf_counter() - t, seq[0, len(prompt):].tolist()

    run(2)  # warm up

    def once() -> dict:
        t1, _ = run(1)
        tn, tokens = run(n)
        return {"ttft_s": t1, "prefill_tok_s": len(prompt) / t1,
                "decode_tok_s": (n - 1) / (tn - t1), "tokens": tokens}
    return once


def slmkit_runner(model, prompt: list[int], n: int, native_step: bool = True):
    """A function timing one greedy ``stream_tokens`` run: TTFT, prefill and decode rates.
    ``native_step=False`` turns the native decode step off for the run (the torch loop)."""
    def once() -> dict:
        native.set_enabled(native_step)
        try:
            t0 = time.perf_counter()
            stream = stream_tokens(model, prompt, n)
            tokens = [next(stream)]
            t1 = time.perf_counter()
            tokens += list(stream)
            t2 = time.perf_counter()
        finally:
            native.set_enabled(True)
        return {"ttft_s": t1 - t0, "prefill_tok_s": len(prompt) / (t1 - t0),
                "decode_tok_s": (len(tokens) - 1) / (t2 - t1), "tokens": tokens}

    native.set_enabled(native_step)
    try:
        for _ in stream_tokens(model, prompt[:8], 4):  # warm up (builds the native step)
            pass
    finally:
        native.set_enabled(True)
    return once


def slmkit_runners(model, prompt: list[int], n: int) -> dict:
    """``{"slmkit": ..., "slmkit torch loop": ...}``: the engine with its native decode step
    and with the step turned off, so the gain is measured in the same run."""
    return {"slmkit": slmkit_runner(model, prompt, n),
            "slmkit torch loop": slmkit_runner(model, prompt, n, native_step=False)}


def interleaved(runners: dict, rounds: int) -> dict:
    """Run every runner once per round, in turn, and keep each one's median-decode run.

    Batch-1 decode reads every weight once per token, so its rate follows the machine's
    memory bandwidth, which on a shared host moves by +-30% from minute to minute; taking
    the runtimes in turn puts each comparison under the same conditions, and the median
    drops the outliers. ``decode_tok_s_all`` keeps every round's figure."""
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(max(1, rounds)):
        for name, once in runners.items():
            runs[name].append(once())
    out = {}
    for name, rs in runs.items():
        ordered = sorted(rs, key=lambda r: r["decode_tok_s"])
        out[name] = {**ordered[(len(ordered) - 1) // 2],
                     "decode_tok_s_all": [r["decode_tok_s"] for r in rs]}
    return out


def time_streams(model, streams: int, prompt_len: int, n: int) -> dict:
    """Aggregate generated tok/s of the Engine with ``streams`` concurrent requests.

    Two figures: ``agg_tok_s`` over the whole run (prefill of every prompt included) and
    ``decode_agg_tok_s`` over the steady decode phase, from the moment the last request got
    its first token to the end (the figure that batching is meant to raise).
    """
    engine = Engine(model, None, max_batch=streams, max_seq_len=prompt_len + n + 8,
                    prefill_chunk=256, background=False)
    g = torch.Generator().manual_seed(streams)
    prompts = [torch.randint(1, min(49152, vocab()), (prompt_len,), generator=g).tolist()
               for _ in range(streams)]
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    engine.generate(prompts[0][:8], SamplingParams(max_tokens=3, temperature=0))  # warm up
    stamps: list[tuple[str, int, float]] = []

    def record(event):
        if hasattr(event, "token_id"):
            stamps.append((event.request_id, event.index, time.perf_counter()))

    t0 = time.perf_counter()
    handles = [engine.submit(p, params, on_event=record) for p in prompts]
    while engine.step():
        pass
    t_end = time.perf_counter()
    tokens = sum(h.result().completion_tokens for h in handles)
    t_start = max(t for _, i, t in stamps if i == 0)
    decode_tokens = sum(1 for _, _, t in stamps if t > t_start)
    return {"streams": streams, "tokens": tokens, "wall_s": t_end - t0,
            "agg_tok_s": tokens / (t_end - t0),
            "decode_agg_tok_s": decode_tokens / (t_end - t_start) if t_end > t_start else 0.0}


def quantize(model, precision: str):
    """RTN int8 (per channel) / int4 (groups of 32) through slmkit's QuantLinear, in place.

    The embedding table and the LM head are quantized too, as llama.cpp's Q8_0 / Q4_0 files
    quantize ``token_embd`` and ``output``: a tied head with the table
    (``quantize_embeddings``; 21% of SmolLM2's weights), an untied one as a linear (Phi-3's,
    the MoE shape's: 46% of its int8 weights).
    """
    if precision == "fp32":
        return model
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions

    bits, group = (8, -1) if precision == "int8" else (4, 32)  # int4 in Q4_0-sized blocks
    untied = not getattr(model.config, "tie_word_embeddings", False)
    quantize_model(model, None, QuantizeOptions(method="rtn", bits=bits, group_size=group,
                                               quantize_embeddings=True,
                                               **({"ignore": []} if untied else {})))
    return model


def _vm_hwm() -> int:
    """Peak resident set of this process's own address space (``VmHWM``), in bytes.

    Not ``getrusage().ru_maxrss``: Linux carries that across fork+exec, so a child started
    by a big parent reports the parent's peak.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def memory_child(model_dir: str, max_seq_len: int, prompt_len: int, new_tokens: int) -> None:
    """Peak RSS of a fresh process that loads the saved fp32 model and decodes (prints JSON).

    The baseline is taken after every library the run needs is imported (torch,
    transformers' Llama classes, slmkit's loader and engine), so ``peak - baseline`` is the
    memory the model itself costs: weights, KV cache and the engine's working set.
    """
    import psutil
    from transformers import LlamaForCausalLM  # noqa: F401  (import cost is baseline)

    from slmkit.models.io import load_model

    base = psutil.Process().memory_info().rss
    model, _ = load_model(model_dir, dtype="fp32", tokenizer=False)
    engine = Engine(model, None, max_batch=1, max_seq_len=max_seq_len, background=False)
    kv = engine.runner.cache.nbytes
    prompt = list(range(1, prompt_len + 1))
    engine.generate(prompt, SamplingParams(max_tokens=new_tokens, temperature=0,
                                           ignore_eos=True))
    peak = _vm_hwm()
    print(json.dumps({"baseline_rss": base, "peak_rss": peak, "weight_bytes": weight_bytes(model, active=False),
                      "kv_bytes": kv}))


def measure_memory(args) -> dict:
    """Save the fp32 135M-shaped model to safetensors, then measure a child that loads it."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="slmkit-mem-") as tmp:
        build_model(torch.float32).save_pretrained(tmp)
        out = subprocess.run([sys.executable, __file__, "--memory-child", tmp, "--prompt-len",
                              str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                              "--threads", str(args.threads)], capture_output=True, text=True,
                             check=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    budget = m["weight_bytes"] + m["kv_bytes"]
    m["peak_over_weights_kv"] = m["peak_rss"] / budget
    m["added_over_weights_kv"] = (m["peak_rss"] - m["baseline_rss"]) / budget
    return m


def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def export_gguf_of(model, precision: str, work: Path) -> dict:
    """Save ``model`` with a small stdlib tokenizer and export it with slmkit's GGUF exporter.

    The tokenizer (512 tokens; GGUF pads the other ids) is only there because a GGUF file
    needs one: the benchmark feeds token ids, never text.

    Returns:
        ``{"path", "quant", "what", "weight_bytes", ...}``; ``weight_bytes`` is the sum of
        the file's tensor sizes (what a decode step reads: an untied ``token_embd`` left
        out, as a step reads only its tokens' rows; a mixture's experts times top-k /
        experts, as for the slmkit rows).
    """
    import gguf

    from slmkit.console import quiet_libraries
    from slmkit.export.gguf_export import export_gguf
    from slmkit.models.io import save_model
    from slmkit.models.tokenizer import stdlib_sample, train_tokenizer

    quiet_libraries()
    tok = train_tokenizer(stdlib_sample(max_files=30, max_bytes=200_000), vocab_size=512)
    model_dir = save_model(model, tok, work / f"{precision}-model", step="bench",
                           params={"bench": "decode"})
    quant, what = GGUF_FOR[precision]
    res = export_gguf(str(model_dir), work / f"{precision}.gguf", quant=quant)
    tensors = gguf.GGUFReader(res.path).tensors
    untied = any(t.name == "output.weight" for t in tensors)    # token_embd: rows only
    cfg = model.config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    share = cfg.num_experts_per_tok / experts if experts else 1.0  # the chosen experts' bytes
    weight_bytes_ = int(sum(int(t.n_bytes) * (share if "_exps." in t.name else 1.0)
                            for t in tensors if not (untied and t.name == "token_embd.weight")))
    return {"path": str(res.path), "quant": quant, "what": what, "weight_bytes": weight_bytes_,
            "tensor_types": dict(res.types),
            "exact_layers": f"{res.from_quantized - res.requantized}/{res.from_quantized}"}


def llamacpp_runner(gguf_path: str, prompt: list[int], n: int, threads: int):
    """``(once, close)``: a function timing one greedy llama.cpp run on a GGUF file (TTFT,
    prefill and decode rates, EOS ignored), and the function that frees the model.

    ``Llama.eval`` runs the prompt in one batch (prefill), then each new token alone; the
    next token is the argmax of the last position's logits read straight from llama.cpp
    (``llama_get_logits_ith``), so nothing stops early and exactly ``n`` tokens are made.
    """
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=len(prompt) + n + 8,
                          n_batch=max(8, len(prompt)), n_ubatch=max(8, len(prompt)),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)   # last position's logits
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def run(ids: list[int], k: int) -> dict:
        llm.reset()                           # empties the KV cache on the next eval
        t0 = time.perf_counter()
        llm.eval(ids)
        tokens = [next_token()]
        t1 = time.perf_counter()
        while len(tokens) < k:
            llm.eval([tokens[-1]])
            tokens.append(next_token())
        t2 = time.perf_counter()
        assert len(tokens) == k and llm.n_tokens == len(ids) + k - 1
        return {"ttft_s": t1 - t0, "prefill_tok_s": len(ids) / (t1 - t0),
                "decode_tok_s": (k - 1) / (t2 - t1), "tokens": tokens,
                "version": llama_cpp.__version__}

    run(prompt[:8], 4)                        # warm up
    return (lambda: run(prompt, n)), llm.close


def bench_precision(precision: str, args, prompt: list[int]) -> dict:
    import tempfile

    lcpp = not args.skip_llamacpp and llamacpp_available()
    with tempfile.TemporaryDirectory(prefix="slmkit-gguf-") as tmp:
        model = build_model(torch.float32)
        gguf = export_gguf_of(model, precision, Path(tmp)) if lcpp and precision != "int4" \
            else None
        model = quantize(model, precision)
        if lcpp and precision == "int4":      # the int4 QuantLinear codes map onto Q4_0
            gguf = export_gguf_of(model, precision, Path(tmp))
        wbytes = weight_bytes(model)
        from slmkit.engine.runner import kv_cache_dtype

        res = {"precision": precision, "weight_bytes": wbytes,
               "total_weight_bytes": weight_bytes(model, active=False),
               "moe": bool(getattr(model.config, "num_experts", None)
                           or getattr(model.config, "num_local_experts", None)),
               "limit_tok_s": args.bandwidth / wbytes,
               # the engine's default: fp16 for quantized models (llama.cpp's default too)
               "kv_cache": str(kv_cache_dtype(model)).removeprefix("torch."),
               "rounds": args.rounds}
        runners = slmkit_runners(model, prompt, args.new_tokens)
        close = None
        if not args.skip_hf:
            runners["transformers"] = transformers_runner(model, prompt, args.new_tokens)
        if gguf is not None:
            runners["llama.cpp"], close = llamacpp_runner(gguf["path"], prompt,
                                                          args.new_tokens, args.threads)
        try:
            res.update(interleaved(runners, args.rounds))
        finally:
            if close is not None:
                close()
        probe = make_runner(model, 1, 8)
        res["slmkit"]["path"] = ("generic (transformers forward)" if not probe.fast else
                                 "native" if probe.native else
                                 f"torch ({probe.native_reason})")
        del probe
        if "transformers" in res:
            res["greedy_equal_to_transformers"] = \
                res["slmkit"]["tokens"] == res["transformers"]["tokens"]
        if gguf is not None:
            res["llama.cpp"]["gguf"] = gguf
            ours, theirs = res["slmkit"]["tokens"], res["llama.cpp"]["tokens"]
            res["llamacpp_same_greedy_prefix"] = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        res["streams"] = stream_sweep(model, args)
    del model
    return res


def stream_sweep(model, args) -> list[dict]:
    """The Engine at each --streams count. The sweep runs --stream-repeats times,
    interleaved, and each count keeps its median run: single runs on a shared 2-core
    machine wander by +-20%."""
    counts = [int(s) for s in args.streams.split(",")]
    runs: dict[int, list[dict]] = {c: [] for c in counts}
    for _ in range(max(1, args.stream_repeats)):
        for c in counts:
            runs[c].append(time_streams(model, c, 32, args.stream_tokens))
    out = []
    for c in counts:
        ordered = sorted(runs[c], key=lambda r: r["decode_agg_tok_s"])
        out.append({**ordered[len(ordered) // 2],
                    "decode_agg_tok_s_all": [r["decode_agg_tok_s"] for r in runs[c]]})
    return out


def bench_reference(args, prompt_len: int) -> dict | None:
    """Batch-1 figures on the shared reference model (micro, trained on stdlib).

    Used when it is already cached, or trained first with ``--reference``.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reference

    cached = (reference.cache_dir() / f"micro-stdlib-v{reference.REFERENCE_VERSION}"
              / "config.json").is_file()
    if not (cached or args.reference):
        return None
    from slmkit.models import load_model

    model, tok = load_model(reference.reference_model_dir())
    text = open(reference.__file__, encoding="utf-8").read()
    prompt = tok(text, add_special_tokens=False)["input_ids"][:prompt_len]
    res = {"precision": "fp32", "model": "reference (micro, stdlib)",
           "weight_bytes": weight_bytes(model)}
    res["limit_tok_s"] = args.bandwidth / res["weight_bytes"]
    runners = slmkit_runners(model, prompt, args.new_tokens)
    runners["transformers"] = transformers_runner(model, prompt, args.new_tokens)
    res.update(interleaved(runners, args.rounds))
    res["greedy_equal_to_transformers"] = res["slmkit"]["tokens"] == res["transformers"]["tokens"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="smollm2-135m", choices=list(SHAPES),
                    help="the random model's family and shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--stream-tokens", type=int, default=32, help="tokens per stream")
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--stream-repeats", type=int, default=5,
                    help="run the stream sweep this many times and keep each count's median")
    ap.add_argument("--rounds", type=int, default=3,
                    help="batch-1 runs per runtime, taken in turn; each keeps its median")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--bandwidth", type=float, default=30e9, help="bytes/s")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers generate()")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-RSS measurement")
    ap.add_argument("--skip-llamacpp", action="store_true",
                    help="skip llama.cpp (print issue 8's published figures instead)")
    ap.add_argument("--omp-active", action="store_true",
                    help="keep OpenMP's spin-waiting even on a busy machine")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE even on an idle machine (default: only "
                    "when the load average exceeds the core count)")
    ap.add_argument("--reference", action="store_true",
                    help="also time the reference model (trains it once if not cached)")
    ap.add_argument("--memory-child", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    ARCH["name"] = args.arch
    if args.memory_child:
        memory_child(args.memory_child, args.prompt_len + args.new_tokens + 8, args.prompt_len,
                     args.new_tokens)
        return
    if args.memory_only:
        m = measure_memory(args)
        report_memory(m)
        print(json.dumps(m))
        return
    prompt = torch.randint(1, min(49152, vocab()), (args.prompt_len,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    results = {"model": f"random {args.arch} shape ({SHAPES[args.arch][0]})",
               "arch": args.arch, "threads": args.threads,
               "torch": torch.__version__, "machine": platform.machine(),
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "bandwidth": args.bandwidth,
               "loadavg_start": os.getloadavg()[0],
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
               "llamacpp": ("skipped (--skip-llamacpp)" if args.skip_llamacpp else
                            "measured" if llamacpp_available() else "not installed"),
               "runs": []}
    for precision in args.precisions.split(","):
        results["runs"].append(bench_precision(precision, args, prompt))
    ref = bench_reference(args, args.prompt_len)
    if ref is not None:
        results["reference"] = ref
    if not args.skip_memory:
        results["memory"] = measure_memory(args)
    results["loadavg_end"] = os.getloadavg()[0]
    report(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def report(results: dict) -> None:
    """Print the batch-1, batching, bars and memory tables."""
    rows, stream_rows, bars = [], [], []
    for run in results["runs"]:
        p, limit = run["precision"], run["limit_tok_s"]
        for name in ("slmkit", "slmkit torch loop", "transformers", "llama.cpp"):
            if name in run:
                r = run[name]
                wbytes = r["gguf"]["weight_bytes"] if name == "llama.cpp" else run["weight_bytes"]
                label = f"llama.cpp ({r['gguf']['what']})" if name == "llama.cpp" else name
                rows.append((p, label, f"{wbytes / 1e6:.0f}", f"{r['prefill_tok_s']:.0f}",
                             f"{r['ttft_s'] * 1000:.0f}", f"{r['decode_tok_s']:.1f}",
                             f"{r['decode_tok_s'] * wbytes / results['bandwidth']:.0%}"))
        published = LLAMA_CPP_PUBLISHED.get(p)
        if "llama.cpp" in run:
            lc = run["llama.cpp"]
            bars.append((f"{p} decode, slmkit vs llama.cpp (same run)",
                         run["slmkit"]["decode_tok_s"] / lc["decode_tok_s"], ">= 1.0"))
            bars.append((f"{p} prefill, slmkit vs llama.cpp (same run)",
                         run["slmkit"]["prefill_tok_s"] / lc["prefill_tok_s"], ""))
            bars.append((f"{p} greedy tokens equal to llama.cpp before the first difference",
                         f"{run['llamacpp_same_greedy_prefix']}/{len(lc['tokens'])}", "info"))
        elif published:
            why = results["llamacpp"]
            rows.append((p, f"llama.cpp (issue 8's published figure; here {why})", "-", "-",
                         "-", f"{published}", "-"))
            bars.append((f"{p} decode vs llama.cpp (published, not this run)",
                         run["slmkit"]["decode_tok_s"] / published, ">= 1.0"))
        if "transformers" in run:
            bars.append((f"{p} decode vs transformers", run["slmkit"]["decode_tok_s"]
                         / run["transformers"]["decode_tok_s"], ">= 3.0 (fp32)"))
        if "greedy_equal_to_transformers" in run:
            bars.append((f"{p} greedy tokens == transformers",
                         float(run["greedy_equal_to_transformers"]), "1 (yes)"))
        base = run["streams"][0]["agg_tok_s"]
        dbase = run["streams"][0]["decode_agg_tok_s"]
        for s in run["streams"]:
            stream_rows.append((p, run.get("kv_cache", "-"), s["streams"], f"{s['agg_tok_s']:.1f}",
                                f"{s['agg_tok_s'] / base:.2f}x", f"{s['decode_agg_tok_s']:.1f}",
                                f"{s['decode_agg_tok_s'] / dbase:.2f}x",
                                f"{s['decode_agg_tok_s'] / limit:.0%}"))
            if s["streams"] == 8:
                bars.append((f"{p} 8 streams vs 1 (decode phase)", s["decode_agg_tok_s"] / dbase,
                             ">= 4.0"))
                bars.append((f"{p} 8 streams vs 1 (with prefill)", s["agg_tok_s"] / base, ""))
        run["ratios"] = {name: value for name, value, _ in bars if name.startswith(p)}
    rounds = results["runs"][0].get("rounds", 1) if results["runs"] else 1
    print_table(f"batch 1, {results['threads']} threads (OMP_WAIT_POLICY="
                f"{results['omp_wait_policy']}), median of {rounds} rounds, "
                f"prompt {results['prompt_len']}, "
                f"{results['new_tokens']} new tokens (load avg {results['loadavg_start']:.1f} "
                f"-> {results['loadavg_end']:.1f})", rows,
                header=("precision", "runtime", "weights MB", "prefill tok/s", "TTFT ms",
                        "decode tok/s", "of bandwidth limit"))
    for run in results["runs"]:
        total = run.get("total_weight_bytes", run["weight_bytes"])
        if run.get("moe"):
            print(f"{run['precision']}: mixture of experts: a batch-1 step reads "
                  f"{run['weight_bytes'] / 1e6:.0f} MB of {total / 1e6:.0f} MB (the chosen "
                  f"experts and the embedding's rows only): active-parameter bandwidth limit "
                  f"{run['limit_tok_s']:.1f} tok/s at {results['bandwidth'] / 1e9:g} GB/s "
                  f"(all weights: {results['bandwidth'] / total:.1f} tok/s)")
    print_table("continuous batching (Engine, 32-token prompts)", stream_rows,
                header=("precision", "KV cache", "streams", "tok/s incl. prefill", "vs 1",
                        "decode-phase tok/s", "vs 1", "of limit"))
    print_table("bars", [(n, v if isinstance(v, str) else f"{v:.2f}x", goal)
                         for n, v, goal in bars],
                header=("ratio", "measured", "goal"))
    ref = results.get("reference")
    if ref:
        print_table(f"reference model, fp32, batch 1 (weights {ref['weight_bytes'] / 1e6:.0f} MB)", [
            (name, f"{ref[name]['prefill_tok_s']:.0f}", f"{ref[name]['ttft_s'] * 1000:.0f}",
             f"{ref[name]['decode_tok_s']:.1f}") for name in ("slmkit", "transformers")] + [
            ("slmkit / transformers", "", "", f"{ref['slmkit']['decode_tok_s'] / ref['transformers']['decode_tok_s']:.2f}x"),
            ("greedy tokens equal", "", "", str(ref["greedy_equal_to_transformers"]))],
            header=("runtime", "prefill tok/s", "TTFT ms", "decode tok/s"))
    report_memory(results.get("memory"))


def report_memory(m: dict | None) -> None:
    """The peak-RSS table."""
    if m:
        print_table("memory (fp32 model loaded from safetensors, separate process)", [
            ("weights + KV cache", f"{(m['weight_bytes'] + m['kv_bytes']) / 1e6:.0f} MB"),
            ("peak RSS", f"{m['peak_rss'] / 1e6:.0f} MB ({m['peak_over_weights_kv']:.2f}x)"),
            ("libraries alone (torch, transformers, slmkit)", f"{m['baseline_rss'] / 1e6:.0f} MB"),
            ("peak RSS above the libraries", f"{(m['peak_rss'] - m['baseline_rss']) / 1e6:.0f} MB "
             f"({m['added_over_weights_kv']:.2f}x; bar 1.3x)")])


if __name__ == "__main__":
    main()
