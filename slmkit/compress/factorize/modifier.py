"""``slm factorize --method {svd,asvd}``: replace linears by low-rank ``B @ A`` factors.

State lives here (calibration hooks, module swaps); the math is in ``ops.py`` and the
layer in ``slmkit.nn.lowrank``.

* ``svd`` needs no data: each targeted linear is truncated to the rank its target allows.
* ``asvd`` runs the model block by block on calibration data (``compress.calibrate``),
  records ``mean |X_j|`` per input feature of every linear, scales the weight by it before
  the SVD and unscales after (ASVD, arXiv:2312.05821).

The rank of each layer comes from ``--ratio`` (keep that fraction of the parameters:
``--allocate uniform`` of each layer, ``global`` of all targeted layers together, spent by
:func:`ops.allocate_ranks` on the (scaled) spectra) or ``--energy`` (keep that fraction of
each layer's spectral energy; for ASVD, of the scaled weight). A layer where the rank would
not save parameters stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slmkit.compress.factorize import ops
from slmkit.compress.match import is_conv1d, match_linears, weight_matrix
from slmkit.errors import ConfigError
from slmkit.compress.factorize.config import FactorizeOptions
from slmkit.nn.lowrank import FORMAT, LowRankLinear
from slmkit.nn.surgery import set_module

@dataclass
class FactorizeReport:
    """Per-layer ranks and the parameter saving."""

    ranks: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    dense_params: int = 0
    factored_params: int = 0


def _check_ranks(linears: dict[str, nn.Module], settings: FactorizeOptions) -> None:
    """Fail before any work when a ratio gives rank 0 for some layer."""
    if settings.ratio is None:
        return
    for name, module in linears.items():
        out_f, in_f = weight_matrix(module).shape
        ops.rank_for_ratio(out_f, in_f, settings.ratio, name)


@torch.no_grad()
def _factorize_layer(model: nn.Module, name: str, module: nn.Module,
                     settings: FactorizeOptions, act_abs_mean: torch.Tensor | None,
                     report: FactorizeReport, rank: int | None = None) -> None:
    """Replace one linear by its truncated (ASVD-scaled when ``act_abs_mean``) SVD at
    ``rank`` (default: from ``--ratio`` or ``--energy``), or keep it dense where the rank
    would not save parameters."""
    w = weight_matrix(module).float()
    out_f, in_f = w.shape
    scale = ops.asvd_scale(act_abs_mean, settings.alpha) if act_abs_mean is not None else None
    u, s, vh = ops.svd(w, scale)
    if rank is None and settings.ratio is not None:
        rank = ops.rank_for_ratio(out_f, in_f, settings.ratio, name)
    elif rank is None:
        rank = ops.rank_for_energy(s, settings.energy)
    report.dense_params += out_f * in_f
    if not ops.saves_params(out_f, in_f, rank):
        report.skipped.append(name)
        report.factored_params += out_f * in_f
        return
    a, b = ops.factors_from_svd(u, s, vh, rank, scale=scale, dtype=module.weight.dtype)
    bias = module.bias.detach() if module.bias is not None else None
    set_module(model, name, LowRankLinear.from_factors(a.to(w.device), b.to(w.device), bias))
    report.ranks[name] = rank
    report.factored_params += rank * (out_f + in_f)


@torch.no_grad()
def _global_ranks(linears: dict[str, nn.Module], settings: FactorizeOptions,
                  act_abs_means: dict[str, torch.Tensor] | None) -> dict[str, int]:
    """``--allocate global``: every layer's (scaled) spectrum, then one budget for all."""
    spectra, shapes = {}, {}
    for name, module in linears.items():
        w = weight_matrix(module).float()
        scale = (ops.asvd_scale(act_abs_means[name], settings.alpha)
                 if act_abs_means is not None else None)
        wd = w.double() * scale[None, :] if scale is not None else w.double()
        spectra[name] = torch.linalg.svdvals(wd)
        shapes[name] = tuple(w.shape)
    return ops.allocate_ranks(spectra, shapes, settings.ratio)


