"""The search space: per-linear options and what each one costs on disk.

An :class:`Option` is what one linear layer becomes: kept dense, or quantized to ``bits``
on groups of ``group_size`` input columns (-1: per output channel) by the search's method
(GPTQ or RTN, through :mod:`slmkit.compress.quantize`). Its size is the bytes the written
model dir stores for that layer, computed exactly as :class:`~slmkit.nn.quant_linear.
QuantLinear`'s state dict holds them (packed codes, fp16 scales, uint8 zero points when
asymmetric, the bias in the model's dtype) or as a dense ``nn.Linear`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmkit.nn.packing import num_groups, packed_cols

#: Bytes per safetensors header entry a layer's tensor adds (name, dtype, shape, offsets
#: as JSON): about what a 40-character name takes. The solve uses it; the chosen
#: assignment is then sized exactly by serializing its tensors (``run.exact_bytes``).
HEADER_BYTES_PER_TENSOR = 120


@dataclass(frozen=True, order=True)
class Option:
    """One choice for one linear: ``bits`` 0 means kept dense."""

    bits: int
    group_size: int = -1

    @property
    def dense(self) -> bool:
        return self.bits == 0

    @property
    def dropped(self) -> bool:
        """The layer's whole decoder block is dropped (``--drop-layers``)."""
        return self.bits == -1

    @property
    def key(self) -> str:
        """A short stable name: ``dense``, ``q8``, ``q4g64``, ``q3g32``, ``drop``."""
        if self.dense:
            return "dense"
        if self.dropped:
            return "drop"
        return f"q{self.bits}" + ("" if self.group_size == -1 else f"g{self.group_size}")

    @classmethod
    def parse(cls, key: str) -> Option:
        if key == "dense":
            return cls(0)
        if key == "drop":
            return cls(-1)
        bits, _, group = key[1:].partition("g")
        return cls(int(bits), int(group) if group else -1)


DENSE = Option(0)
#: Not an option of one linear: every linear of a dropped block carries it.
DROP = Option(-1)


def layer_options(in_features: int, bits: list[int], group_sizes: list[int],
                  keep_dense: bool) -> list[Option]:
    """The options of a linear with ``in_features`` inputs, fewest bytes last.

    8-bit layers are per output channel (the int8 kernels' grid); 4- and 3-bit ones take
    every listed group size that divides the width (4 bit also needs an even width).
    """
    out: list[Option] = [DENSE] if keep_dense else []
    for b in sorted(set(bits), reverse=True):
        if b == 8:
            out.append(Option(8, -1))
            continue
        for g in sorted(set(group_sizes)):
            if in_features % g == 0 and not (b == 4 and in_features % 2):
                out.append(Option(b, g))
    return out


def option_bytes(option: Option, out_features: int, in_features: int, bias: bool,
                 sym: bool, dtype_bytes: int = 4) -> int:
    """Bytes the written model dir stores for one linear under ``option`` (tensor data plus
    a bound on its safetensors header entries)."""
    b = out_features * dtype_bytes if bias else 0
    tensors = 1 + bool(bias)
    if option.dense:
        return out_features * in_features * dtype_bytes + b + HEADER_BYTES_PER_TENSOR * tensors
    groups = num_groups(in_features, option.group_size)
    codes = out_features * packed_cols(option.bits, in_features)
    scales = out_features * groups * 2
    zeros = 0 if sym else out_features * groups
    tensors = 2 + (not sym) + bool(bias)
    return codes + scales + zeros + b + HEADER_BYTES_PER_TENSOR * tensors
