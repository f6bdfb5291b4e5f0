"""``slm prune --method {magnitude,wanda,sparsegpt}``: unstructured and N:M pruning of a model.

State lives here (calibration hooks, per-layer statistics); the math is in ``ops.py``.

* ``magnitude`` needs no data: each targeted linear keeps its largest weights per row.
* ``wanda`` runs the model block by block on calibration data (``compress.calibrate``),
  accumulates ``||X_j||^2`` per input feature of every linear in the block, and prunes by
  ``|W| * ||X||`` per output row. Later blocks see the outputs of already-pruned blocks.
* ``sparsegpt`` uses the same block-by-block pipeline with "true sequential" groups
  (q/k/v, then o, then gate/up, then down) and the Hessian machinery shared with GPTQ
  (``compress.hessian``), then reconstructs with the OBS update in ``ops.sparsegpt_prune``.

Masks are applied as exact zeros in dense weights, so the result is a normal HF model dir
that loads in plain transformers and keeps its zeros through save/load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slmkit.compress.match import match_linears, set_weight_matrix, weight_matrix
from slmkit.compress.prune import ops
from slmkit.errors import ConfigError
from slmkit.nn.experts import fuse as fuse_experts
from slmkit.nn.experts import split as split_experts
from slmkit.compress.prune.config import PruneOptions

@dataclass
class PruneReport:
    """What was pruned: per-layer achieved sparsity and the overall figure."""

    layers: dict[str, float] = field(default_factory=dict)
    zeros: int = 0
    total: int = 0

    def add(self, name: str, w: torch.Tensor) -> None:
        z = int((w == 0).sum())
        self.layers[name] = z / w.numel()
        self.zeros += z
        self.total += w.numel()

    @property
    def overall(self) -> float:
        return self.zeros / max(1, self.total)


def refuse_compressed(model: nn.Module, verb: str) -> None:
    """Pruning and factorization work on dense weights: refuse quantized/low-rank models."""
    fmt = (getattr(model.config, "slmkit", None) or {}).get("format")
    if fmt or getattr(model.config, "quantization_config", None):
        raise ConfigError(f"This model is already compressed (format '{fmt or 'quantized'}'); "
                          f"{verb} its dense parent instead, then compress the result.")


def _select(model: nn.Module, settings: PruneOptions, nm) -> dict[str, nn.Module]:
    linears = match_linears(model, settings.targets, settings.ignore)
    if not linears:
        raise ConfigError(f"--targets {settings.targets} matched no linear layer of "
                          f"{type(model).__name__}; check the regexes (e.g. 'proj').")
    if nm is not None:
        for name, module in linears.items():
            ops.check_pattern_fits(weight_matrix(module).shape[1], nm[1], name)
    return linears


def _mask(scores: torch.Tensor, settings: PruneOptions, nm) -> torch.Tensor:
    return ops.nm_mask(scores, *nm) if nm is not None else ops.row_mask(scores, settings.sparsity)


@torch.no_grad()
def _apply(module: nn.Module, w: torch.Tensor) -> None:
    set_weight_matrix(module, w.to(module.weight.dtype))


@torch.no_grad()
def prune_model(model: nn.Module, tokenizer, settings: PruneOptions) -> PruneReport:
    """Prune ``model`` in place.

    Args:
        model: a causal LM (Llama, Qwen2, Mistral, GPT-2, ... any with linear layers).
        tokenizer: its tokenizer (for calibration data).
        settings: see :class:`PruneOptions`.

    Returns:
        :class:`PruneReport` with the achieved sparsity per targeted layer and overall.

    Raises:
        ConfigError: bad sparsity/pattern/method, a pattern that does not divide a layer,
            or targets that match nothing.
    """
    nm = settings.nm()
    refuse_compressed(model, "prune")
    # a mixture's fused experts: one linear per expert and stage while pruning (selected by
    # the patterns like any linear), fused back afterwards (still dense, now sparse)
    split_experts(model)
    try:
        return _prune_split(model, tokenizer, settings, nm)
    finally:
        fuse_experts(model)


def _prune_split(model: nn.Module, tokenizer, settings: PruneOptions, nm) -> PruneReport:
    linears = _select(model, settings, nm)
    report = PruneReport()
    if settings.method == "magnitude":
        from slmkit.console import track

        for name, module in track(list(linears.items()), "magnitude pruning"):
            w = weight_matrix(module).float()
            _apply(module, w * _mask(ops.magnitude_scores(w), settings, nm))
            report.add(name, weight_matrix(module))
        return report

    from slmkit.compress.calibrate import calibrate_layer_by_layer, calibration_batches

    batches = calibration_batches(tokenizer, settings.calib_data, n_samples=settings.calib_samples,
                                  seq_len=settings.calib_seq_len, seed=settings.seed)
    on_block = _wanda_block if settings.method == "wanda" else _sparsegpt_block

    def callback(index, block_name, block, inputs):
        mine = {n: m for n, m in linears.items() if n.startswith(block_name + ".")}
        if mine:
            on_block(mine, block, inputs, settings, nm, report)

    calibrate_layer_by_layer(model, batches, callback, desc=f"{settings.method} pruning",
                             precision=settings.calib_precision)
    return report


def _wanda_block(linears, block, inputs, settings, nm, report) -> None:
    """Wanda on one block: accumulate ``sum x_j^2`` per input feature, prune every linear."""
    sq = {n: torch.zeros(weight_matrix(m).shape[1], dtype=torch.float64)
          for n, m in linears.items()}

    def collect(name: str, x: torch.Tensor) -> None:
        sq[name] += x.double().pow(2).sum(0).cpu()  # [tokens, in] -> [in]

    from slmkit.compress.calibrate import capture_linear_inputs

    with capture_linear_inputs(linears, collect):
        inputs.run(block)
    for name, module in linears.items():
        w = weight_matrix(module).float()
        norms = sq[name].sqrt().float().to(w.device)
        # an expert no calibration token reached has no activation norms: magnitude
        scores = ops.wanda_scores(w, norms) if norms.any() else ops.magnitude_scores(w)
        _apply(module, w * _mask(scores, settings, nm))
        report.add(name, weight_matrix(module))


def _sparsegpt_block(linears, block, inputs, settings, nm, report) -> None:
    """SparseGPT on one block, group by group (true sequential)."""
    from slmkit.compress.calibrate import expert_passes, feed_linears, sequential_groups
    from slmkit.compress.hessian import HessianAccumulator

    for fed in expert_passes(sequential_groups(block, inputs, linears)):
        # a group's linears read the very same input: one Hessian and one factor serve all;
        # a mixture's experts of one stage fill theirs in one pass
        accs = {g[0]: HessianAccumulator.for_layer(linears[g[0]],
                                                   bf16=inputs.precision == "bf16")
                for g in fed}
        feed_linears(block, inputs, {g[0]: linears[g[0]] for g in fed},
                     lambda n, x: accs[n].add(x))
        for group in fed:
            _sparsegpt_group(group, linears, accs[group[0]], settings, nm, report)


def _sparsegpt_group(group, linears, acc, settings, nm, report) -> None:
    from slmkit.compress.hessian import cholesky_inverse_upper, dead_inputs

    if acc.num_tokens == 0:     # an expert no calibration token reached: magnitude
        for name in group:
            w = weight_matrix(linears[name]).float()
            _apply(linears[name], w * _mask(ops.magnitude_scores(w), settings, nm))
            report.add(name, weight_matrix(linears[name]))
        return
    h = acc.hessian
    dead = dead_inputs(h)
    hinv = cholesky_inverse_upper(h, settings.damp)
    for name in group:
        module = linears[name]
        w = weight_matrix(module).float().clone()
        w[:, dead] = 0.0  # inputs that were always zero carry no signal
        pruned, _ = ops.sparsegpt_prune(w, hinv, sparsity=settings.sparsity, nm=nm,
                                        block_size=settings.block_size)
        _apply(module, pruned)
        report.add(name, weight_matrix(module))
