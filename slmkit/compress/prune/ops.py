"""Pure tensor math for unstructured and N:M (semi-structured) pruning.

All functions take a weight ``W`` of shape ``[out, in]`` (the ``nn.Linear`` layout) and
return new tensors; none of them touches modules or hooks (that is ``modifier.py``).

Methods:

* **Magnitude**: score ``|W_ij|`` (Han et al., 2015, "Learning both Weights and
  Connections for Efficient Neural Networks").
* **Wanda**: score ``|W_ij| * ||X_j||_2``, compared *per output row* (Sun et al., 2023,
  "A Simple and Effective Pruning Approach for Large Language Models", arXiv:2306.11695).
* **SparseGPT**: one-shot OBS reconstruction: prune a column, spread its error over the
  not-yet-processed columns through the inverse Hessian ``H^-1`` of the layer's inputs
  (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", arXiv:2301.00774). It shares the Hessian machinery with GPTQ.
* **N:M**: at most ``N`` non-zeros in every group of ``M`` consecutive input weights of a
  row (e.g. 2:4, which NVIDIA Ampere sparse tensor cores run; Mishra et al., 2021).
"""

from __future__ import annotations

import re

import torch

from slmkit.compress.hessian import one_thread
from slmkit.errors import ConfigError


def check_sparsity(sparsity: float) -> float:
    """Validate an unstructured sparsity: a fraction in ``[0, 1)``."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"--sparsity {sparsity} is outside [0, 1); pass the fraction of "
                          "weights to remove, e.g. 0.5.")
    return float(sparsity)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Parse an ``"N:M"`` pattern (``"2:4"`` keeps 2 of every 4) into ``(n, m)``."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise ConfigError(f"--pattern '{pattern}' is not of the form N:M; use e.g. 2:4 or 4:8.")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"--pattern '{pattern}' must keep between 1 and M-1 of every M "
                          "weights (0 < N < M); use e.g. 2:4.")
    return n, m


def check_pattern_fits(in_features: int, m: int, name: str) -> None:
    """An N:M pattern needs the input dimension to be a multiple of ``m``."""
    if in_features % m:
        raise ConfigError(f"Pattern group size {m} does not divide the input dimension "
                          f"{in_features} of '{name}'; choose M dividing {in_features} or "
                          "exclude the layer with --ignore.")


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|W|``: ``[out, in]`` -> ``[out, in]``."""
    return w.abs()


def wanda_scores(w: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2``.

    Args:
        w: ``[out, in]`` weight.
        act_norm: ``[in]`` L2 norm of each input feature over all calibration tokens.

    Returns:
        ``[out, in]`` scores.
    """
    if act_norm.shape != (w.shape[1],):
        raise ValueError(f"act_norm has shape {tuple(act_norm.shape)}, expected ({w.shape[1]},)")
    return w.abs() * act_norm.to(w.dtype)[None, :]  # [out, in] * [1, in]


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest-scoring weights of every output row.

    Args:
        scores: ``[out, in]`` importance.
        sparsity: fraction of each row to remove; ``floor(in * sparsity)`` per row.

    Returns:
        ``[out, in]`` bool mask, True where the weight is kept.
    """
    n_prune = int(scores.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune == 0:
        return mask
    idx = torch.topk(scores, n_prune, dim=1, largest=False).indices  # [out, n_prune]
    mask.scatter_(1, idx, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of a row.

    Args:
        scores: ``[out, in]`` with ``in % m == 0``.

    Returns:
        ``[out, in]`` bool mask with exactly ``n`` True per group.
    """
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"in_features {in_f} is not a multiple of {m}")
    groups = scores.reshape(out_f, in_f // m, m)  # [out, in/m, m]
    keep = torch.topk(groups, n, dim=2).indices  # [out, in/m, n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
    return mask.reshape(out_f, in_f)  # [out, in]


def sparsegpt_prune(w: torch.Tensor, hinv: torch.Tensor, sparsity: float = 0.0,
                    nm: tuple[int, int] | None = None,
                    block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune ``w`` column by column and reconstruct with the inverse Hessian.

    For each column ``i`` (left to right), the weights chosen for removal are zeroed and
    the error ``e = (w_i - q_i) / [H^-1]_ii`` is subtracted from the later columns as
    ``W[:, i:] -= e [H^-1]_{i, i:}`` (the OBS update, using the upper Cholesky factor of
    ``H^-1`` as in GPTQ). Updates inside a block are applied eagerly, across blocks lazily,
    which gives the same result as ``block_size=1`` up to rounding.

    The mask is chosen per block of columns (adaptive mask selection): with score
    ``w^2 / [H^-1]_ii^2``, the lowest ``sparsity`` fraction of each row inside the block,
    or the lowest ``m - n`` of each N:M group.

    Args:
        w: ``[out, in]`` weight (not modified).
        hinv: ``[in, in]`` upper Cholesky factor of the damped inverse Hessian
            ``(2 X X^T + lambda I)^-1`` (see ``slmkit.compress.hessian``).
        sparsity: unstructured fraction to remove per row, used when ``nm`` is None.
        nm: ``(n, m)`` to keep ``n`` of every ``m``; ``block_size`` must be a multiple of m.
        block_size: columns per lazy-update block.

    Returns:
        ``(w_pruned [out, in], mask [out, in] bool, True = kept)``.
    """
    w = w.detach().clone().float()
    hinv = hinv.float()
    out_f, in_f = w.shape
    if nm is not None and block_size % nm[1]:
        block_size = max(nm[1], block_size // nm[1] * nm[1])
    mask = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()  # [out, b]
        h1 = hinv[i1:i2, i1:i2]  # [b, b]
        err1 = torch.zeros_like(w1)
        d = torch.diag(h1)  # [b]
        if nm is None:
            score = w1 ** 2 / d[None, :] ** 2
            mask1 = row_mask(score, sparsity)
        else:
            mask1 = torch.ones_like(w1, dtype=torch.bool)
        with one_thread():  # thousands of small ops (see hessian.one_thread)
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    cols = slice(i, i + nm[1])
                    score = w1[:, cols] ** 2 / d[None, cols] ** 2  # [out, m]
                    mask1[:, cols] = nm_mask(score, nm[0], nm[1])
                col = w1[:, i]
                q = col * mask1[:, i]
                err = (col - q) / d[i]  # [out]
                w1[:, i:] -= err[:, None] * h1[i, i:][None, :]  # [out, 1] * [1, b-i]
                w1[:, i] = q
                err1[:, i] = err
        w[:, i1:i2] = w1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # [out, b] @ [b, in-i2]
    w[~mask] = 0.0
    return w, mask


def achieved_sparsity(w: torch.Tensor) -> float:
    """Fraction of exact zeros in a tensor."""
    return float((w == 0).sum()) / max(1, w.numel())


def holds_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of a row has at most ``n`` non-zeros."""
    out_f, in_f = w.shape
    nonzero = (w.reshape(out_f, in_f // m, m) != 0).sum(dim=2)  # [out, in/m]
    return bool((nonzero <= n).all())
