"""Pure tensor math for structured pruning: importance scores and weight slicing.

Importance follows Minitron (Muralidharan et al., 2024, "Compact Language Models via
Pruning and Knowledge Distillation", arXiv:2407.14679) and ShortGPT (Men et al., 2024,
"ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
arXiv:2403.03853), computed from calibration activations:

* attention head ``h``: ``sum over tokens of ||head output_h||^2`` (the input of ``o_proj``
  split into heads); a KV group under GQA is the sum of its query heads;
* MLP channel ``c``: ``sum over tokens of |a_c|`` where ``a`` is the input of ``down_proj``;
* hidden (embedding) channel ``j``: ``sum over tokens and norms of |norm output_j|``;
* layer: block influence ``mean over tokens of 1 - cos(block input, block output)``.

The slicing helpers cut rows/columns of ``[out, in]`` weights by index lists.
"""

from __future__ import annotations

import torch


def head_energy(attn_out: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head ``sum ||o_h||^2`` of the attention output before ``o_proj``.

    Args:
        attn_out: ``[tokens, num_heads * head_dim]``.

    Returns:
        ``[num_heads]`` float64.
    """
    tokens = attn_out.shape[0]
    per_head = attn_out.double().reshape(tokens, num_heads, -1)  # [T, H, d]
    return per_head.pow(2).sum(dim=(0, 2))


def group_scores(head_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum query-head scores per KV group: ``[H] -> [num_kv]`` (head h uses kv h // (H/kv))."""
    return head_scores.reshape(num_kv_heads, -1).sum(dim=1)  # [kv, H/kv] -> [kv]


def channel_abs_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum over tokens of |x_c|``: ``[tokens, C] -> [C]`` float64."""
    return x.double().abs().sum(dim=0)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """Sum of ``1 - cos(x_in_t, x_out_t)`` over tokens, and the token count.

    Args:
        x_in: ``[tokens, hidden]`` block input.
        x_out: ``[tokens, hidden]`` block output.
    """
    cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)  # [T]
    return float((1.0 - cos).sum()), int(cos.numel())


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest scores, in ascending index order (stable layout)."""
    return torch.sort(torch.topk(scores, n_keep).indices).values


def heads_to_keep(head_scores: torch.Tensor, num_kv_heads: int, remove: int,
                  mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the query heads and KV heads to keep in one layer.

    Args:
        head_scores: ``[H]`` importance per query head.
        num_kv_heads: KV heads (``H`` for plain multi-head attention).
        remove: query heads to remove.
        mode: ``"groups"`` removes whole KV groups (``remove`` is a multiple of the group
            size); ``"within"`` removes ``remove / num_kv`` query heads from every group.

    Returns:
        ``(query_heads [H'], kv_heads [kv'])`` kept, ascending.
    """
    num_heads = head_scores.numel()
    group = num_heads // num_kv_heads
    if mode == "groups":
        kv_keep = keep_top(group_scores(head_scores, num_kv_heads), num_kv_heads - remove // group)
        q_keep = (kv_keep[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        return q_keep, kv_keep  # [kv', g] -> [kv' * g]
    per_group = head_scores.reshape(num_kv_heads, group)  # [kv, g]
    keep = group - remove // num_kv_heads
    local = torch.sort(torch.topk(per_group, keep, dim=1).indices, dim=1).values  # [kv, keep]
    q_keep = (torch.arange(num_kv_heads)[:, None] * group + local).reshape(-1)
    return q_keep, torch.arange(num_kv_heads)


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices of whole heads: ``[n] -> [n * head_dim]`` (head h is h*d..h*d+d-1)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def take(t: torch.Tensor, rows: torch.Tensor | None = None,
         cols: torch.Tensor | None = None) -> torch.Tensor:
    """``t[rows][:, cols]`` for a ``[out, in]`` weight or ``t[rows]`` for a ``[n]`` vector."""
    if rows is not None:
        t = t.index_select(0, rows)
    if cols is not None and t.dim() > 1:
        t = t.index_select(1, cols)
    return t.contiguous()
