"""GGML block formats (Q8_0, Q4_0, Q4_1, F16, BF16): pure tensor math, no file I/O.

A GGML quantized row is a sequence of 32-weight blocks along the *input* dimension
(the last axis of an ``nn.Linear`` weight ``[out, in]``). Each block is stored as:

=======  ===================================================  =========
type     bytes                                                 size
=======  ===================================================  =========
Q8_0     ``d: f16`` then 32 × ``int8`` codes                    34 bytes
Q4_0     ``d: f16`` then 16 bytes of nibbles                    18 bytes
Q4_1     ``d: f16``, ``m: f16`` then 16 bytes of nibbles        20 bytes
=======  ===================================================  =========

Dequantization (what llama.cpp computes):

* Q8_0: ``w = d * q`` with ``q`` in [-127, 127].
* Q4_0: ``w = d * (q - 8)`` with ``q`` in [0, 15] (symmetric, zero point fixed at 8).
* Q4_1: ``w = d * q + m`` with ``q`` in [0, 15] (asymmetric, ``m`` is the block minimum).

Nibble layout: byte ``j`` (0..15) of a block holds weight ``j`` in its low nibble and weight
``j + 16`` in its high nibble -- *not* neighbouring weights.

The round-to-nearest quantizers below reproduce ggml's reference quantizers
(``quantize_row_q8_0_ref``, ``quantize_row_q4_0_ref``, ``quantize_row_q4_1_ref`` in
``ggml-quants.c``) bit for bit: the same float32 arithmetic, the same rounding (C ``roundf``
for Q8_0, truncation of ``x + 8.5`` / ``x + 0.5`` for the 4-bit types) and the same tie rules.
The ``pack_*`` functions take integer codes and scales that were computed elsewhere (GPTQ,
AWQ, RTN in slmkit) and only lay them out as blocks.
"""

from __future__ import annotations

import numpy as np
import torch

