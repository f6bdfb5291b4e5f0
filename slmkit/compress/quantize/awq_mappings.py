"""Per-architecture AWQ mapping: which op produces the input of which linears.

AWQ divides a linear group's input by a per-channel scale ``s``; that division is folded
into the op that *produces* the input, so it costs nothing at inference:

* an RMSNorm: ``norm.weight /= s`` (all linears reading the norm must be scaled together;
  Gemma's ``x_hat * (1 + w)`` norms: ``1 + w`` is divided; a LayerNorm: weight and bias);
* a linear: its output rows ``W_prev[j, :] /= s_j`` (and bias), e.g. ``v_proj -> o_proj``
  (only when the shapes line up: no grouped-query attention) and ``up_proj -> down_proj``
  (``down(act(gate) * up)``: scaling ``up``'s rows scales ``down``'s input).

Each entry is ``(producer, consumers)`` with names relative to one decoder block; the
entries of each architecture are the ``awq`` column of :data:`slmkit.models.arch.ARCHS`.
Architectures without entries (and linears not covered by an entry) fall back to keeping
``1/s`` inside :class:`~slmkit.nn.quant_linear.QuantLinear` (``input_scale``).
"""

from __future__ import annotations

import torch
from torch import nn

from slmkit.models.arch import NORM_OFFSETS, arch_of


def block_mappings(model_type: str, block: nn.Module, block_name: str,
                   linears: dict[str, nn.Module]) -> list[tuple[nn.Module, list[str]]]:
    """The foldable entries of one block: ``(producer_module, [full consumer names])``.

    An entry is kept only if every consumer is selected for quantization and the producer's
    output width equals the consumers' input width.
    """
    out = []
    for producer, consumers in arch_of(model_type).awq:
        try:
            prev = block.get_submodule(producer)
        except AttributeError:
            continue
        names = [f"{block_name}.{c}" for c in consumers]
        if not all(n in linears for n in names):
            continue
        width = _output_width(prev)
        if width is None or any(linears[n].in_features != width for n in names):
            continue
        out.append((prev, names))
    return out


def _output_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return module.weight.shape[0]       # y = w * normalize(x) + b: both scale by 1/s
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and \
            getattr(module, "bias", None) is None:  # RMSNorm-like: y = w * normalize(x)
        return weight.shape[0]
    return None


@torch.no_grad()
def fold_scale(producer: nn.Module, consumers: list[nn.Module], scale: torch.Tensor) -> None:
    """Divide ``producer``'s output by ``scale`` and multiply the consumers' input columns.

    The block computes exactly the same function afterwards (up to float rounding).

    Args:
        producer: an RMSNorm-like module or an ``nn.Linear``.
        consumers: ``nn.Linear`` modules reading the producer's output.
        scale: ``[width]``.
    """
    s = scale.to(producer.weight.dtype)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s[:, None])                    # rows = output channels
        if producer.bias is not None:
            producer.bias.div_(s)
    else:
        # Gemma's RMSNorm multiplies by (1 + w): the factor to divide is 1 + w, not w
        offset = NORM_OFFSETS.get(type(producer).__name__, 0.0)
        if offset:
            producer.weight.copy_((producer.weight + offset) / s - offset)
        else:
            producer.weight.div_(s)
        if getattr(producer, "bias", None) is not None:   # a LayerNorm (GPT-NeoX)
            producer.bias.div_(s)
    for lin in consumers:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))    # columns = input channels
