"""GPTQ: quantize a weight column by column, compensating each column's error.

Frantar, Ashkboos, Hoefler & Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (arXiv:2210.17323), Algorithm 1:

* columns are quantized left to right (or in descending ``diag(H)`` order, "act-order");
* after quantizing column ``i`` with error ``e = (w_i - q_i) / U[i, i]``, the not yet
  quantized columns absorb it: ``W[:, i:] -= e · U[i, i:]``, where ``U`` is the upper
  Cholesky factor of ``H⁻¹`` (:func:`slmkit.compress.hessian.cholesky_inverse_upper`);
* "lazy batch" updates: inside a block of ``block_size`` columns the update is applied
  column by column, and to the columns after the block once, as one matmul.

Groups stay contiguous in the *original* column order so the stored format is the same as
RTN's: without act-order a group's grid is fitted when the loop reaches its first column
(on the already-updated weights); with act-order all grids are fitted up front ("static
groups"), since permuted columns visit groups out of order.
"""

from __future__ import annotations

import torch

from slmkit.compress.hessian import cholesky_inverse_upper, dead_inputs, one_thread
from slmkit.nn.packing import compute_qparams, quantize_codes


@torch.no_grad()
def hessian_clip(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                 sym: bool, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-group range shrink ratio minimising the group's own output error.

    For row ``o`` and group ``G`` the error of ratio ``r`` is ``dᵀ H_GG d`` with
    ``d = w_oG - Q_r(w_oG)``: the layer's output error from that group alone, on the
    calibration inputs (``H = 2XXᵀ``). This is the data-aware form of the MSE range search
    in GPTQ's reference quantizer; ``r = 1`` (no clipping) is on the grid, so the chosen
    range is never worse than the plain one by this measure.

    Args:
        w: ``[out, in]``; hessian: ``[in, in]`` (``in`` divisible by ``group_size``).

    Returns:
        ``[out, G]`` ratios in ``[1 - max_shrink, 1]``.
    """
    out, inp = w.shape
    g = inp if group_size == -1 else group_size
    wg = w.float().reshape(out, inp // g, g)                              # [out, G, g]
    hb = torch.stack([hessian[i:i + g, i:i + g] for i in range(0, inp, g)]).float()
    best_err = torch.full((out, inp // g), float("inf"))
    best_r = torch.ones(out, inp // g)
    for k in range(max(1, int(max_shrink * n_grid))):
        r = 1.0 - k / n_grid
        scale, zero = compute_qparams(w, bits, group_size, sym, clip=r)      # [out, G]
        s, z = scale[..., None], zero[..., None]
        d = wg - (torch.clamp(torch.round(wg / s) + z, 0, 2 ** bits - 1) - z) * s
        err = torch.einsum("ogj,gjk,ogk->og", d, hb, d)                  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return best_r


def _quant_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """RTN of one column ``[out]`` on per-row grid ``scale``/``zero`` (``[out]``); dequantized."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return (q - zero) * scale


@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                         sym: bool, damp: float = 0.01, block_size: int = 128,
                         act_order: bool = False, preserve_zeros: bool = False,
                         clip_search: bool = False):
    """Quantize ``w`` with GPTQ given its layer Hessian.

    Args:
        w: ``[out, in]`` weight (not modified).
        hessian: ``[in, in]`` ``2XXᵀ`` from :class:`~slmkit.compress.hessian.HessianAccumulator`.
        bits, group_size, sym: the grid (see :mod:`slmkit.nn.packing`).
        damp: relative dampening of ``H``.
        block_size: columns per lazy-update block.
        act_order: quantize columns in descending ``diag(H)`` order.
        preserve_zeros: weights that are exactly zero in ``w`` (pruned) stay exactly zero;
            their rounding "error" is compensated like any other (mask-aware GPTQ, as in
            SparseGPT's joint sparsify-and-quantize). Zero is always on the grid.
        clip_search: fit each group's range by :func:`hessian_clip` instead of its min/max.

    Returns:
        ``(codes [out, in] uint8, scale [out, G], zero [out, G])`` in original column order.
    """
    out, cols = w.shape
    g = cols if group_size == -1 else group_size
    W = w.detach().clone().float()                          # [out, in]
    H = hessian.float()
    W[:, dead_inputs(H)] = 0
    pruned = (W == 0) if preserve_zeros else None           # [out, in]

    if group_size == -1 or act_order:  # all grids up front
        clip = hessian_clip(W, H, bits, group_size, sym) if clip_search else 1.0
        scale, zero = compute_qparams(W, bits, group_size, sym, clip)   # [out, G]
        static = True
    else:
        scale = torch.zeros(out, cols // g)
        zero = torch.zeros(out, cols // g)
        static = False

    perm = torch.arange(cols)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        pruned = pruned[:, perm] if pruned is not None else None
    U = cholesky_inverse_upper(H, damp)                     # [in, in], H⁻¹ = UᵀU
    Q = torch.zeros_like(W)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()                            # [out, b]
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]                                # [b, b]
        with one_thread():                                  # small ops: see one_thread
            for i in range(i2 - i1):
                col = int(perm[i1 + i])                         # original column index
                grp = col // g
                if not static and col % g == 0:
                    # Fit the group's grid on the current (error-compensated) weights.
                    ahead = W1[:, i:i + g]                                     # [out, <=g]
                    if ahead.shape[1] < g:      # the group runs past this block
                        ahead = torch.cat([ahead, W[:, i2:i2 + g - ahead.shape[1]]], dim=1)
                    clip = (hessian_clip(ahead, H[col:col + g, col:col + g], bits, -1, sym)
                            if clip_search else 1.0)
                    s, z = compute_qparams(ahead, bits, -1, sym, clip)
                    scale[:, grp], zero[:, grp] = s[:, 0], z[:, 0]
                q = _quant_column(W1[:, i], scale[:, grp], zero[:, grp], bits)
                if pruned is not None:
                    q = torch.where(pruned[:, i1 + i], torch.zeros_like(q), q)
                Q1[:, i] = q
                err = (W1[:, i] - q) / U1[i, i]                 # [out]
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # [out, 1] x [1, b-i]
                E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]                     # lazy update: [out,b]@[b,rest]

    if act_order:
        Q = Q[:, torch.argsort(perm)]                       # back to original order
    codes = quantize_codes(Q, scale, zero, bits, group_size)  # Q is on the grid: exact
    return codes, scale, zero


def layer_output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean squared layer output error ``‖X Wᵀ - X Ŵᵀ‖² / numel`` for ``x`` ``[n, in]``."""
    return float(((x.float() @ (w.float() - w_hat.float()).t()) ** 2).mean())
