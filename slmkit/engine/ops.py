"""Pure tensor math for generation: rotary embeddings, attention masks, sampling filters.

No state lives here. Every function is a plain function of tensors so that it can be
unit-tested against a slow reference (``tests/test_engine_ops.py``). The stateful parts
(KV cache, runners, the batching engine) call these.

Notation: ``B`` batch rows (requests), ``T`` new tokens per row, ``L`` key length (tokens in
the cache after the write), ``H`` query heads, ``Hkv`` key/value heads, ``D`` head dim,
``V`` vocabulary.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim: ``[x1, x2] -> [-x2, x1]`` (RoPE, GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, "RoFormer", arXiv:2104.09864).

    Args:
        x: ``[B, heads, T, D]`` queries or keys.
        cos, sin: ``[B, 1, T, D]`` tables for each row's positions (from the model's own
            rotary module, so scaled RoPE variants come for free).

    Returns:
        ``[B, heads, T, D]``, ``x * cos + rotate_half(x) * sin``.
    """
    return x * cos + rotate_half(x) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, for :func:`apply_rope_rolled`. ``[..., D]``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` in 4 ops instead of 7, bit-identical.

    ``rotate_half(x) * sin == roll(x, D/2) * signed_sin(sin)`` element by element
    (``-x2 * s == x2 * -s`` exactly in IEEE arithmetic), and ``roll`` is one kernel where
    ``rotate_half`` is two slices, a negation and a concatenation.

    Args:
        x: ``[B, heads, T, D]``.
        cos, sin_signed: ``[B, 1, T, D]``.
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


def attention_mask(starts: torch.Tensor, new_tokens: int, key_len: int,
                   window: int | None = None) -> torch.Tensor:
    """Boolean attention mask for rows that each continue their own sequence.

    Row ``b`` holds ``new_tokens`` queries at positions ``starts[b] + t``; a query at
    position ``p`` may attend to key ``j`` when ``j <= p`` (causal) and, with a sliding
    window ``w`` (Mistral; Beltagy et al. 2020, arXiv:2004.05150), ``j > p - w``. Keys
    beyond a row's own length are thereby masked, which is what lets rows of different
    lengths share one padded batch.

    Args:
        starts: ``[B]`` int64, tokens already in each row's cache before this call.
        new_tokens: ``T``.
        key_len: ``L``, the padded key length of the batch.
        window: sliding-window size, or None for full causal attention.

    Returns:
        ``[B, 1, T, L]`` bool, True where attention is allowed.
    """
    q_pos = starts[:, None] + torch.arange(new_tokens, device=starts.device)  # [B, T]
    k_pos = torch.arange(key_len, device=starts.device)                       # [L]
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]                       # [B, T, L]
    if window is not None:
        allowed &= k_pos[None, None, :] > (q_pos[:, :, None] - window)
    return allowed[:, None]                                                   # [B, 1, T, L]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads (Ainslie et al. 2023, GQA).

    Written as two batched matmuls with the query heads of one KV group stacked along the
    query axis, so keys/values are never repeated. On CPU this is far faster than
    ``F.scaled_dot_product_attention`` for short queries (its flash kernel costs ~25 ms per
    call at T = 1 on our machines, measured in ``bench/decode.py``'s profile).

    Args:
        q: ``[B, H, T, D]``.
        k, v: ``[B, Hkv, L, D]`` with ``H % Hkv == 0``.
        mask: ``[B, 1, T, L]`` bool (True = attend) or None for "attend to all keys".
        scale: softmax scale, usually ``D ** -0.5``.
        softcap: Gemma 2's attention-logit soft-capping: scores become
            ``softcap * tanh(scores / softcap)`` before the mask (None: off).

    Returns:
        ``[B, H, T, D]``.
    """
    B, H, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G * T, D)                             # [B, Hkv, G*T, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale       # [B, Hkv, G*T, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        full = mask[:, :, None].expand(B, 1, G, T, L).reshape(B, 1, G * T, L)
        scores = scores.masked_fill(~full, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).reshape(B, H, T, D)            # [B, Hkv, G*T, D] -> [B, H, T, D]


# --------------------------------------------------------------------------- sampling


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019, arXiv:1909.05858), as in transformers.

    For every token id already in the context, a positive logit is divided by
    ``penalty`` and a negative one multiplied by it.

    Args:
        logits: ``[V]`` float.
        seen: ``[N]`` int64 token ids of the context (duplicates allowed).
        penalty: > 0; 1.0 leaves the logits unchanged.

    Returns:
        ``[V]``, a new tensor.
    """
    out = logits.clone()
    if penalty == 1.0 or seen.numel() == 0:
        return out
    ids = torch.unique(seen)
    vals = out[ids]
    out[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of ``[V]`` (ties at the k-th value are kept); -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020, arXiv:1904.09751) on ``[V]`` logits.

    Keeps the smallest set of most likely tokens whose probability mass reaches ``p``
    (always at least the top token); the rest become -inf.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
    drop_sorted = mass_before >= p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p filter (Nguyen et al. 2024, arXiv:2407.01082) on ``[V]`` logits.

    Drops tokens whose probability is below ``min_p`` times the top token's probability.
    """
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The ``n`` most likely ``(token_id, logprob)`` pairs of a ``[V]`` log-distribution."""
    if n <= 0:
        return []
    vals, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist())]
