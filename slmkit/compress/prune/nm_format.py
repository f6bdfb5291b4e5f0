"""Compact on-disk storage of N:M-sparse linears (``slm prune --pattern 2:4 --compact``).

A layer whose every group of ``M`` consecutive inputs holds at most ``N`` non-zeros is
stored as two tensors instead of its dense ``weight``:

* ``<layer>.weight_nm_values``: the ``N`` kept weights of every group, ``[out, in * N / M]``
  in the model's dtype, in row-major order;
* ``<layer>.weight_nm_mask``: which positions they came from, one bit per input
  (``[out, ceil(in / 8)]`` uint8, bit ``i % 8`` of byte ``i // 8``, little end first).

At 2:4 that is half the values plus one bit per weight: an fp32 layer takes 2.125 bytes per
weight instead of 4 (53%), an fp16 one 1.125 instead of 2 (56%). ``config.json`` records
``"slmkit": {"format": "nm_sparse", "pattern": "N:M", "layers": {name: [out, in]}}``;
:func:`load` rebuilds the dense weights (exact), so the loaded model is a plain dense
model with zeros in place, as if it had been saved densely, and saving it again without
``--compact`` writes an ordinary transformers checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slmkit.errors import ModelLoadError

FORMAT = "nm_sparse"
VALUES, MASK = "weight_nm_values", "weight_nm_mask"
_BITS = 2 ** torch.arange(8, dtype=torch.int32)           # [8] bit weights, little end first


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` bool -> ``[out, ceil(in / 8)]`` uint8 (zero bits pad the last byte)."""
    out_f, in_f = mask.shape
    padded = torch.zeros(out_f, -(-in_f // 8) * 8, dtype=torch.int32)
    padded[:, :in_f] = mask.to(torch.int32)
    return (padded.view(out_f, -1, 8) * _BITS).sum(-1).to(torch.uint8)   # [out, in/8]


def unpack_bits(packed: torch.Tensor, in_f: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[out, ceil(in / 8)]`` uint8 -> ``[out, in]`` bool."""
    bits = (packed.to(torch.int32)[..., None] & _BITS) != 0       # [out, in/8, 8]
    return bits.reshape(packed.shape[0], -1)[:, :in_f]


def pack(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, packed mask)`` of an ``[out, in]`` weight, or None when some group of ``m``
    inputs holds more than ``n`` non-zeros (or ``m`` does not divide ``in``).

    Groups with fewer than ``n`` non-zeros keep some zeros (the first ones), so every row
    holds exactly ``in * n / m`` values and the layout needs no offsets.
    """
    out_f, in_f = w.shape
    if in_f % m:
        return None
    groups = w.reshape(out_f, in_f // m, m)                    # [out, in/m, m]
    nonzero = groups != 0
    if (nonzero.sum(-1) > n).any():
        return None
    # non-zeros first, then zeros, each by position; the first n, back in position order
    rank = (~nonzero).to(torch.int64) * m + torch.arange(m)    # [out, in/m, m]
    keep = rank.argsort(-1)[..., :n].sort(-1).values           # [out, in/m, n]
    mask = torch.zeros_like(nonzero).scatter_(2, keep, True)
    values = groups.gather(2, keep).reshape(out_f, in_f // m * n)
    return values.contiguous(), pack_bits(mask.reshape(out_f, in_f))


def unpack(values: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``[out, in]`` weight back from :func:`pack`'s tensors."""
    out_f, in_f = shape
    mask = unpack_bits(packed, in_f)                           # [out, in]
    if mask.shape != (out_f, in_f) or int(mask.sum()) != values.numel() \
            or values.shape[0] != out_f:
        raise ValueError(f"mask {tuple(packed.shape)} and values {tuple(values.shape)} do not "
                         f"describe a {out_f}x{in_f} weight")
    dense = torch.zeros(out_f, in_f, dtype=values.dtype)
    dense[mask] = values.reshape(-1)        # row-major order on both sides
    return dense


def compact_state_dict(model: nn.Module, names: list[str], n: int, m: int
                       ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The model's state dict with the N:M-sparse ``nn.Linear`` layers among ``names``
    replaced by their compact tensors, and ``{name: [out, in]}`` of the layers replaced.

    Other layers (GPT-2's transposed ``Conv1D``, anything that does not hold the pattern)
    stay dense.
    """
    state = dict(model.state_dict())
    done: dict[str, list[int]] = {}
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            continue
        packed = pack(module.weight.detach().cpu(), n, m)
        if packed is None:
            continue
        del state[f"{name}.weight"]
        state[f"{name}.{VALUES}"], state[f"{name}.{MASK}"] = packed
        done[name] = list(module.weight.shape)
    return state, done


def load(model_dir: Path, config, dtype: torch.dtype, device: str) -> nn.Module:
    """Format loader for ``"nm_sparse"``: the dense model, weights rebuilt exactly."""
    from slmkit.models.formats import load_dense_part, read_weights

    section = dict(getattr(config, "slmkit", None) or {})
    layers = section.get("layers")
    if not isinstance(layers, dict):
        raise ModelLoadError(f"'{model_dir}' has an incomplete nm_sparse section in "
                             "config.json (no layers); re-create it with `slm prune --compact`.")
    model = load_dense_part(model_dir, config, dtype, "slm prune --compact")
    state = read_weights(model_dir)
    for name, shape in layers.items():
        try:
            values, packed = state.pop(f"{name}.{VALUES}"), state.pop(f"{name}.{MASK}")
            weight = unpack(values, packed, (int(shape[0]), int(shape[1])))
            module = model.get_submodule(name)
            if tuple(module.weight.shape) != tuple(weight.shape):
                raise ValueError(f"shape {tuple(weight.shape)} for {tuple(module.weight.shape)}")
        except (KeyError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"'{model_dir}' has damaged compact weights for '{name}' "
                                 f"({e}); re-create the model with `slm prune --compact`.") \
                from None
        with torch.no_grad():
            module.weight.copy_(weight.to(dtype))
    return model.to(device)
