"""Quantization math the quantizers share beyond the stored format: scheme checks and
fake quantization.

The grid, its round-to-nearest encoder and the packing live with the layers that store
them, in :mod:`slmkit.nn.packing` (see its docstring for the conventions).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from slmkit.errors import ConfigError
from slmkit.nn.packing import _grouped, compute_qparams

SUPPORTED_BITS = (3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)


def auto_group_size(widths: Iterable[int]) -> int:
    """The default group of a 4/3-bit scheme: the largest of 128, 64 and 32 that divides
    every width (input features of the targeted layers, and the embedding's when it is
    quantized too); -1 (per channel) when none does. SmolLM2-135M's 576 gets 64."""
    widths = list(widths)
    return next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), -1)


def check_scheme(bits: int, group_size: int, in_features: int | None = None,
                 name: str = "the layer") -> None:
    """Validate a bits / group-size combination (and that groups divide ``in_features``).

    Raises:
        ConfigError: unsupported bits, a group size that is not positive or -1, or a group
            size that does not divide the layer's input width.
    """
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"--bits {bits} is not supported; use 8 or 4 (3 is experimental and "
                          "stored one code per byte).")
    if group_size != -1 and (group_size <= 0 or group_size % 8):
        raise ConfigError(f"--group-size {group_size} is invalid; use 32, 64, 128 or -1 "
                          "(per channel).")
    if in_features is not None and group_size != -1 and in_features % group_size:
        raise ConfigError(f"--group-size {group_size} does not divide the {in_features} input "
                          f"features of {name}; choose a group size that divides it (e.g. "
                          f"{_divisor_hint(in_features)}) or -1, or --ignore that layer.")


def _divisor_hint(n: int) -> str:
    good = [g for g in (128, 64, 32) if n % g == 0]
    return str(good[0]) if good else "-1"


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                  clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``dequantize(quantize_rtn(w))`` in ``w``'s dtype: the weight the model will see
    (the same arithmetic, without materialising the uint8 codes)."""
    scale, zero = compute_qparams(w, bits, group_size, sym, clip)
    wg = _grouped(w.float(), group_size)                      # [out, G, g]
    s, z = scale[..., None], zero[..., None]
    q = torch.div(wg, s).round_()                             # in place from here on
    if sym:   # zero = 2^(bits-1): round(w/s) + z in [0, qmax]  <=>  round(w/s) in [-z, qmax-z]
        q.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    else:
        q.add_(z).clamp_(0, 2 ** bits - 1).sub_(z)
    return q.mul_(s).reshape(w.shape).to(w.dtype)
