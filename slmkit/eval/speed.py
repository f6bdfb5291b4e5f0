"""Speed, memory and size of a model: what a user of a CPU box wants to know before serving it.

* prefill tokens/s at 128 and 512 prompt tokens (prompt length / time to first token);
* time to first token (TTFT) at 128 prompt tokens;
* decode tokens/s at batch 1 (tokens after the first / time after the first);
* peak resident memory of the process (Linux ``VmHWM``, reset before the model loads);
* size on disk, parameter count (active per token for mixture-of-experts) and effective
  bits per weight (weight-file bits / dense parameter count of the architecture).

Generation goes through :func:`slmkit.eval.generate.get_stream_tokens`, so the figures are
those of the engine's fastest path. Timings are the best of a few repeats after a warm-up,
kept short (a few seconds per model) by default.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

PROMPT_LENGTHS = (128, 512)
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (since the last reset, on Linux)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def size_stats(model_dir: Path, config) -> dict[str, Any]:
    """Size on disk, dense parameter counts and effective bits per weight.

    Parameters are counted on a meta-device skeleton of the architecture in ``config``, so
    a packed or low-rank checkpoint is measured against the dense model it stands for.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from slmkit.models.info import dir_size
    from slmkit.models.presets import count_params

    section = getattr(config, "slmkit", None)
    if isinstance(section, dict) and section.get("tied_head"):
        import copy

        config = copy.deepcopy(config)          # a quantized table's head holds the same
        config.tie_word_embeddings = True       # codes: one set of parameters, not two
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    counts = count_params(skeleton)
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"params": counts["total"], "active_params": counts["active"],
            "size_on_disk": dir_size(model_dir), "weight_bytes": weight_bytes,
            "bits_per_weight": 8 * weight_bytes / counts["total"] if counts["total"] else None}


def prompt_ids(tokenizer, n: int) -> list[int]:
    """``n`` token ids of real Python text (this module's source, repeated as needed)."""
    text = Path(__file__).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return list(ids[:n])


def _time_to_first(stream, model, ids: list[int]) -> float:
    t0 = time.perf_counter()
    next(iter(stream(model, ids, 1)))
    return time.perf_counter() - t0


def measure_speed(model, tokenizer, prompt_lengths=PROMPT_LENGTHS, decode_tokens: int = 32,
                  repeats: int = 2, stream=None) -> dict[str, Any]:
    """Prefill throughput, time to first token and batch-1 decode throughput.

    Args:
        model: a causal LM (any format ``load_model`` loads).
        tokenizer: its tokenizer.
        prompt_lengths: prompt sizes for prefill; lengths beyond the model's context are
            reported as None.
        decode_tokens: tokens generated for the decode figure (after a 32-token prompt).
        repeats: timed runs per figure (best kept), after one warm-up run.
        stream: a ``stream_tokens`` function; default the engine's.

    Returns:
        ``{"prefill_tok_s": {L: tok/s}, "ttft_s", "decode_tok_s", "backend", "threads"}``.
    """
    import torch

    from slmkit.eval.generate import get_stream_tokens
    from slmkit.models.arch import context_length

    backend = "custom"
    if stream is None:
        stream, backend = get_stream_tokens()
    limit = context_length(model.config)
    _time_to_first(stream, model, prompt_ids(tokenizer, 16))  # warm-up
    prefill: dict[str, float | None] = {}
    ttft = None
    for n in prompt_lengths:
        if limit and n + 1 > limit:
            prefill[str(n)] = None
            continue
        ids = prompt_ids(tokenizer, n)
        best = min(_time_to_first(stream, model, ids) for _ in range(max(1, repeats)))
        prefill[str(n)] = n / best
        if ttft is None:
            ttft = best
    decode = None
    n_new = max(2, decode_tokens)
    if not limit or 32 + n_new <= limit:
        ids = prompt_ids(tokenizer, 32)
        rates = []
        for _ in range(max(1, repeats)):
            count, t_first = 0, 0.0
            for _tok in stream(model, ids, n_new):
                count += 1
                if count == 1:
                    t_first = time.perf_counter()
            elapsed = time.perf_counter() - t_first
            if count > 1 and elapsed > 0:
                rates.append((count - 1) / elapsed)
        decode = max(rates) if rates else None
    return {"prefill_tok_s": prefill, "ttft_s": ttft, "decode_tok_s": decode,
            "backend": backend, "threads": torch.get_num_threads()}
