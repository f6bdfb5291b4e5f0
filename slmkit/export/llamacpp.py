"""Run exported GGUF files in the real llama.cpp (``llama-cpp-python``, optional extra).

Used by the verification tests and ``bench/gguf_quality.py``: logits for a token sequence,
greedy decoding, held-out perplexity computed from llama.cpp's own logits, and llama.cpp's
own quantizer (``llama_model_quantize``) for comparison with slmkit's block packing.

Install with ``pip install -e ".[llamacpp]"`` (compiles llama.cpp: about 12 minutes on 2
cores).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from slmkit.errors import ConfigError

#: GGML types llama.cpp's quantizer is asked for, by slmkit's name.
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "f16": "LLAMA_FTYPE_MOSTLY_F16"}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("llama.cpp verification needs the llamacpp extra; install it with "
                          "`pip install -e \".[llamacpp]\"` (compiles llama.cpp, ~12 min).")
    return llama_cpp


def load(path: str | os.PathLike, n_ctx: int = 512, threads: int = 2):
    """Open a GGUF file in llama.cpp with logits kept for every position."""
    llama_cpp = _llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           n_threads=threads, n_threads_batch=threads, logits_all=True,
                           verbose=False, seed=0)


def logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(ids), V]`` for ``ids`` evaluated from an empty context."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids``, decoded one at a time with llama.cpp's KV cache."""
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's tokenization of ``text`` (no BOS, special tokens not parsed)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str,
             threads: int = 2, pure: bool = False) -> Path:
    """Quantize a GGUF file with llama.cpp's own quantizer (``llama_model_quantize``).

    Args:
        pure: every matrix in ``qtype``; otherwise llama.cpp's default mix, which keeps the
            output matrix (or a tied embedding) in a higher-precision type.
    """
    import ctypes

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[qtype])
    params.nthread = threads
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) failed with code {rc}")
    return Path(dst)


def perplexity(llm, windows: list[list[int]]) -> dict:
    """Perplexity from llama.cpp's logits over independent windows of token ids.

    Each window is evaluated from an empty context and every token after the first is
    scored (``-log p(t_i | t_<i)``), the same protocol as non-overlapping windows in
    ``slmkit.eval.perplexity``.

    Returns:
        ``{"tokens", "loss", "ppl"}``.
    """
    nll, count = 0.0, 0
    for ids in windows:
        lg = logits(llm, ids)[:-1].astype(np.float64)              # [T-1, V]
        lg -= lg.max(axis=-1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    loss = nll / max(count, 1)
    return {"tokens": count, "loss": loss, "ppl": math.exp(loss)}
