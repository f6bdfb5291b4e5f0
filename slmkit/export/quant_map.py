"""Map slmkit's calibrated ``QuantLinear`` weights onto GGML blocks without re-rounding.

A ``QuantLinear`` (RTN, GPTQ or AWQ output, see :mod:`slmkit.nn.quant_linear`) stores codes
``q`` (uint8), fp16 ``scale`` and, for asymmetric grids, uint8 ``zero`` per group of input
columns, and computes ``Ŵ = (q - zero) · scale``. When the group is 32 columns -- GGML's
block -- the same numbers fit a GGML block directly, so GPTQ/AWQ's calibration carries into
llama.cpp (llama.cpp issue #10965 asks for this):

=============================  ========  ===========================================  =======
slmkit layer                   GGML      conversion                                   exact?
=============================  ========  ===========================================  =======
4 bit, symmetric, g32          Q4_0      ``d = scale``, nibble = ``q`` (zero fixed 8)  yes
4 bit, asymmetric, g32         Q4_1      ``d = scale``, ``m = -zero · scale``,         m in fp16
                                         nibble = ``q``
8 bit, symmetric, g32          Q8_0      ``d = scale``, int8 = ``q - 128``             yes
=============================  ========  ===========================================  =======

Q4_1 computes ``d · q + m``; with ``m = -zero · scale`` that is ``(q - zero) · scale``. Only
the product ``m`` is new and is rounded to fp16 (relative error ≤ 2⁻¹¹ of ``m``). Q8_0 codes
of -128 are allowed by GGML's int8 arithmetic, so the symmetric 8-bit grid maps exactly.

A larger group (64, 128, or per channel) is a run of 32-column blocks that share one scale
(and zero point): each block gets a copy, so g64 and g128 grids map exactly too, at the
same size as g32 in the file. Anything else (a group that is not a multiple of 32, rows
that are not, 3 bit, asymmetric 8 bit) is refused with a message saying what to do. A layer that keeps AWQ's ``input_scale`` (it could not
be folded into the previous op) has no block form; its equivalent dense weight is rounded
with the matching GGML quantizer instead and reported as re-quantized.
"""

from __future__ import annotations

import numpy as np
import torch

from slmkit.errors import ConfigError
from slmkit.export import ggml_blocks

QK = ggml_blocks.QK


def ggml_type_for(bits: int, group_size: int, sym: bool, model_ref: str = "the model") -> str:
    """The GGML block type that holds a ``bits``/``group_size``/``sym`` grid exactly
    (groups of 32, a multiple of 32, or per channel: see the module doc)."""
    blocks = group_size == -1 or group_size % QK == 0
    if blocks and bits == 4:
        return "q4_0" if sym else "q4_1"
    if blocks and bits == 8 and sym:
        return "q8_0"
    scheme = (f"{bits}-bit {'symmetric' if sym else 'asymmetric'}, "
              f"{'per-channel' if group_size == -1 else f'group size {group_size}'}")
    hint = ("re-quantize with --group-size 32, 64 or 128" if bits in (4, 8) and
            (sym or bits == 4) else "re-quantize with --bits 4")
    if bits == 8 and not sym:
        hint = "re-quantize with --sym --group-size 32 (Q8_0 has no zero point)"
    raise ConfigError(f"'{model_ref}' is quantized as {scheme}, which no GGUF block format "
                      f"holds exactly (Q4_0/Q4_1/Q8_0 blocks are 32 columns); {hint}, or export "
                      "its dense parent with --quant.")


def encode_quant_linear(layer, model_ref: str = "the model") -> tuple[np.ndarray, str, bool]:
    """Pack one ``QuantLinear`` as GGML blocks.

    Args:
        layer: a ``QuantLinear`` with ``codes()`` ``[out, in]``, ``scales`` ``[out, in/32]``
            and ``zero_points()`` ``[out, in/32]``.

    Returns:
        ``(blocks uint8 [out, in/32 * bytes], ggml type, exact)``; ``exact`` is False when
        the layer had an unfoldable AWQ ``input_scale`` and was re-rounded from its dense
        weight.
    """
    qtype = ggml_type_for(layer.bits, layer.group_size, layer.sym, model_ref)
    if layer.in_features % QK:
        raise ConfigError(f"'{model_ref}' has a layer with {layer.in_features} inputs, not a "
                          "multiple of 32, so its groups cannot be GGML blocks; export the "
                          "dense parent instead.")
    if getattr(layer, "input_scale", None) is not None:
        return ggml_blocks.QUANTIZERS[qtype](layer.dense_weight(torch.float32)), qtype, False
    codes = layer.codes()                       # [out, in] uint8
    reps = (layer.in_features if layer.group_size == -1 else layer.group_size) // QK

    def blocks(t: torch.Tensor) -> torch.Tensor:  # [out, groups] -> [out, in/32]
        return t.repeat_interleave(reps, dim=1) if reps > 1 else t

    scale = blocks(layer.scales.to(torch.float32))  # fp16 values, exact in fp32
    if qtype == "q4_0":
        return ggml_blocks.pack_q4_0(codes, scale), qtype, True
    if qtype == "q8_0":
        q = codes.to(torch.int16) - 128         # uint8 around 128 -> int8 around 0
        return ggml_blocks.pack_q8_0(q, scale), qtype, True
    zero = blocks(layer.zero_points().to(torch.float32))
    return ggml_blocks.pack_q4_1(codes, scale, -zero * scale), qtype, True
