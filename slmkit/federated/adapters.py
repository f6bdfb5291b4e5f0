"""The adapter every party of a federation builds the same way, and what travels of it.

Server and clients call :func:`build_adapted` with the run's config, so they hold the same
LoRA (or QLoRA) layers with the same initial ``A`` (seeded) and ``B = 0``; only the
adapter's factors travel, as a flat ``{"<module>::A": [r, in], "<module>::B": [out, r]}``
dict of arrays. The LoRA layers are train/lora.py's: peft's ``LoraLayer`` for ``lora`` and
:class:`~slmkit.train.lora.QLoRALinear` for ``qlora``.

The exact aggregation's residual (see :mod:`slmkit.federated.aggregate`) is applied by
:func:`attach_residual` as a frozen low-rank branch on each adapted layer's base:
``y = base(x) + (x Vᵀ) Uᵀ + LoRA(x)``.
"""

from __future__ import annotations

from typing import Any

import torch

from slmkit.federated.config import FederateConfig

__all__ = ["build_adapted", "lora_layers", "get_factors", "set_factors", "attach_residual",
           "factor_bytes", "merge_dense", "stacked_adapter"]

_PEFT_PREFIX = "base_model.model."

#: Models loaded ahead of time by a warm process (slmkit.federated.warm), by reference.
_PRELOADED: dict[str, tuple] = {}


def preload(ref: str) -> None:
    """Load ``ref`` now; the next :func:`build_adapted` of it (in a forked child) takes it."""
    from slmkit.models import load_model

    _PRELOADED[str(ref)] = load_model(ref, dtype="fp32")


