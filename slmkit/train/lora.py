"""LoRA through peft: wrap a causal LM's linears with low-rank adapters, save or merge them.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes the
base weight ``W [out, in]`` and learns ``ΔW = (alpha / r) · B A`` with ``A [r, in]``,
``B [out, r]`` (``B`` starts at zero, so training starts from the base model). We use peft's
``LoraConfig``/``get_peft_model`` so the adapter dir is the format the ecosystem loads
(``peft.PeftModel.from_pretrained``), and ``merge_and_unload`` for a dense model.
"""

from __future__ import annotations

import re

import torch

from slmkit.errors import ConfigError
from slmkit.models.arch import arch_of

__all__ = ["DEFAULT_TARGETS", "apply_lora", "merge_lora", "trainable_fraction", "QLoRALinear",
           "apply_qlora", "merge_qlora"]

#: Attention and MLP projections of Llama/Qwen2/3/Mistral/Gemma/Granite, Phi-3 (qkv_proj,
#: gate_up_proj), GPT-2 (c_attn, c_proj, c_fc) and GPT-NeoX (query_key_value, dense,
#: dense_h_to_4h, dense_4h_to_h); lm_head and embeddings are never adapted.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
                   "down_proj", "gate_up_proj", "c_attn", "c_proj", "c_fc", "query_key_value",
                   "dense", "dense_h_to_4h", "dense_4h_to_h"]


def _compile_targets(targets: list[str]) -> list[re.Pattern]:
    """Compile target names/regexes; an invalid regex is a ConfigError naming it."""
    from slmkit.compress.match import compile_patterns

    return compile_patterns(targets, "--target-modules")


def _adaptable(mod: torch.nn.Module) -> bool:
    """A projection LoRA can wrap: nn.Linear, GPT-2's Conv1D or our QuantLinear."""
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Conv1D", "QuantLinear")


def _leaf_matches(model: torch.nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """For each target (a name or a regex over last name components), the leaves it matches."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                     if _adaptable(mod) and name.rsplit(".", 1)[-1] != "lm_head"})
    return {t: [x for x in leaves if x == t or pat.fullmatch(x)]
            for t, pat in zip(targets, _compile_targets(targets))}


def _present_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The target names that match at least one module's last name component."""
    return [t for t, hits in _leaf_matches(model, targets).items() if hits]


def _check_targets(model: torch.nn.Module, target_modules: list[str] | None) -> list[str]:
    """The concrete leaf names to adapt (regexes expanded: peft matches list entries literally).

    Raises:
        ConfigError: an invalid regex, or a requested target that matches no module.
    """
    wanted = target_modules or DEFAULT_TARGETS
    matches = _leaf_matches(model, wanted)
    missing = [t for t, hits in matches.items() if not hits]
    if (target_modules and missing) or len(missing) == len(wanted):
        raise ConfigError(f"--target-modules {','.join(missing)} match no module of this "
                          f"{model.config.model_type} model; use names such as "
                          f"{', '.join(_present_targets(model, DEFAULT_TARGETS)[:4])}.")
    return sorted({x for hits in matches.values() for x in hits})


def apply_lora(model: torch.nn.Module, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, target_modules: list[str] | None = None):
    """Wrap ``model`` with peft LoRA adapters; only the adapters require grad.

    Args:
        model: a transformers causal LM.
        rank: LoRA rank ``r``.
        alpha: scaling numerator (``ΔW = alpha / r · B A``).
        dropout: dropout on the adapter input.
        target_modules: module names (last component) to adapt; None: every attention and
            MLP projection the model has (:data:`DEFAULT_TARGETS`).

    Returns:
        The ``peft.PeftModel``.

    Raises:
        ConfigError: no module of the model matches the targets.
    """
    from peft import LoraConfig, get_peft_model

    present = _check_targets(model, target_modules)
    fan_in_fan_out = arch_of(model.config.model_type).conv1d   # GPT-2 Conv1D stores W^T
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=present,
                        bias="none", task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)
    lineage = getattr(model, "slmkit_lineage", None)
    peft_model = get_peft_model(model, config)
    if lineage is not None:
        peft_model.slmkit_lineage = lineage
    return peft_model


def merge_lora(peft_model) -> torch.nn.Module:
    """Fold the adapters into the base weights (``W + alpha/r · B A``) and drop the wrappers."""
    lineage = getattr(peft_model, "slmkit_lineage", None)
    merged = peft_model.merge_and_unload()
    if lineage is not None:
        merged.slmkit_lineage = lineage
    return merged


def trainable_fraction(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied parameters counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# --------------------------------------------------------------------------- QLoRA


class QLoRALinear(torch.nn.Module):
    """LoRA over a frozen, packed :class:`~slmkit.nn.quant_linear.QuantLinear` (QLoRA).

    QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") trains
    adapters on top of a 4-bit base. This is our small CPU wrapper (no bitsandbytes):
    ``y = base(x) + alpha/r · B(A(dropout(x)))`` with ``A [r, in]``, ``B [out, r]``, ``B = 0``
    at init. The base keeps its packed buffers (``qweight``/``scales``) and gets no grads;
    its dequantizing forward passes gradients through to ``x`` only.

    Args:
        base_layer: the QuantLinear to adapt.
        rank, alpha, dropout: LoRA hyper-parameters.
    """

    def __init__(self, base_layer: torch.nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = torch.nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base_layer.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        torch.nn.init.zeros_(self.lora_B.weight)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in]`` -> ``[..., out]``."""
        update = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling   # [..., out]
        return self.base_layer(x) + update.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        """Dense ``[out, in]`` fp32: dequantized base plus ``alpha/r · B A``."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()     # [out, in]
        return self.base_layer.dense_weight(torch.float32) + self.scaling * delta


def apply_qlora(model: torch.nn.Module, rank: int = 8, alpha: float = 16.0,
                dropout: float = 0.0, target_modules: list[str] | None = None) -> torch.nn.Module:
    """Freeze a model whose linears are QuantLinear and wrap the targets in QLoRALinear.

    Returns:
        ``model`` (changed in place); only ``lora_A``/``lora_B`` weights require grad.

    Raises:
        ConfigError: no QuantLinear of the model matches the targets.
    """
    from slmkit.nn.quant_linear import QuantLinear

    leaves = set(_check_targets(model, target_modules))
    model.requires_grad_(False)
    hits = [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, QuantLinear) and name.rsplit(".", 1)[-1] in leaves]
    if not hits:
        raise ConfigError("QLoRA needs a quantized base whose projections are QuantLinear; "
                          "quantize it first (`slm quantize --bits 4`) or check "
                          "--target-modules.")
    for name, mod in hits:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, QLoRALinear(mod, rank, alpha, dropout))
    return model


def merge_qlora(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every QLoRALinear by a dense ``nn.Linear`` (dequantized base + update), and
    every other ``QuantLinear`` of the base (layers outside ``--target-modules``) by its
    dequantized ``nn.Linear``, so the whole model is dense."""
    from slmkit.nn.quant_linear import QuantLinear

    hits = [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    for name, mod in hits:
        dense = mod.base_layer.to_dense()                  # nn.Linear, or GPT-2 Conv1D
        delta = mod.scaling * (mod.lora_B.weight.float() @ mod.lora_A.weight.float())
        with torch.no_grad():                                # Conv1D stores [in, out]
            dense.weight.add_(delta.T if mod.base_layer.conv1d else delta)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, dense)
    for name, mod in [(n, m) for n, m in model.named_modules() if type(m) is QuantLinear]:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, mod.to_dense())
    return model
