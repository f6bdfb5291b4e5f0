"""``QuantLinear``: a drop-in ``nn.Linear`` with int8 / packed int4 weights and CPU kernels.

Storage (what ``state_dict`` holds, and what goes to safetensors):

* ``qweight``: uint8 codes, ``[out, in]`` (8 bit), ``[out, in / 2]`` packed two per byte
  (4 bit, low nibble = even column) or ``[out, 3 * ceil(in / 8)]`` eight to three bytes
  (3 bit), see :mod:`slmkit.nn.packing` (``pack_codes``); 3-bit files written
  before the packing (one code per byte) still load;
* ``scales``: fp16 ``[out, G]``; ``zeros``: uint8 ``[out, G]`` (asymmetric only; symmetric
  grids use the fixed zero point ``2^(bits-1)``);
* ``bias`` (optional, same name as ``nn.Linear``), ``input_scale`` (optional ``[in]``:
  AWQ's per-channel scale when it could not be folded into a preceding op).

The weight the layer computes with is ``Ŵ = (q - zero) · scale``, and
``forward(x) = (x / input_scale) @ Ŵᵀ + bias``.

Kernels (chosen on first use per device, then cached; not part of the state dict):

* CPU, 8 bit symmetric per channel: ``torch._weight_int8pack_mm`` (bf16 activations);
* CPU, 4 bit, group size 32/64/128/256 and ``out % 16 == 0``:
  ``torch._weight_int4pack_mm_for_cpu`` on weights packed by
  ``torch._convert_weight_to_int4pack_for_cpu`` (tinygemm layout, bf16 activations; its
  ``(q - 8) · scale + zero_f`` form takes any grid via ``zero_f = (8 - zero) · scale``);
* CUDA, 4 bit: ``torch._weight_int4pack_mm`` when it accepts the shapes;
* anything else: dequantize once to a dense weight in the activation dtype and use
  ``F.linear`` (same numbers, no speed-up).

Set ``SLMKIT_QUANT_KERNEL=dequant`` (or :func:`set_kernel_mode`) to force the fallback.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.nn.packing import (
    dequantize_codes,
    effective_bits,
    num_groups,
    pack_codes,
    packed_cols,
    unpack_codes,
)

_MODE = {"kernel": os.environ.get("SLMKIT_QUANT_KERNEL", "auto")}
INT4_GROUPS = (32, 64, 128, 256)


def set_kernel_mode(mode: str) -> None:
    """``"auto"`` (fastest available kernel) or ``"dequant"`` (dense fallback everywhere)."""
    if mode not in ("auto", "dequant"):
        raise ValueError(f"unknown kernel mode {mode!r}")
    _MODE["kernel"] = mode


class QuantLinear(nn.Module):
    """Weight-only quantized linear layer (replaces one ``nn.Linear`` / GPT-2 ``Conv1D``).

    Args:
        in_features, out_features: as ``nn.Linear``.
        bits: 8, 4 or 3.
        group_size: input columns per scale, or -1 (per output channel).
        sym: symmetric grid (no stored zero points).
        bias: whether the layer has a bias.
        input_scale: whether the layer divides its input by a per-channel scale (AWQ).
        conv1d: the layer replaced a GPT-2 ``Conv1D`` (only matters for :meth:`to_dense`).
        dtype: dtype of ``bias`` / ``input_scale``.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 sym: bool, bias: bool = False, input_scale: bool = False,
                 conv1d: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.conv1d = bits, group_size, sym, conv1d
        groups = num_groups(in_features, group_size)
        cols = packed_cols(bits, in_features)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16,
                                                  device=device))
        if sym:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8,
                                                      device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        if input_scale:
            self.register_buffer("input_scale", torch.ones(in_features, dtype=dtype,
                                                           device=device))
        else:
            self.input_scale = None
        self._cache: dict = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int, group_size: int, sym: bool, bias: torch.Tensor | None = None,
                   input_scale: torch.Tensor | None = None, conv1d: bool = False,
                   dtype: torch.dtype = torch.float32) -> QuantLinear:
        """Build from quantizer output: ``codes`` ``[out, in]`` uint8, ``scale``/``zero``
        ``[out, G]``."""
        out, inp = codes.shape
        layer = cls(inp, out, bits, group_size, sym, bias=bias is not None,
                    input_scale=input_scale is not None, conv1d=conv1d, dtype=dtype,
                    device=codes.device)
        layer.qweight.copy_(pack_codes(codes, bits))
        layer.scales.copy_(scale.to(torch.float16))
        if not sym:
            layer.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        if input_scale is not None:
            layer.input_scale.copy_(input_scale.to(dtype))
        return layer

    # ------------------------------------------------------------------ views

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes ``[out, in]``."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "qweight"
        q = state_dict.get(key)
        if self.bits == 3 and q is not None and q.dim() == 2 \
                and q.shape[1] == self.in_features != self.qweight.shape[1]:
            state_dict[key] = pack_codes(q, 3)     # a file from before 3-bit packing
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def zero_points(self) -> torch.Tensor:
        """Integer zero points ``[out, G]`` as float32 (fixed ``2^(bits-1)`` when symmetric)."""
        if self.sym:
            return torch.full(self.scales.shape, 2.0 ** (self.bits - 1),
                              device=self.scales.device)
        return self.zeros.float()

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Ŵ = (q - zero) · scale``, ``[out, in]`` (the weight applied to ``x / input_scale``)."""
        return dequantize_codes(self.codes(), self.scales, self.zero_points(), self.group_size,
                                dtype)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The equivalent dense ``nn.Linear`` weight ``Ŵ / input_scale`` (column-wise)."""
        w = self.dequantize_weight(torch.float32)
        if self.input_scale is not None:
            w = w / self.input_scale.float()[None, :]
        return w.to(dtype)

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` (or GPT-2 ``Conv1D``) computing the same function."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        w = self.dense_weight(dtype)
        if self.conv1d:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(self.out_features, self.in_features)
            layer.weight.data = w.t().contiguous()          # Conv1D stores [in, out]
            if self.bias is not None:
                layer.bias.data = self.bias.data.clone()
            return layer.to(w.device)
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          dtype=dtype, device=w.device)
        layer.weight.data.copy_(w)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.data)
        return layer

    @property
    def bits_per_weight(self) -> float:
        return effective_bits(self.bits, self.group_size, self.in_features, self.sym)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, sym={self.sym}, "
                f"bias={self.bias is not None}, kernel={self.kernel_name()}")

    # ------------------------------------------------------------------ kernels

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}  # .to()/.cuda() invalidate prepared kernel weights
        return super()._apply(fn, *args, **kwargs)

    def kernel_name(self, device: torch.device | str | None = None) -> str:
        """Which kernel ``forward`` uses on ``device`` (default: where the weights are)."""
        dev = torch.device(device) if device is not None else self.qweight.device
        if _MODE["kernel"] == "dequant":
            return "dequant"
        g = self.in_features if self.group_size == -1 else self.group_size
        if dev.type == "cpu":
            if self.bits == 8 and self.sym and self.group_size == -1:
                return "int8pack"
            if self.bits == 4 and g in INT4_GROUPS and self.out_features % 16 == 0 \
                    and self.in_features % g == 0:
                return "int4pack"
        if dev.type == "cuda" and self.bits == 4 and g in INT4_GROUPS \
                and self.out_features % 8 == 0 and self.in_features % (g * 2) == 0 \
                and hasattr(torch, "_weight_int4pack_mm"):
            return "int4pack_cuda"
        return "dequant"

    def _prepared(self, kernel: str, dtype: torch.dtype):
        key = (kernel, dtype)
        if key in self._cache:
            return self._cache[key]
        with torch.no_grad():
            if kernel == "int8pack":
                w = (self.qweight.to(torch.int16) - 128).to(torch.int8)       # [out, in]
                prep = (w.contiguous(), self.scales[:, 0].to(torch.bfloat16).contiguous())
            elif kernel in ("int4pack", "int4pack_cuda"):
                g = self.in_features if self.group_size == -1 else self.group_size
                codes = self.codes()
                scale = self.scales.float()                                    # [out, G]
                zero_f = (8.0 - self.zero_points()) * scale                    # tinygemm form
                sz = torch.stack([scale, zero_f], dim=-1).transpose(0, 1)      # [G, out, 2]
                sz = sz.to(torch.bfloat16).contiguous()
                if kernel == "int4pack":
                    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                        codes.to(torch.int32).contiguous(), 2)
                else:
                    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()  # hi nibble first
                    w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
                prep = (w, sz, g)
            else:
                prep = (self.dequantize_weight(dtype),)
        self._cache[key] = prep
        return prep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in]`` -> ``[..., out]`` in ``x``'s dtype."""
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        key = (x.device.type, _MODE["kernel"])
        kernel = self._cache.get(key)
        if kernel is None:
            kernel = self._cache[key] = self.kernel_name(x.device)
        if x.requires_grad and torch.is_grad_enabled():
            # the packed kernels have no backward: dequantize on the fly, keep nothing dense
            return _DequantLinear.apply(x, self)
        shape = x.shape
        if kernel == "dequant":
            (w,) = self._prepared(kernel, x.dtype)
            return F.linear(x, w, self.bias)
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)                       # [M, in]
        if kernel == "int8pack":
            w, scales = self._prepared(kernel, x.dtype)
            y = torch._weight_int8pack_mm(x2, w, scales)
        elif kernel == "int4pack":
            w, sz, g = self._prepared(kernel, x.dtype)
            y = torch._weight_int4pack_mm_for_cpu(x2, w, g, sz)
        else:
            w, sz, g = self._prepared(kernel, x.dtype)
            y = torch._weight_int4pack_mm(x2, w, g, sz)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)               # [..., out]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class _DequantLinear(torch.autograd.Function):
    """``x @ Ŵᵀ + bias`` where ``Ŵ`` is rebuilt from the packed codes in forward *and* in
    backward instead of being cached or saved for backward.

    This is what gives QLoRA its memory edge: the frozen base contributes only its packed
    bytes plus one layer's dense weight at a time, not a dense copy of every layer. The
    gradient flows to ``x`` only (the codes are frozen).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        w = layer.dequantize_weight(x.dtype)                           # [out, in], temporary
        return F.linear(x, w, None if layer.bias is None else layer.bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.layer.dequantize_weight(grad_out.dtype)
        return grad_out @ w, None                                      # [..., in]
