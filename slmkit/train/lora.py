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

__all__ = ["DEFAULT_TARGETS", "apply_lora", "merge_lora", "trainable_fraction"]

#: Attention and MLP projections of Llama/Qwen2/Mistral/Phi-3 (qkv_proj, gate_up_proj) and
#: GPT-2 (c_attn, c_proj, c_fc); lm_head and embeddings are never adapted.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
                   "down_proj", "gate_up_proj", "c_attn", "c_proj", "c_fc"]


def _present_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The target names that match at least one module's last name component."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [t for t in targets if t in leaves or any(re.fullmatch(t, x) for x in leaves)]


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

    wanted = target_modules or DEFAULT_TARGETS
    present = _present_targets(model, wanted)
    if not present or (target_modules and len(present) < len(target_modules)):
        missing = [t for t in wanted if t not in present] if present else wanted
        raise ConfigError(f"--target-modules {','.join(missing)} match no module of this "
                          f"{model.config.model_type} model; use names such as "
                          f"{', '.join(_present_targets(model, DEFAULT_TARGETS)[:4])}.")
    fan_in_fan_out = model.config.model_type == "gpt2"       # GPT-2 Conv1D stores W^T
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
