"""The packed integer-code format of slmkit's quantized layers: grid, encoder, packing.

:class:`~slmkit.nn.quant_linear.QuantLinear` and
:class:`~slmkit.nn.quant_embedding.QuantEmbedding` store their weights in this format, and
the quantizers of :mod:`slmkit.compress.quantize` (RTN, GPTQ, AWQ) write it:

* A weight ``W`` is ``[out, in]``. Quantization groups are ``group_size`` *contiguous input
  columns* of one output row (``group_size = -1``: one group per row, "per channel"), so
  there are ``G = in / group_size`` groups per row.
* Every weight is stored as unsigned integer codes ``q ∈ [0, 2^bits - 1]`` (uint8) with a
  per-group ``scale`` (``[out, G]``, fp16 on disk) and integer zero point ``zero``
  (``[out, G]``): ``Ŵ = (q - zero) · scale``. Symmetric grids use the fixed
  ``zero = 2^(bits-1)`` and ``scale = max|w| / (2^(bits-1) - 1)``; asymmetric ones fit
  ``[min(w, 0), max(w, 0)]``.
* Round-to-nearest (RTN), the format's own encoder, is
  ``q = clamp(round(w / scale) + zero, 0, 2^bits - 1)``.
* On disk 4-bit codes are packed two per byte, 3-bit codes eight to three bytes, 8-bit
  codes one per byte (:func:`pack_codes`).

References: Jacob et al., 2018 (affine integer quantization); Dettmers et al., 2022
(LLM.int8(), per-channel absmax); Frantar et al., 2022 (GPTQ, group-wise grids).
"""

from __future__ import annotations

import torch


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, G, g]`` (a view)."""
    out, inp = w.shape
    g = inp if group_size == -1 else group_size
    return w.reshape(out, inp // g, g)


def compute_qparams(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                    clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group, from the group's range.

    Args:
        w: ``[out, in]`` weight.
        bits: code width.
        group_size: input columns per group, or -1 for per channel.
        sym: symmetric grid (fixed zero point) or asymmetric (fitted zero point).
        clip: shrink factor(s) for the range, scalar or ``[out, G]`` (AWQ clip search).

    Returns:
        ``(scale, zero)``, both ``[out, G]`` float32; ``zero`` holds integers.
    """
    wg = _grouped(w.float(), group_size)                      # [out, G, g]
    qmax = 2 ** bits - 1
    clip = clip if isinstance(clip, float) else clip.float()
    if sym:
        absmax = wg.abs().amax(dim=-1) * clip                  # [out, G]
        scale = absmax / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = wg.amin(dim=-1).clamp(max=0) * clip
        hi = wg.amax(dim=-1).clamp(min=0) * clip
        scale = _fp16_scale((hi - lo) / qmax)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        return scale, zero
    return _fp16_scale(scale), zero


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales are stored as fp16: round now so that codes are computed on the stored grid.
    All-zero groups get scale 1."""
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.clamp(min=2.0 ** -24).half().float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """Round-to-nearest codes ``[out, in]`` (uint8) of ``w`` on a given grid."""
    wg = _grouped(w.float(), group_size)                      # [out, G, g]
    q = torch.round(wg / scale[..., None]) + zero[..., None]
    return q.clamp_(0, 2 ** bits - 1).to(torch.uint8).reshape(w.shape)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Ŵ = (q - zero) · scale`` as a dense ``[out, in]`` tensor of ``dtype``."""
    qg = _grouped(q.float(), group_size)                      # [out, G, g]
    w = (qg - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(q.shape).to(dtype)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                 clip: torch.Tensor | float = 1.0):
    """Round-to-nearest quantization of a whole weight.

    Returns:
        ``(codes [out, in] uint8, scale [out, G], zero [out, G])``.
    """
    scale, zero = compute_qparams(w, bits, group_size, sym, clip)
    return quantize_codes(w, scale, zero, bits, group_size), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte: ``[out, in]`` uint8 -> ``[out, in / 2]`` uint8.

    Column ``2j`` goes to the low nibble of byte ``j``, column ``2j + 1`` to the high one.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[out, in / 2]`` -> ``[out, in]`` uint8 codes."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)  # interleave


def pack_int3(q: torch.Tensor) -> torch.Tensor:
    """Pack 3-bit codes eight to three bytes: ``[out, in]`` -> ``[out, 3 * ceil(in / 8)]``.

    Columns ``8j .. 8j + 7`` form the 24-bit little-endian number ``sum q_i << 3i`` held
    in bytes ``3j .. 3j + 2``; a ragged last group is padded with zero codes.
    """
    n = q.shape[-1]
    pad = -n % 8
    q = q.to(torch.int32)
    if pad:
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], pad)], dim=-1)
    g = q.reshape(*q.shape[:-1], -1, 8)                                   # [..., m, 8]
    v = (g << torch.arange(0, 24, 3, dtype=torch.int32, device=q.device)).sum(-1)  # [..., m]
    b = torch.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], dim=-1)  # [..., m, 3]
    return b.to(torch.uint8).reshape(*q.shape[:-1], -1)


def unpack_int3(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int3`: ``[out, 3 * ceil(n / 8)]`` -> ``[out, n]`` uint8 codes."""
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 3)          # [..., m, 3]
    v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)                  # [..., m]
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
    codes = (v[..., None] >> shifts) & 7                                  # [..., m, 8]
    return codes.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


def packed_cols(bits: int, n: int) -> int:
    """Bytes per row that ``n`` codes of ``bits`` bits take (see :func:`pack_codes`)."""
    return n // 2 if bits == 4 else 3 * -(-n // 8) if bits == 3 else n


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[out, in]`` -> stored bytes: 4-bit two per byte, 3-bit eight per three bytes,
    8-bit one per byte."""
    if bits == 4:
        return pack_int4(q)
    return pack_int3(q) if bits == 3 else q.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` for rows of ``n`` codes."""
    if bits == 4:
        return unpack_int4(packed)
    return unpack_int3(packed, n) if bits == 3 else packed


def effective_bits(bits: int, group_size: int, in_features: int, sym: bool,
                   scale_bits: int = 16) -> float:
    """Stored bits per weight including scales (fp16) and zero points (8 bit, asym only)."""
    g = in_features if group_size == -1 else group_size
    return storage_bits(bits) + scale_bits / g + (0 if sym else 8 / g)


def storage_bits(bits: int) -> int:
    """Bits a code takes on disk: 4- and 3-bit codes are packed, 8-bit ones are bytes."""
    return bits if bits in (3, 4) else 8

