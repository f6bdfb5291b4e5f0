"""``SplitExperts``: a mixture of experts' fused 3-D weights as one linear per expert.

transformers keeps the experts of a mixture (Mixtral, Qwen2/3-MoE) as two fused
parameters, ``gate_up_proj`` ``[experts, 2 * inter, hidden]`` and ``down_proj``
``[experts, hidden, inter]``, which no linear-wise compression can select. :func:`split`
swaps each such module for a :class:`SplitExperts` whose ``gate_up.<e>`` and ``down.<e>``
are plain ``nn.Linear`` views of the same storage, so quantization (RTN, GPTQ, AWQ) picks
them up by name like any other linear, each expert calibrated on the tokens routed to it.

A :class:`SplitExperts` computes what the fused module does, in the same order (experts in
ascending order, each adding its weighted output into the row), so a split model's logits
equal the fused one's. :func:`fuse` turns every split module whose linears all stayed
dense back into the original fused module, so a dense checkpoint keeps transformers'
layout; a module holding ``QuantLinear`` experts stays split and is saved as
``<prefix>.gate_up.<e>.*`` / ``<prefix>.down.<e>.*`` (the ``"quant"`` format rebuilds it).
"""

from __future__ import annotations

import re

import torch
from torch import nn

#: the linears of a split module: ``<experts>.gate_up.<e>`` / ``<experts>.down.<e>``
CHILD = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<stage>gate_up|down)\.(?P<e>\d+)$")


def is_fused(module: nn.Module) -> bool:
    """A transformers fused experts module this file can split (fp weights
    ``[experts, out, in]``, no bias, not transposed, an ``act_fn``)."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter)
            and gu.dim() == 3 and down.dim() == 3 and gu.shape[0] == down.shape[0]
            and gu.shape[1] == 2 * down.shape[2] and gu.shape[2] == down.shape[1]
            and not getattr(module, "is_transposed", False)
            and not getattr(module, "has_bias", False) and hasattr(module, "act_fn"))


def _dense(layer: nn.Module) -> torch.Tensor:
    return layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight.detach()


class SplitExperts(nn.Module):
    """One ``gate_up`` (``[2 * inter, hidden]``) and one ``down`` (``[hidden, inter]``)
    linear per expert, any of them an ``nn.Linear`` or a ``QuantLinear``; called like the
    fused module: ``forward(hidden [tokens, hidden], top_k_index, top_k_weights)``."""

    def __init__(self, shell: nn.Module, gate_up: list[nn.Module], down: list[nn.Module]):
        super().__init__()
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.act_fn = shell.act_fn
        self.num_experts = len(gate_up)
        # the fused module, weightless, kept to rebuild it (not a submodule: no state)
        object.__setattr__(self, "_shell", shell)

    @classmethod
    def from_fused(cls, experts: nn.Module) -> SplitExperts:
        """Views of ``experts``' weights (no copy); ``experts`` is left weightless."""
        gu, down = experts.gate_up_proj.data, experts.down_proj.data
        E, two_i, H = gu.shape
        lin_gu, lin_down = [], []
        for e in range(E):
            a = nn.Linear(H, two_i, bias=False, device="meta")
            a.weight = nn.Parameter(gu[e], requires_grad=experts.gate_up_proj.requires_grad)
            b = nn.Linear(two_i // 2, H, bias=False, device="meta")
            b.weight = nn.Parameter(down[e], requires_grad=experts.down_proj.requires_grad)
            lin_gu.append(a)
            lin_down.append(b)
        experts.gate_up_proj = nn.Parameter(gu.new_empty(0), requires_grad=False)
        experts.down_proj = nn.Parameter(down.new_empty(0), requires_grad=False)
        return cls(experts, lin_gu, lin_down)

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """The fused ``[experts, 2 * inter, hidden]`` weight (dequantized; a copy)."""
        return torch.stack([_dense(m) for m in self.gate_up])

    @property
    def down_proj(self) -> torch.Tensor:
        """The fused ``[experts, hidden, inter]`` weight (dequantized; a copy)."""
        return torch.stack([_dense(m) for m in self.down])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():     # ascending, as the fused loop
            token, pos = torch.where(top_k_index == e)
            gate, up = self.gate_up[e](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def fused(self) -> nn.Module:
        """The original fused module holding these (dense or dequantized) weights."""
        shell = self._shell
        shell.gate_up_proj = nn.Parameter(self.gate_up_proj, requires_grad=False)
        shell.down_proj = nn.Parameter(self.down_proj, requires_grad=False)
        return shell


def split(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by a :class:`SplitExperts` (in
    place); returns their names."""
    names = [n for n, m in model.named_modules() if n and is_fused(m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, SplitExperts.from_fused(getattr(owner, child)))
    return names


def fuse(model: nn.Module, dense_only: bool = True) -> list[str]:
    """Turn :class:`SplitExperts` modules back into the fused modules (in place): those
    whose linears are all plain ``nn.Linear`` (``dense_only``), or every one (their
    quantized experts dequantized). Returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, SplitExperts) and (
        not dense_only or all(type(c) is nn.Linear for c in [*m.gate_up, *m.down]))]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, getattr(owner, child).fused())
    return names


def split_prefixes(names) -> set[str]:
    """The split experts modules that tensor or module ``names`` belong to."""
    out = set()
    for n in names:
        m = CHILD.match(n.rsplit(".", 1)[0]) or CHILD.match(n)
        if m:
            out.add(m.group("prefix"))
    return out