QK = 32  # weights per block for Q8_0 / Q4_0 / Q4_1
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` float -> ``[rows, cols // 32, 32]`` float32 (checks divisibility)."""
    if weight.dim() != 2 or weight.shape[1] % QK:
        raise ValueError(f"GGML block formats need a 2-D tensor whose last dim is a multiple "
                         f"of {QK}, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    return weight.detach().to(torch.float32).reshape(rows, cols // QK, QK)  # [R, B, 32]


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """``1 / d`` in float32, and 0 where ``d == 0`` (an all-zero block), as ggml does."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, 1.0, d))


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: round half away from zero (``torch.round`` rounds half to even)."""
    a = v.abs()
    fl = a.floor()
    return torch.sign(v) * (fl + ((a - fl) >= 0.5).to(v.dtype))  # a - fl is exact in fp32


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., 1]`` -> its IEEE half bytes ``[..., 2]`` (round to nearest even)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[R, B, 32]`` in [0, 15] -> packed bytes ``[R, B, 16]``.

    Byte ``j`` = ``q[j] | q[j + 16] << 4`` (ggml's layout).
    """
    q = q.to(torch.uint8)
    return q[..., : QK // 2] | (q[..., QK // 2:] << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    """Packed bytes ``[R, B, 16]`` -> 4-bit codes ``[R, B, 32]`` (inverse of :func:`_nibbles`)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _flat(parts: list[torch.Tensor]) -> np.ndarray:
    """Concatenate per-block byte parts ``[R, B, k_i]`` -> ``uint8 [R, B * sum(k_i)]``."""
    block = torch.cat(parts, dim=-1)  # [R, B, bytes_per_block]
    return block.reshape(block.shape[0], -1).numpy()


# ----------------------------------------------------------------------------- packers

def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Lay out int8 codes and per-block scales as Q8_0 blocks.

    Args:
        q: integer codes ``[rows, cols]`` in [-127, 127] (weight ≈ ``d * q``).
        d: scales ``[rows, cols // 32]`` (stored as float16).

    Returns:
        ``uint8 [rows, cols // 32 * 34]``.
    """
    rows, cols = q.shape
    q = q.to(torch.int8).reshape(rows, cols // QK, QK)  # [R, B, 32]
    return _flat([_f16_bytes(d.to(torch.float32).unsqueeze(-1)), q.view(torch.uint8)])


def pack_q4_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Lay out 4-bit codes in [0, 15] (zero point 8) as Q4_0 blocks: weight = ``d * (q - 8)``.

    Args:
        q: codes ``[rows, cols]``; d: scales ``[rows, cols // 32]``.

    Returns:
        ``uint8 [rows, cols // 32 * 18]``.
    """
    rows, cols = q.shape
    q = q.reshape(rows, cols // QK, QK)  # [R, B, 32]
    return _flat([_f16_bytes(d.to(torch.float32).unsqueeze(-1)), _nibbles(q)])


def pack_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Lay out 4-bit codes in [0, 15] as Q4_1 blocks: weight = ``d * q + m``.

    Args:
        q: codes ``[rows, cols]``; d: scales and m: offsets, both ``[rows, cols // 32]``.

    Returns:
        ``uint8 [rows, cols // 32 * 20]``.
    """
    rows, cols = q.shape
    q = q.reshape(rows, cols // QK, QK)  # [R, B, 32]
    return _flat([_f16_bytes(d.to(torch.float32).unsqueeze(-1)),
                  _f16_bytes(m.to(torch.float32).unsqueeze(-1)), _nibbles(q)])


# ----------------------------------------------------------------------------- RTN quantizers

def quantize_q8_0(weight: torch.Tensor) -> np.ndarray:
    """Round-to-nearest Q8_0, bit-exact with ggml's ``quantize_row_q8_0_ref``.

    Args:
        weight: ``[rows, cols]`` with ``cols % 32 == 0``.

    Returns:
        ``uint8 [rows, cols // 32 * 34]``.
    """
    x = _blocks(weight)                                  # [R, B, 32]
    d = x.abs().amax(dim=-1, keepdim=True) / 127         # [R, B, 1]
    q = _roundf(x * _safe_inverse(d))
    return _flat([_f16_bytes(d), q.to(torch.int8).view(torch.uint8)])


def quantize_q4_0(weight: torch.Tensor) -> np.ndarray:
    """Round-to-nearest Q4_0, bit-exact with ggml's ``quantize_row_q4_0_ref``.

    The scale is ``d = max / -8`` where ``max`` is the signed weight of largest magnitude
    (the first one on ties), so that weight maps to code 0 exactly.
    """
    x = _blocks(weight)                                  # [R, B, 32]
    imax = x.abs().argmax(dim=-1, keepdim=True)          # first maximal, like ggml's loop
    d = torch.gather(x, -1, imax) / -8                   # [R, B, 1]
    q = torch.clamp(torch.trunc(x * _safe_inverse(d) + 8.5), 0, 15)
    return _flat([_f16_bytes(d), _nibbles(q)])


def quantize_q4_1(weight: torch.Tensor) -> np.ndarray:
    """Round-to-nearest Q4_1, bit-exact with ggml's ``quantize_row_q4_1_ref``."""
    x = _blocks(weight)                                  # [R, B, 32]
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    d = (hi - lo) / 15                                   # [R, B, 1]
    q = torch.clamp(torch.trunc((x - lo) * _safe_inverse(d) + 0.5), 0, 15)
    return _flat([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)])


def to_f16(weight: torch.Tensor) -> np.ndarray:
    """float -> numpy float16 (round to nearest even, as ggml's ``GGML_FP32_TO_FP16``)."""
    return weight.detach().to(torch.float32).to(torch.float16).numpy()


def to_bf16_bytes(weight: torch.Tensor) -> np.ndarray:
    """float -> bfloat16 bits as ``uint8 [rows, cols * 2]`` (round to nearest even)."""
    w = weight.detach().to(torch.float32).to(torch.bfloat16).contiguous()
    return w.view(torch.uint8).reshape(*w.shape[:-1], -1).numpy()


QUANTIZERS = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q4_1": quantize_q4_1}


# ----------------------------------------------------------------------------- dequantizers

def dequantize(data: np.ndarray, qtype: str, cols: int) -> torch.Tensor:
    """Unpack GGML blocks back to float32 ``[rows, cols]`` (for tests and error figures)."""
    raw = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
    rows = raw.shape[0]
    blk = raw.reshape(rows, cols // QK, BLOCK_BYTES[qtype])  # [R, B, bytes]
    d = blk[..., 0:2].contiguous().view(torch.float16).to(torch.float32)  # [R, B, 1]
    if qtype == "q8_0":
        q = blk[..., 2:].contiguous().view(torch.int8).to(torch.float32)
        w = d * q
    elif qtype == "q4_0":
        w = d * (_unnibble(blk[..., 2:]).to(torch.float32) - 8)
    elif qtype == "q4_1":
        m = blk[..., 2:4].contiguous().view(torch.float16).to(torch.float32)
        w = d * _unnibble(blk[..., 4:]).to(torch.float32) + m
    else:
        raise ValueError(f"unknown block type {qtype}")
    return w.reshape(rows, cols)  # [R, B, 32] -> [R, C]
