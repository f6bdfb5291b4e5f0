"""Fused QKV and gate-up projections without extra memory.

At batch 1 a decode step is one matrix-vector product per linear; three small ones (q, k,
v) cost more than one of the same total size, and each call has fixed dispatch overhead.
Fusing concatenates the weights into one ``[Nq + Nk + Nv, hidden]`` matrix and makes the
original ``q_proj.weight`` etc. *views* into it, so the model keeps working (and saving)
exactly as before while using no extra memory. Weights loaded from safetensors are
memory-mapped from the file: the concatenation copies them, and the pages of the file that
held the originals are then handed back to the OS (:func:`release_file_pages`), so they are
not counted twice in the process's resident memory.

Only plain ``nn.Linear`` modules are fused. Anything else (``QuantLinear``, LoRA wrappers,
low-rank layers) is left alone and called as a module, so compressed models run unchanged.
Measured on the team machine (2 cores, loaded): 30 layers of SmolLM2-135M shape, batch 1,
fused 64-87 ms vs separate 68-92 ms per step, about 5% (``bench/decode.py`` for the whole
model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slmkit.models import memory


def _plain(*modules) -> bool:
    """All are exact ``nn.Linear`` with one dtype/device and all or none with bias."""
    if not all(type(m) is nn.Linear for m in modules):
        return False
    w0 = modules[0].weight
    same = all(m.weight.dtype == w0.dtype and m.weight.device == w0.device for m in modules)
    biases = {m.bias is None for m in modules}
    return same and len(biases) == 1


def _fuse_weights(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate weights (and biases) and re-point each module's tensors at its rows.

    Built outside inference mode (a runner made under ``torch.inference_mode()`` must not
    turn the model's weights into inference tensors, which could not be trained later)."""
    originals = [m.weight.data for m in modules]
    w0 = originals[0]
    with torch.inference_mode(False), torch.no_grad():
        if w0.device.type == "cpu":   # in 2 MB pages, which decode streams faster
            rows = sum(o.shape[0] for o in originals)
            out = memory.huge_page_empty(rows * w0.shape[1] * w0.element_size())
            weight = torch.cat(originals, out=out.view(w0.dtype).view(rows, w0.shape[1]))
        else:
            weight = torch.cat(originals)  # [sum(N_i), K]
        bias = torch.cat([m.bias.data for m in modules]) if modules[0].bias is not None \
            else None
        row = 0
        for m in modules:
            n = m.weight.shape[0]
            m.weight.data = weight[row:row + n]
            if bias is not None:
                m.bias.data = bias[row:row + n]
            row += n
    memory.release_file_pages(originals)
    return weight, bias


def fused_qkv(attn) -> Callable[[torch.Tensor], tuple] | None:
    """``x -> (q, k, v)`` through one matmul, or None when the projections are not plain.

    Args:
        attn: a Llama-family attention module with ``q_proj``, ``k_proj``, ``v_proj``.
    """
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    if not _plain(*mods):
        return None
    existing = getattr(attn, "_slmkit_qkv", None)
    if existing is None or existing[0].data_ptr() != mods[0].weight.data_ptr():
        existing = _fuse_weights(mods)
        attn._slmkit_qkv = existing
    weight, bias = existing
    nq, nk = mods[0].weight.shape[0], mods[1].weight.shape[0]

    def qkv(x: torch.Tensor):
        y = nn.functional.linear(x, weight, bias)       # [..., Nq + 2 Nk]
        return y[..., :nq], y[..., nq:nq + nk], y[..., nq + nk:]

    return qkv


def fused_mlp(mlp) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> down(act(gate(x)) * up(x))`` with gate and up in one matmul, or None."""
    if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    mods = [mlp.gate_proj, mlp.up_proj]
    if not _plain(*mods):
        return None
    existing = getattr(mlp, "_slmkit_gate_up", None)
    if existing is None or existing[0].data_ptr() != mods[0].weight.data_ptr():
        existing = _fuse_weights(mods)
        mlp._slmkit_gate_up = existing
    weight, bias = existing
    n = mods[0].weight.shape[0]
    act, down = mlp.act_fn, mlp.down_proj

    def run(x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, weight, bias)       # [..., 2 I]
        return down(act(y[..., :n]) * y[..., n:])

    return run
