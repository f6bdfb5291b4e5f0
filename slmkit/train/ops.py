"""Pure functions of the training loop: loss, learning-rate schedule, parameter groups, FLOPs.

No state here; :mod:`slmkit.train.loop` owns the state (optimizer, step counters, hooks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions.

    Args:
        logits: ``[B, T, V]`` scores for the token *at* each position (labels are already
            aligned: ``labels[:, t]`` is the target for ``logits[:, t]``).
        labels: ``[B, T]`` target ids; :data:`IGNORE_INDEX` positions are not counted
            (prompt tokens in SFT, padding).

    Returns:
        Scalar fp32 loss in nats per token.
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, vocab),   # [B*T, V]
                           labels.reshape(-1), ignore_index=IGNORE_INDEX)


def lr_at(step: int, peak_lr: float, warmup_steps: int, progress: float,
          min_lr_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * peak_lr``.

    Args:
        step: optimizer steps already taken (0 for the first step).
        peak_lr: learning rate at the end of warmup.
        warmup_steps: steps of linear warmup (lr ``peak * (step + 1) / warmup``).
        progress: share of the training budget spent at ``step``, in ``[0, 1]``; drives the
            cosine (Loshchilov & Hutter 2017, SGDR, without restarts).
        min_lr_ratio: final learning rate as a share of the peak.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    floor = peak_lr * min_lr_ratio
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * p))


def cosine_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """Share of the post-warmup schedule done after ``step`` of ``total_steps`` steps."""
    span = max(total_steps - warmup_steps, 1)
    return (step - warmup_steps) / span


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (ndim >= 2), none on norms, biases and scalars.

    Decoupled weight decay (Loshchilov & Hutter 2019, AdamW) shrinks weights toward zero;
    applying it to norm gains or biases only hurts, so those go to a no-decay group. Tied
    parameters appear once.
    """
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: every ``nn.Linear`` (incl. lm_head).

    The input embedding is a lookup, not a matmul; with tied embeddings its weight is
    counted once through ``lm_head``.
    """
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def train_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N`` for the matmuls plus causal attention scores.

    Forward is ``2 N`` (one multiply-add per weight), backward twice that (Kaplan et al.
    2020, "Scaling laws", sec. 2.1). Attention adds ``2 * 2 * T * d`` per layer forward
    for ``QK^T`` and ``AV``, halved by the causal mask; times 3 for training.
    """
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    attention = 3 * 2 * layers * hidden * seq_len
    return 6.0 * matmul_params(model) + attention


_PEAK_CACHE: dict[str, float] = {}


def measured_peak_flops(dtype: torch.dtype, device: str = "cpu", size: int = 1024) -> float:
    """Dense matmul FLOP/s this machine reaches right now in ``dtype`` (the MFU denominator).

    A CPU has no single published peak, so model-FLOPs utilisation is reported against a
    measured square matmul at the same precision and thread count. Memoised per dtype.
    """
    import time

    key = f"{device}:{dtype}:{torch.get_num_threads()}"
    if key not in _PEAK_CACHE:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < 0.2:
            torch.mm(a, b)
            reps += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        _PEAK_CACHE[key] = 2.0 * size ** 3 * reps / (time.perf_counter() - t0)
    return _PEAK_CACHE[key]
