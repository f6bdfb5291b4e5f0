"""``LowRankLinear``: a linear layer stored as two thin factors, ``y = B(A(x))``.

A dense ``nn.Linear(in, out)`` holds ``in * out`` weights; ``LowRankLinear`` holds
``A: [r, in]`` and ``B: [out, r]`` (plus the original bias on ``B``), ``r * (in + out)``
weights, and costs the same fraction of multiply-adds. It keeps the call signature of
the layer it replaces and can be merged back to a dense ``nn.Linear`` for export.

On disk (format ``"lowrank"`` in ``slmkit.models.formats``) a factored model is a normal
HF directory whose ``config.json`` carries ``"slmkit": {"format": "lowrank", "ranks":
{module_name: r}}`` and whose safetensors hold ``<name>.A.weight`` / ``<name>.B.weight``
/ ``<name>.B.bias`` instead of ``<name>.weight``. :func:`load_lowrank` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slmkit.errors import ModelLoadError
from slmkit.nn.surgery import set_module

FORMAT = "lowrank"


class LowRankLinear(nn.Module):
    """``x [..., in] -> B(A(x)) [..., out]`` with ``A: in -> r`` and ``B: r -> out``.

    Args:
        in_features: input width.
        out_features: output width.
        rank: inner width ``r``.
        bias: whether ``B`` has a bias (the replaced layer's bias).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor,
                     bias: torch.Tensor | None = None) -> LowRankLinear:
        """Build from ``a: [r, in]``, ``b: [out, r]`` and an optional ``bias: [out]``."""
        rank, in_f = a.shape
        layer = cls(in_f, b.shape[0], rank, bias=bias is not None, dtype=a.dtype,
                    device=a.device)
        with torch.no_grad():
            layer.A.weight.copy_(a)
            layer.B.weight.copy_(b)
            if bias is not None:
                layer.B.bias.copy_(bias)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight ``B @ A`` (computed, not stored)."""
        return self.B.weight @ self.A.weight  # [out, r] @ [r, in]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))  # [..., in] -> [..., r] -> [..., out]

    def to_linear(self) -> nn.Linear:
        """Merge into a dense ``nn.Linear`` with weight ``B @ A``."""
        w = self.weight.detach()
        dense = nn.Linear(self.in_features, self.out_features, bias=self.B.bias is not None,
                          dtype=w.dtype, device=w.device)
        with torch.no_grad():
            dense.weight.copy_(w)
            if self.B.bias is not None:
                dense.bias.copy_(self.B.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """``{name: module}`` of every ``LowRankLinear`` in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def merge_lowrank(model: nn.Module) -> int:
    """Replace every ``LowRankLinear`` with its dense merge, in place; drop the format tag.

    Returns:
        How many layers were merged.
    """
    found = lowrank_modules(model)
    for name, module in found.items():
        set_module(model, name, module.to_linear())
    config = getattr(model, "config", None)
    section = getattr(config, "slmkit", None)
    if isinstance(section, dict) and section.get("format") == FORMAT:
        delattr(config, "slmkit")
    return len(found)


def load_lowrank(model_dir: Path, config, dtype: torch.dtype, device: str) -> nn.Module:
    """Format loader for ``"lowrank"``: build the skeleton, swap in factors, load weights."""
    from slmkit.models.formats import load_dense_part, read_weights

    ranks = (config.slmkit or {}).get("ranks") or {}
    model = load_dense_part(model_dir, config, dtype, "slm factorize")
    model.config.slmkit = config.slmkit
    state = read_weights(model_dir)
    for name, rank in ranks.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"'{model_dir}' lists low-rank layer '{name}', which its "
                                 "architecture does not have; re-create the model with "
                                 "`slm factorize`.") from None
        layer = LowRankLinear(dense.in_features, dense.out_features, int(rank),
                              bias=dense.bias is not None, dtype=dtype)
        own = {k: state.get(f"{name}.{k}") for k in layer.state_dict()}
        missing = [k for k, v in own.items() if v is None]
        if missing:
            raise ModelLoadError(f"'{model_dir}' has low-rank weights that do not match its "
                                 f"config.json (e.g. '{name}.{missing[0]}' is missing); "
                                 "re-create it with `slm factorize`.")
        layer.load_state_dict({k: v.to(dtype) for k, v in own.items()})
        set_module(model, name, layer)
    return model.to(device).eval()
