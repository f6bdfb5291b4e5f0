"""Pure tensor math of knowledge distillation: divergences, top-K targets, chunked loss.

No state here; :mod:`slmkit.train.distill` owns the teacher, the cache and the batches.

Three token-level divergences between the teacher distribution ``p`` and the student
distribution ``q`` (both at temperature ``tau``):

* ``fkl``, forward KL ``KL(p || q)``, mean-seeking (Hinton et al. 2015, "Distilling the
  knowledge in a neural network"), scaled by ``tau**2`` so gradients keep their size;
* ``rkl``, reverse KL ``KL(q || p)``, mode-seeking (Gu et al. 2024, "MiniLLM");
* ``jsd``, generalised Jensen-Shannon ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
  ``m = beta p + (1 - beta) q`` (Agarwal et al. 2024, "On-policy distillation of language
  models", GKD).

Top-K targets: the teacher keeps its ``K`` most likely tokens per position (log-probs, fp16)
plus an implicit "everything else" bucket. Both distributions are then compared on those
``K + 1`` buckets, which is exact when ``K`` covers the vocabulary and a lower bound of the
full divergence otherwise (data processing inequality), zero iff they agree on the buckets.

Chunking: :func:`chunked_kd_loss` projects the student's final hidden states to the
vocabulary a few hundred rows at a time under activation checkpointing, so the ``[N, V]``
logits, log-probs and their gradients never exist for more than one chunk.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
KD_LOSSES = ("fkl", "rkl", "jsd")
#: Floor for log-probabilities (e^-69 ~ 1e-30): keeps ``0 * log 0`` terms finite.
MIN_LOG_PROB = math.log(1e-30)

#: A teacher target for ``N`` rows: ``("dense", logits [N, V])`` or
#: ``("topk", log_probs [N, K], token_ids [N, K])``.
Target = tuple


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row from normalised log-probabilities ``[N, M]`` -> ``[N]``."""
    log_p = log_p.clamp_min(MIN_LOG_PROB)
    log_q = log_q.clamp_min(MIN_LOG_PROB)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence(teacher_lp: torch.Tensor, student_lp: torch.Tensor, kind: str,
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher and student distributions.

    Args:
        teacher_lp: ``[N, M]`` teacher log-probabilities (rows sum to 1 in prob space).
        student_lp: ``[N, M]`` student log-probabilities over the same ``M`` outcomes.
        kind: ``"fkl"``, ``"rkl"`` or ``"jsd"`` (see the module docstring).
        beta: JSD mixture weight on the teacher, in ``(0, 1)``.

    Returns:
        ``[N]`` non-negative divergences in nats (0 where the rows are equal).
    """
    if kind == "fkl":
        return kl_rows(teacher_lp, student_lp)
    if kind == "rkl":
        return kl_rows(student_lp, teacher_lp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        mix = torch.logsumexp(torch.stack([teacher_lp + math.log(beta),           # [2, N, M]
                                           student_lp + math.log1p(-beta)]), dim=0)
        return beta * kl_rows(teacher_lp, mix) + (1 - beta) * kl_rows(student_lp, mix)
    raise ValueError(f"unknown KD loss {kind!r}; use one of {KD_LOSSES}")


def with_rest_bucket(topk_lp: torch.Tensor) -> torch.Tensor:
    """Append ``log(1 - sum_k p_k)``, the mass outside the top-K: ``[N, K]`` -> ``[N, K+1]``."""
    covered = torch.logsumexp(topk_lp.float(), dim=-1, keepdim=True)             # [N, 1]
    rest = torch.log((-torch.expm1(covered)).clamp_min(1e-30))
    return torch.cat([topk_lp.float(), rest], dim=-1)


def teacher_topk(teacher_logits: torch.Tensor, k: int,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` most likely tokens at ``temperature``, as stored in the cache.

    Args:
        teacher_logits: ``[N, V]`` raw logits.
        k: tokens kept per row (clipped to ``V``).

    Returns:
        ``(log_probs [N, K] fp16, token_ids [N, K] int32)``; log-probs are normalised over
        the full vocabulary, then rounded to fp16 (the on-disk precision) so a live teacher
        and the cache give bit-identical targets.
    """
    lp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return vals.to(torch.float16), ids.to(torch.int32)


def token_kd(student_logits: torch.Tensor, target: Target, kind: str, temperature: float,
             beta: float) -> torch.Tensor:
    """Per-token distillation loss for one chunk of rows.

    Args:
        student_logits: ``[N, V]`` raw student logits over the shared vocabulary.
        target: ``("dense", teacher_logits [N, V])`` or ``("topk", log_probs [N, K],
            token_ids [N, K])`` from :func:`teacher_topk`.
        kind, beta: see :func:`divergence`.
        temperature: softens both distributions; the loss is scaled by ``temperature**2``.

    Returns:
        ``[N]`` losses in nats.
    """
    s_lp = F.log_softmax(student_logits.float() / temperature, dim=-1)            # [N, V]
    if target[0] == "dense":
        t_lp = F.log_softmax(target[1].float() / temperature, dim=-1)             # [N, V]
    elif target[0] == "topk":
        t_lp = with_rest_bucket(target[1])                                        # [N, K+1]
        s_lp = with_rest_bucket(s_lp.gather(-1, target[2].long()))                # [N, K+1]
    else:
        raise ValueError(f"unknown target kind {target[0]!r}")
    return divergence(t_lp, s_lp, kind, beta) * temperature ** 2


def _chunk_losses(hidden: torch.Tensor, labels: torch.Tensor, kd_mask: torch.Tensor,
                  head: Callable[[torch.Tensor], torch.Tensor], target: Target, vocab: int,
                  kind: str, temperature: float, beta: float,
                  with_kd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()                                                 # [c, V_s]
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if not with_kd:
        return ce, torch.zeros((), device=ce.device)
    kd = token_kd(logits[:, :vocab], target, kind, temperature, beta)             # [c]
    return ce, (kd * kd_mask).sum()


def chunked_kd_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                    labels: torch.Tensor, kd_mask: torch.Tensor | None,
                    target_of: Callable[[int, int], Target] | None, *, vocab: int,
                    kind: str = "fkl", temperature: float = 1.0, beta: float = 0.5,
                    chunk_size: int = 1024, use_checkpoint: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of LM cross-entropy and KD loss over rows, one chunk of rows at a time.

    Args:
        hidden: ``[N, H]`` student final hidden states (``[N, V]`` logits with an identity
            ``head`` for models whose logits cannot be split off).
        head: maps ``[c, H]`` -> ``[c, V_s]`` logits (the student's ``lm_head``).
        labels: ``[N]`` next-token ids, :data:`IGNORE_INDEX` where no LM loss is taken.
        kd_mask: ``[N]`` 0/1 weights of the KD term per row (None: no KD).
        target_of: ``target_of(start, end)`` -> the teacher :data:`Target` for rows
            ``start:end`` (computed without gradients); None: no KD.
        vocab: the shared vocabulary size ``V``; logits beyond it (padding rows of one
            model's embedding) are left out of the KD term.
        chunk_size: rows per chunk; peak extra memory is ``O(chunk_size * V)``.
        use_checkpoint: recompute each chunk's logits in backward instead of storing them.

    Returns:
        ``(ce_sum, kd_sum)`` scalar fp32 tensors; divide by the row counts for means.
    """
    with_kd = target_of is not None and kd_mask is not None
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kd_sum = hidden.new_zeros((), dtype=torch.float32)
    n = hidden.shape[0]
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        target = target_of(start, end) if with_kd else ("none",)
        mask = kd_mask[start:end].float() if with_kd else None
        args = (hidden[start:end], labels[start:end], mask, head, target, vocab, kind,
                temperature, beta, with_kd)
        if use_checkpoint and hidden.requires_grad:
            ce, kd = checkpoint(_chunk_losses, *args, use_reentrant=False)
        else:
            ce, kd = _chunk_losses(*args)
        ce_sum = ce_sum + ce
        kd_sum = kd_sum + kd
    return ce_sum, kd_sum
