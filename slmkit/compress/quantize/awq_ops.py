"""AWQ: activation-aware per-input-channel scaling and clipping before round-to-nearest.

Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (arXiv:2306.00978), section 3:

* A few input channels carry large activations; scaling their weight columns up by
  ``s > 1`` (and their inputs down by ``1/s``) reduces their relative rounding error:
  ``y = Q(W · diag(s)) · (diag(s)⁻¹ x)``.
* ``s = mean|x|^α / mean|w|^(1-α)`` (the "duo scaling" of the reference code), normalised,
  with ``α`` chosen on a grid to minimise the output error on calibration data. ``s = 1``
  (plain RTN) is always a candidate, so the search can never be worse than RTN on the
  calibration data.
* The ``1/s`` is folded into the op that produces ``x`` (an RMSNorm weight or the rows of
  a preceding linear), so inference costs nothing extra.
* Clipping: each group's range is shrunk by a ratio chosen on a grid to minimise the
  group's share of the output error.

All functions here are pure tensor math on ``[n, in]`` inputs and ``[out, in]`` weights.
"""

from __future__ import annotations

import torch

from slmkit.compress.quantize.ops import fake_quantize
from slmkit.nn.packing import compute_qparams


def subsample_tokens(x: torch.Tensor, max_tokens: int, seed: int = 0) -> torch.Tensor:
    """At most ``max_tokens`` rows of ``x`` ``[n, in]``, chosen at random (deterministic)."""
    if x.shape[0] <= max_tokens:
        return x
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=gen)[:max_tokens]
    return x[idx]


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor,
                     n_grid: int = 20) -> list[torch.Tensor]:
    """Per-input-channel scale candidates, ``s = 1`` first.

    Args:
        x_mean: ``[in]`` mean ``|x|`` per input channel.
        w_mean: ``[in]`` mean relative ``|w|`` per input channel (over the linears).
        n_grid: number of ``α`` values in ``[0, 1)``.

    Returns:
        ``n_grid + 1`` tensors ``[in]``: ones, then ``x^α / w^(1-α)`` normalised so that
        ``sqrt(max · min) = 1``.
    """
    out = [torch.ones_like(x_mean)]
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_mean.clamp(min=1e-4).pow(alpha) / w_mean.clamp(min=1e-4).pow(1 - alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out.append(s)
    return out


def scaled_output_error(x: torch.Tensor, weights: list[torch.Tensor], scale: torch.Tensor,
                        bits: int, group_size: int, sym: bool) -> float:
    """Output MSE of the linears when quantized with input scaling ``scale``.

    ``‖X Wᵀ - (X / s) Q(W · s)ᵀ‖²`` averaged over all outputs of all ``weights``.

    Args:
        x: ``[n, in]`` calibration inputs shared by the linears.
        weights: ``[out_k, in]`` weights of the linears that read ``x``.
        scale: ``[in]``.
    """
    xs = x / scale                                          # [n, in]
    err = 0.0
    total = 0
    for w in weights:
        w = w.float()
        w_hat = fake_quantize(w * scale, bits, group_size, sym)   # [out, in], on the grid
        diff = x @ w.t() - xs @ w_hat.t()                   # [n, out]
        err += float((diff ** 2).sum())
        total += diff.numel()
    return err / total


def weight_channel_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean per input channel of ``|w|`` normalised by each group's max (AWQ's w_mean).

    Returns:
        ``[in]``.
    """
    means = []
    for w in weights:
        w = w.float().abs()
        out, inp = w.shape
        g = inp if group_size == -1 else group_size
        wg = w.reshape(out, inp // g, g)                    # [out, G, g]
        wg = wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-8)
        means.append(wg.reshape(out, inp).mean(dim=0))
    return torch.stack(means).mean(dim=0)


@torch.no_grad()
def awq_search_scale(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int,
                     sym: bool, n_grid: int = 20, x_mean: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, list[float]]:
    """Grid-search the input-channel scale minimising the quantized output error.

    Args:
        x: ``[n, in]`` inputs the error is measured on (subsample to about a thousand
            tokens first).
        weights: the linears that read ``x``, each ``[out_k, in]``.
        x_mean: ``[in]`` mean ``|x|`` per channel for the candidates (default: from ``x``;
            pass it from a larger sample when there is one).

    Returns:
        ``(best_scale [in], errors)`` where ``errors[0]`` is the error at ``s = 1``. The
        best error is ``<= errors[0]`` by construction.
    """
    x = x.float()
    x_mean = x.abs().mean(dim=0) if x_mean is None else x_mean   # [in]
    w_mean = weight_channel_mean(weights, group_size)       # [in]
    errors = []
    best, best_err = None, float("inf")
    for s in candidate_scales(x_mean, w_mean, n_grid):
        e = scaled_output_error(x, weights, s, bits, group_size, sym)
        errors.append(e)
        if e < best_err:
            best, best_err = s, e
    return best, errors


@torch.no_grad()
def awq_search_clip(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, sym: bool,
                    n_grid: int = 20, max_shrink: float = 0.5,
                    max_tokens: int = 512) -> torch.Tensor:
    """Per-group range shrink ratio minimising each group's contribution to the output error.

    For group ``G`` of row ``o``, the error is ``‖X_G (w_oG - Q_r(w_oG))‖²`` over tokens,
    where ``X_G`` are the group's input columns. Ratio ``r = 1`` (no clipping) is on the
    grid, so the chosen ratios are never worse than no clipping on these tokens.

    Args:
        x: ``[n, in]``; w: ``[out, in]`` (already scaled, if AWQ scaling is used).

    Returns:
        ``[out, G]`` ratios in ``[1 - max_shrink, 1]``.
    """
    x = subsample_tokens(x.float(), max_tokens)
    w = w.float()
    out, inp = w.shape
    g = inp if group_size == -1 else group_size
    xg = x.reshape(x.shape[0], inp // g, g).permute(1, 0, 2)     # [G, n, g]
    wg = w.reshape(out, inp // g, g).permute(1, 2, 0)            # [G, g, out]
    best_err = torch.full((inp // g, out), float("inf"))         # [G, out]
    best_r = torch.ones(inp // g, out)
    steps = max(1, int(max_shrink * n_grid))
    for k in range(steps):
        r = 1.0 - k / n_grid
        scale, zero = compute_qparams(w, bits, group_size, sym, clip=r)  # [out, G]
        s = scale.t()[:, None, :]                                # [G, 1, out]
        z = zero.t()[:, None, :]
        q = torch.clamp(torch.round(wg / s) + z, 0, 2 ** bits - 1)
        diff = wg - (q - z) * s                                  # [G, g, out]
        err = (torch.bmm(xg, diff) ** 2).sum(dim=1)              # [G, n, out] -> [G, out]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return best_r.t().contiguous()                               # [out, G]