@torch.no_grad()
def factorize_model(model: nn.Module, tokenizer, settings: FactorizeOptions) -> FactorizeReport:
    """Factorize the targeted linears of ``model`` in place and tag its config.

    Args:
        model: a causal LM with ``nn.Linear`` layers (GPT-2 ``Conv1D`` is refused).
        tokenizer: its tokenizer (for ASVD calibration data).
        settings: see :class:`FactorizeOptions`.

    Returns:
        :class:`FactorizeReport`; ``model.config.slmkit`` records the ranks so that the
        saved dir loads through ``slmkit.load_model`` (format ``"lowrank"``).

    Raises:
        ConfigError: bad ratio/energy/method, a ratio that gives rank 0, targets that
            match nothing, Conv1D layers, or nothing worth factorizing.
    """
    from slmkit.compress.prune.modifier import refuse_compressed

    refuse_compressed(model, "factorize")
    linears = match_linears(model, settings.targets, settings.ignore)
    if not linears:
        raise ConfigError(f"--targets {settings.targets} matched no linear layer of "
                          f"{type(model).__name__}; check the regexes (e.g. 'proj').")
    conv = [n for n, m in linears.items() if is_conv1d(m)]
    if conv:
        raise ConfigError(f"'{conv[0]}' is a GPT-2 Conv1D layer, which slm factorize does not "
                          "support; use a Llama/Qwen2/Mistral-style model.")
    glob = settings.ratio is not None and settings.allocate == "global"
    if not glob:
        _check_ranks(linears, settings)
    report = FactorizeReport()
    means = _asvd_stats(model, tokenizer, linears, settings) if settings.method == "asvd" \
        else None
    ranks = _global_ranks(linears, settings, means) if glob else {}
    from slmkit.console import track

    for name, module in track(list(linears.items()), f"{settings.method} factorization"):
        _factorize_layer(model, name, module, settings,
                         means[name] if means is not None else None, report, ranks.get(name))
    if not report.ranks:
        raise ConfigError(f"No targeted layer would save parameters at --energy "
                          f"{settings.energy}; lower --energy or use --ratio.")
    model.config.slmkit = {"format": FORMAT, "method": settings.method,
                           "ranks": dict(report.ranks)}
    return report


def _asvd_stats(model, tokenizer, linears, settings) -> dict[str, torch.Tensor]:
    """``mean |X_j|`` per input feature of every targeted linear, block by block on the
    calibration windows (the dense model's activations)."""
    from slmkit.compress.calibrate import (
        calibrate_layer_by_layer,
        calibration_batches,
        capture_linear_inputs,
    )

    batches = calibration_batches(tokenizer, settings.calib_data, n_samples=settings.calib_samples,
                                  seq_len=settings.calib_seq_len, seed=settings.seed)
    means: dict[str, torch.Tensor] = {}

    def on_block(index, block_name, block, inputs):
        mine = {n: m for n, m in linears.items() if n.startswith(block_name + ".")}
        if not mine:
            return
        sums = {n: torch.zeros(weight_matrix(m).shape[1], dtype=torch.float64)
                for n, m in mine.items()}
        counts = dict.fromkeys(mine, 0)

        def collect(name: str, x: torch.Tensor) -> None:
            sums[name] += x.double().abs().sum(0).cpu()  # [tokens, in] -> [in]
            counts[name] += x.shape[0]

        with capture_linear_inputs(mine, collect):
            inputs.run(block)
        for name in mine:
            means[name] = (sums[name] / max(1, counts[name])).float()  # [in]

    calibrate_layer_by_layer(model, batches, on_block, desc="asvd statistics",
                             precision=settings.calib_precision)
    missing = [n for n in linears if n not in means]
    if missing:                        # outside the decoder blocks: no activation statistics
        raise ConfigError(f"'{missing[0]}' is outside the decoder blocks, where ASVD has no "
                          "activation statistics; --ignore it or use --method svd.")
    return means
