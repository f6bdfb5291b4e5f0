"""Aggregating LoRA adapters: FedAvg of the factors and the exact average of the products.

A client ``k`` adapts a frozen ``W [out, in]`` by ``ΔW_k = s · B_k A_k`` (``A_k [r, in]``,
``B_k [out, r]``, ``s = alpha / r``). The server wants the weighted mean of the updates,
``ΔW = s · Σ_k w_k B_k A_k`` (``Σ w_k = 1``). FedAvg, as FlowerTune and most federated
LoRA code does it, averages the factors separately: ``s · B̄ Ā`` with ``B̄ = Σ w_k B_k``,
``Ā = Σ w_k A_k``, which is *not* that mean: the cross terms ``w_j w_k B_j A_k`` remain.

The exact alternative here is FedEx-LoRA (Singhal et al. 2024, "FedEx-LoRA: Exact
Aggregation for Federated and Efficient Fine-Tuning of Foundation Models"): keep FedAvg's
factors as the next round's adapter (so clients continue from where they were) and fold
the residual ``Σ_k w_k B_k A_k - B̄ Ā`` into the frozen base. The residual has rank at most
``(K + 1) r`` and is written exactly as two factors (:func:`residual_factors`); rounds
accumulate by concatenating them, and :func:`compact` re-factorises a product ``U V`` by QR
and an SVD of the small core (Halko et al. 2011, §5), dropping only directions whose
singular value is zero to float precision. The base a client trains on is then
``W + U V``, applied as a frozen low-rank branch (no dense ``[out, in]`` matrix ever
travels).

All functions are pure, on fp32 tensors; the server and the tests call them.
"""

from __future__ import annotations

import torch

__all__ = ["weighted_mean", "residual_factors", "concat_factors", "compact",
           "exact_update"]


def _weights(weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    if (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError("aggregation weights must be non-negative with a positive sum")
    return w / w.sum()


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``Σ_k w_k T_k`` with the weights normalised to sum to one (fp64 accumulation)."""
    w = _weights(weights)
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for wk, t in zip(w, tensors):
        out += wk * t.double()
    return out.to(torch.float32)


def residual_factors(As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float],
                     scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U, V)`` with ``U V = s · (Σ_k w_k B_k A_k - B̄ Ā)`` exactly.

    Args:
        As: client ``A_k [r, in]``; Bs: client ``B_k [out, r]``; weights: ``w_k``.
        scaling: ``s = alpha / r``, folded into ``U``.

    Returns:
        ``U [out, (K+1) r]`` = ``[s w_1 B_1, ..., s w_K B_K, -s B̄]`` and
        ``V [(K+1) r, in]`` = ``[A_1; ...; A_K; Ā]``.
    """
    w = _weights(weights)
    A_bar, B_bar = weighted_mean(As, weights), weighted_mean(Bs, weights)
    U = torch.cat([float(wk) * scaling * B.float() for wk, B in zip(w, Bs)]
                  + [-scaling * B_bar], dim=1)
    V = torch.cat([A.float() for A in As] + [A_bar], dim=0)
    return U, V


def concat_factors(first: tuple[torch.Tensor, torch.Tensor] | None,
                   second: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U V = U1 V1 + U2 V2`` (``first`` may be None)."""
    if first is None:
        return second
    return torch.cat([first[0], second[0]], 1), torch.cat([first[1], second[1]], 0)


def compact(U: torch.Tensor, V: torch.Tensor, rtol: float = 1e-6
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factorise ``U [out, m] @ V [m, in]`` with the fewest columns its rank needs.

    ``U = Q_u R_u``, ``V^T = Q_v R_v`` (reduced QR), ``R_u R_v^T = P Σ Qᵀ`` (an ``m x m``
    SVD); the product is ``(Q_u P Σ^½)(Σ^½ Qᵀ Q_vᵀ)``. Singular values below ``rtol`` times
    the largest are float noise of an exactly rank-deficient product and are dropped, so
    the product is unchanged to fp32 precision while its rank is at most
    ``min(out, in, m)``. Computed in fp64.
    """
    if U.shape[1] == 0:
        return U, V
    Qu, Ru = torch.linalg.qr(U.double())
    Qv, Rv = torch.linalg.qr(V.double().T)
    P, S, Qh = torch.linalg.svd(Ru @ Rv.T, full_matrices=False)
    keep = S > rtol * S[0] if S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    root = S[keep].sqrt()
    U2 = (Qu @ P[:, keep]) * root                 # [out, k]
    V2 = root[:, None] * (Qh[keep] @ Qv.T)        # [k, in]
    return U2.float(), V2.float()


def exact_update(As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float],
                 scaling: float, residual: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One layer's exact aggregation: ``(Ā, B̄, residual')``.

    The global update after the round is ``s B̄ Ā + U' V'`` = ``s Σ_k w_k B_k A_k`` plus the
    residual carried from earlier rounds (``residual``, or None), exactly.
    """
    A_bar, B_bar = weighted_mean(As, weights), weighted_mean(Bs, weights)
    new = residual_factors(As, Bs, weights, scaling)
    return A_bar, B_bar, compact(*concat_factors(residual, new))