def build_adapted(cfg: FederateConfig, model_ref: str | None = None):
    """Load the base (fp32), quantize it for QLoRA, wrap the targets with LoRA, seeded.

    Returns:
        ``(model, tokenizer)``; only the adapters require grad.
    """
    from slmkit.models import load_model
    from slmkit.models.io import resolve_ref
    from slmkit.train.finetune import _quantize_base
    from slmkit.train.lora import apply_lora, apply_qlora

    ref = model_ref or cfg.model
    model, tok = _PRELOADED.pop(str(ref), None) or load_model(ref, dtype="fp32")
    torch.manual_seed(cfg.seed)
    if cfg.method == "lora":
        model = apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
        model.peft_config["default"].base_model_name_or_path = str(resolve_ref(ref))
    else:
        _quantize_base(model, tok)
        apply_qlora(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
    return model, tok


def _key(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX)


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{module path: layer}`` of every adapted layer (peft LoraLayer or QLoRALinear)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            out[_key(name)] = mod
    return out


def _ab(mod: torch.nn.Module) -> tuple[torch.nn.Parameter, torch.nn.Parameter, float]:
    """The layer's ``A [r, in]``, ``B [out, r]`` weights and its scaling ``alpha / r``."""
    if isinstance(mod.lora_A, torch.nn.ModuleDict):           # peft
        return (mod.lora_A["default"].weight, mod.lora_B["default"].weight,
                float(mod.scaling["default"]))
    return mod.lora_A.weight, mod.lora_B.weight, float(mod.scaling)


def get_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as ``{"<module>::A": A, "<module>::B": B}`` (fp32 copies, CPU)."""
    out = {}
    for key, mod in lora_layers(model).items():
        A, B, _ = _ab(mod)
        out[f"{key}::A"] = A.detach().float().cpu().clone()
        out[f"{key}::B"] = B.detach().float().cpu().clone()
    return out


def set_factors(model: torch.nn.Module, factors: dict[str, Any]) -> None:
    """Load ``factors`` (tensors or arrays) into the adapter; every key must match."""
    layers = lora_layers(model)
    want = {f"{k}::{m}" for k in layers for m in "AB"}
    if set(factors) != want:
        missing, extra = sorted(want - set(factors))[:3], sorted(set(factors) - want)[:3]
        raise ValueError(f"adapter keys differ from this model's (missing {missing}, "
                         f"unexpected {extra}): the parties built different adapters")
    with torch.no_grad():
        for key, mod in layers.items():
            A, B, _ = _ab(mod)
            A.copy_(torch.as_tensor(factors[f"{key}::A"]))
            B.copy_(torch.as_tensor(factors[f"{key}::B"]))


def scalings(model: torch.nn.Module) -> dict[str, float]:
    return {key: _ab(mod)[2] for key, mod in lora_layers(model).items()}


def factor_bytes(factors: dict[str, Any]) -> int:
    """Bytes of the arrays' data (what one adapter upload carries besides framing)."""
    return int(sum(torch.as_tensor(v).numel() * torch.as_tensor(v).element_size()
                   for v in factors.values()))


class _Residual:
    """Forward hook adding the frozen low-rank branch ``(x Vᵀ) Uᵀ`` to a base layer."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor):
        self.U, self.V = U, V                     # [out, m], [m, in]

    def __call__(self, module, inputs, output):
        x = inputs[0]
        return output + ((x.to(self.V.dtype) @ self.V.T) @ self.U.T).to(output.dtype)


def attach_residual(model: torch.nn.Module, residual: dict[str, tuple[torch.Tensor, torch.Tensor]]
                    ) -> list:
    """Add each ``(U, V)`` as a frozen branch on its layer's base; returns the hook handles."""
    layers = lora_layers(model)
    unknown = sorted(set(residual) - set(layers))
    if unknown:
        raise ValueError(f"residual for layers this model does not adapt: {unknown[:3]}")
    return [layers[k].base_layer.register_forward_hook(_Residual(U.float(), V.float()))
            for k, (U, V) in residual.items() if U.shape[1]]


def merge_dense(model: torch.nn.Module, cfg: FederateConfig,
                residual: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """The dense model ``W + s B A (+ U V)``: merged adapters (dequantized base for QLoRA),
    residual added into the weights, hooks gone. Consumes ``model``."""
    from slmkit.nn.surgery import is_conv1d
    from slmkit.train.lora import merge_lora, merge_qlora

    residual = residual or {}
    layers = lora_layers(model)
    deltas = {k: U @ V for k, (U, V) in residual.items() if U.shape[1]}   # [out, in]
    for k, mod in layers.items():
        mod.base_layer._forward_hooks.clear()
    paths = {k: k for k in layers}
    merged = merge_lora(model) if cfg.method == "lora" else merge_qlora(model)
    if cfg.method == "qlora":
        for attr in ("slmkit", "quantization_config"):
            if hasattr(merged.config, attr):
                delattr(merged.config, attr)
    with torch.no_grad():
        for k, delta in deltas.items():
            layer = merged.get_submodule(paths[k])
            layer.weight.add_(delta.T if is_conv1d(layer) else delta)
    return merged


def stacked_adapter(factors: dict[str, torch.Tensor], scales: dict[str, float],
                    residual: dict[str, tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """One adapter of rank ``R`` (scale 1) equal to ``s B A + U V`` in every layer:
    ``B' = [s B | U | 0]``, ``A' = [A; V; 0]``, zero-padded to the largest rank ``R``."""
    pairs = {}
    for key in scales:
        A, B = factors[f"{key}::A"], factors[f"{key}::B"]
        U, V = residual.get(key, (B[:, :0], A[:0]))
        pairs[key] = (torch.cat([scales[key] * B, U], 1), torch.cat([A, V], 0))
    R = max(Bp.shape[1] for Bp, _ in pairs.values())
    out = {}
    for key, (Bp, Ap) in pairs.items():
        pad = R - Bp.shape[1]
        out[key] = (torch.cat([Bp, Bp.new_zeros(Bp.shape[0], pad)], 1),
                    torch.cat([Ap, Ap.new_zeros(pad, Ap.shape[1])], 0))
    return out, R
