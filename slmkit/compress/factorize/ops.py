"""Pure tensor math for low-rank factorization: SVD and activation-aware SVD (ASVD).

A linear ``W`` of shape ``[out, in]`` is replaced by ``B @ A`` with ``A: [r, in]`` and
``B: [out, r]``, which costs ``r * (in + out)`` parameters instead of ``in * out``.

* **SVD**: ``W = U S V^T``; keep the top ``r`` singular values (Eckart-Young: the best
  rank-``r`` approximation in Frobenius norm), split ``sqrt(S)`` between the two factors.
* **ASVD**: scale the input channels by their calibration activation magnitude first,
  ``W' = W diag(s)`` with ``s_j = mean|X_j| ** alpha``, truncate the SVD of ``W'`` and
  unscale ``A = A' diag(1/s)``. Channels that carry large activations (outliers) are kept
  more precisely, which is what the output error depends on (Yuan et al., 2023,
  "ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language
  Models", arXiv:2312.05821).

The rank of each layer comes from a parameter ratio (``rank_for_ratio``: the same share of
every layer, or ``allocate_ranks``: one budget for all layers, spent where the spectrum
says truncation hurts most) or a spectral energy target (``rank_for_energy``).
"""

from __future__ import annotations

import torch

from slmkit.errors import ConfigError


def rank_for_ratio(out_features: int, in_features: int, ratio: float, name: str = "") -> int:
    """Largest rank whose factors keep at most ``ratio`` of the dense parameters.

    ``r * (in + out) <= ratio * in * out``.

    Raises:
        ConfigError: the ratio gives rank 0 for this layer.
    """
    rank = int(ratio * out_features * in_features // (out_features + in_features))
    if rank < 1:
        raise ConfigError(f"--ratio {ratio} gives rank 0 for '{name}' ({out_features}x"
                          f"{in_features}); raise --ratio or exclude the layer with --ignore.")
    return rank


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values hold ``energy`` of ``sum(S^2)``.

    Args:
        singular_values: ``[k]`` descending.
        energy: fraction in ``(0, 1]``.
    """
    power = singular_values.double() ** 2
    cum = torch.cumsum(power, 0) / power.sum().clamp_min(1e-30)  # [k]
    rank = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1
    return min(max(rank, 1), singular_values.numel())


def allocate_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                   ratio: float) -> dict[str, int]:
    """Ranks for all layers together that keep at most ``ratio`` of their parameters.

    Truncating singular value ``i`` of a layer loses the share ``s_i² / Σ s²`` of its
    (scaled) spectral energy and saves ``in + out`` parameters. Starting every layer at the
    largest rank worth factorizing (``r·(in+out) <= in·out``), the values with the least
    energy per parameter are dropped first, over all layers at once, until the factors fit
    the budget: layers with a flat spectrum keep more rank, steep ones give it up (the
    spirit of ASVD's sensitivity-based rank search, with the energy share as the
    sensitivity instead of a perplexity probe per layer and ratio).

    Args:
        spectra: layer name -> ``[k]`` singular values, descending.
        shapes: layer name -> ``(out, in)``.
        ratio: fraction of the layers' dense parameters to keep, in (0, 1).

    Returns:
        layer name -> rank; a rank equal to the layer's break-even rank means "keep it
        dense" (see :func:`saves_params`).

    Raises:
        ConfigError: the budget cannot be met even at rank 1 everywhere.
    """
    dense = sum(o * i for o, i in shapes.values())
    budget = ratio * dense
    full = {n: min(int(o * i // (o + i)), spectra[n].numel()) for n, (o, i) in shapes.items()}
    cost = {n: o + i for n, (o, i) in shapes.items()}
    if sum(cost.values()) > budget:
        raise ConfigError(f"--ratio {ratio} is below what rank 1 in every layer needs; raise "
                          "--ratio or exclude layers with --ignore.")
    names, keys, costs = [], [], []
    for n, sv in spectra.items():
        p = sv.double() ** 2
        p = p / p.sum().clamp_min(1e-30)
        r = full[n]
        keys.append(p[1:r] / cost[n])           # rank 1 always stays
        names += [n] * (r - 1)
        costs += [cost[n]] * (r - 1)
    order = torch.argsort(torch.cat(keys), stable=True).tolist()
    ranks = dict(full)
    total = sum(full[n] * cost[n] for n in full)
    for j in order:
        if total <= budget:
            break
        ranks[names[j]] -= 1
        total -= costs[j]
    return ranks


def saves_params(out_features: int, in_features: int, rank: int) -> bool:
    """True when ``rank * (in + out) < in * out`` (otherwise keep the layer dense)."""
    return rank * (out_features + in_features) < out_features * in_features


def check_ratio(ratio: float) -> float:
    if not 0.0 < float(ratio) < 1.0:
        raise ConfigError(f"--ratio {ratio} is outside (0, 1); pass the fraction of each "
                          "layer's parameters to keep, e.g. 0.8.")
    return float(ratio)


def check_energy(energy: float) -> float:
    if not 0.0 < float(energy) <= 1.0:
        raise ConfigError(f"--energy {energy} is outside (0, 1]; pass the fraction of "
                          "spectral energy to keep, e.g. 0.95.")
    return float(energy)


def svd(w: torch.Tensor, scale: torch.Tensor | None = None):
    """SVD of ``W diag(scale)`` in float64.

    Args:
        w: ``[out, in]``.
        scale: ``[in]`` positive per-input-channel scale, or None.

    Returns:
        ``(U [out, k], S [k], Vh [k, in])`` with ``k = min(out, in)``.
    """
    wd = w.detach().double()
    if scale is not None:
        wd = wd * scale.double()[None, :]  # [out, in] * [1, in]
    return torch.linalg.svd(wd, full_matrices=False)


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
                     scale: torch.Tensor | None = None, dtype=torch.float32):
    """Truncate an SVD to ``rank`` and build ``(A [rank, in], B [out, rank])``.

    ``sqrt(S)`` goes to both factors so that they have similar norms; with ``scale`` the
    input scaling is undone on ``A`` so that ``B @ A ~= W``.
    """
    root = s[:rank].sqrt()  # [r]
    b = u[:, :rank] * root[None, :]  # [out, r]
    a = root[:, None] * vh[:rank]  # [r, in]
    if scale is not None:
        a = a / scale.double()[None, :]  # undo W' = W diag(s): A = A' diag(1/s)
    return a.to(dtype), b.to(dtype)


def svd_factor(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``w`` (``[out, in]``): ``(A [r, in], B [out, r])``."""
    u, s, vh = svd(w)
    return factors_from_svd(u, s, vh, rank, dtype=w.dtype)


def asvd_scale(act_abs_mean: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """ASVD input scaling ``s_j = mean|X_j| ** alpha`` (``[in]`` -> ``[in]``), kept positive."""
    s = act_abs_mean.double().clamp_min(0) ** alpha
    floor = s[s > 0].min() if bool((s > 0).any()) else torch.tensor(1.0, dtype=s.dtype)
    return s.clamp_min(float(floor) * 1e-2 if float(floor) > 0 else 1.0)


def asvd_factor(w: torch.Tensor, act_abs_mean: torch.Tensor, rank: int,
                alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware rank-``rank`` factors of ``w``: ``(A [r, in], B [out, r])``."""
    scale = asvd_scale(act_abs_mean, alpha)
    u, s, vh = svd(w, scale)
    return factors_from_svd(u, s, vh, rank, scale=scale, dtype=w.dtype)
