"""Quantization modifiers: the stateful side (hooks, accumulators, per-block order).

Each modifier quantizes the selected linears of a model and records, per linear, the codes
and grid (:class:`QuantizedLayer`). While calibrating, a quantized linear keeps a *dense*
weight equal to its dequantized value ("fake quantization"), so the next group and the
next block see exactly the quantized model's activations. :func:`~slmkit.compress.
quantize.api.quantize_model` swaps in :class:`~slmkit.nn.quant_linear.QuantLinear` at the
end. The math lives in ``ops.py``, ``gptq_ops.py`` and ``awq_ops.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slmkit.compress.calibrate import (BlockInputs, capture_linear_inputs, expert_passes,
                                      feed_linears, sequential_groups)
from slmkit.compress.hessian import HessianAccumulator
from slmkit.compress.match import set_weight_matrix, weight_matrix
from slmkit.compress.quantize.awq_mappings import block_mappings, fold_scale
from slmkit.compress.quantize.awq_ops import (
    awq_search_clip,
    awq_search_scale,
    candidate_scales,
    subsample_tokens,
    weight_channel_mean,
)
from slmkit.compress.quantize.config import QuantizeConfig
from slmkit.compress.quantize.gptq_ops import gptq_quantize_weight
from slmkit.compress.quantize.ops import fake_quantize
from slmkit.nn.packing import dequantize_codes, quantize_rtn


@dataclass
class QuantizedLayer:
    """One quantized linear: codes ``[out, in]`` uint8, grid ``[out, G]``, optional AWQ
    ``input_scale`` ``[in]`` (the layer computes ``Ŵ (x / input_scale)``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    input_scale: torch.Tensor | None = None


class QuantizeModifier:
    """Base class: holds the config, the selected linears and the results so far.

    Args:
        cfg: the run's options.
        linears: ``{full_name: module}`` from ``match_linears``.
        model_type: ``config.model_type`` (AWQ's mapping table key).
        grids: per-layer ``(bits, group_size)`` that replace ``cfg``'s grid for those layers
            (a mixed-precision model, as ``slm search`` writes; RTN and GPTQ only).
    """

    def __init__(self, cfg: QuantizeConfig, linears: dict[str, nn.Module], model_type: str,
                 grids: dict[str, tuple[int, int]] | None = None):
        self.cfg = cfg
        self.linears = linears
        self.model_type = model_type
        self.grids = dict(grids or {})
        self.results: dict[str, QuantizedLayer] = {}

    def grid(self, name: str) -> tuple[int, int]:
        """``(bits, group_size)`` of layer ``name``."""
        return self.grids.get(name, (self.cfg.bits, self.cfg.group_size))

    def block_linears(self, block_name: str) -> dict[str, nn.Module]:
        prefix = block_name + "."
        return {n: m for n, m in self.linears.items() if n.startswith(prefix)}

    def record(self, name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               input_scale: torch.Tensor | None = None) -> None:
        """Store the result and, when later blocks are calibrated on this block's quantized
        outputs (GPTQ, AWQ), set the module's dense weight to its dequantized value. Plain
        RTN reads no activations, so it skips that fp32 copy (the size of the model)."""
        self.results[name] = QuantizedLayer(codes, scale, zero, input_scale)
        if not self.cfg.needs_calibration:
            return
        w = dequantize_codes(codes, scale, zero, self.grid(name)[1])
        if input_scale is not None:
            w = w / input_scale[None, :]
        set_weight_matrix(self.linears[name], w)

    def quantize_rtn(self, name: str) -> None:
        w = weight_matrix(self.linears[name])
        bits, group_size = self.grid(name)
        self.record(name, *quantize_rtn(w, bits, group_size, self.cfg.sym))

    def quantize_remaining(self) -> None:
        """RTN for selected linears that no block callback reached (outside the blocks)."""
        for name in self.linears:
            if name not in self.results:
                self.quantize_rtn(name)

    def on_block(self, index: int, block_name: str, block: nn.Module,
                 inputs: BlockInputs) -> None:
        raise NotImplementedError


class RTNModifier(QuantizeModifier):
    """Round to nearest, per channel or per group: no calibration data."""

    def on_block(self, index, block_name, block, inputs) -> None:
        for name in self.block_linears(block_name):
            self.quantize_rtn(name)


class GPTQModifier(QuantizeModifier):
    """GPTQ (Frantar et al., 2022) with true-sequential order inside each block.

    For each group of linears sharing an input (q/k/v, then o, then gate/up, then down),
    the block is re-run on its calibration inputs to collect the group's Hessians *after*
    the earlier groups were quantized, then each linear of the group is quantized. With
    ``true_sequential`` off, one pass collects every group's Hessian from the unquantized
    block (what llm-compressor's GPTQ does), about 0.45 block passes fewer.
    """

    def on_block(self, index, block_name, block, inputs) -> None:
        linears = self.block_linears(block_name)
        if not linears:
            return
        cfg = self.cfg
        groups = sequential_groups(block, inputs, linears)
        heads = {g[0]: linears[g[0]] for g in groups}
        # the linears of a group read the very same input: one Hessian serves them all
        accs = {n: HessianAccumulator(weight_matrix(m).shape[1],
                                      bf16=inputs.precision == "bf16")
                for n, m in heads.items()}
        if not cfg.true_sequential:   # every group's Hessian from one pass over the block
            feed_linears(block, inputs, heads, lambda n, x: accs[n].add(x))
        for fed in expert_passes(groups):
            if cfg.true_sequential:   # after the groups before them were quantized
                feed_linears(block, inputs, {g[0]: heads[g[0]] for g in fed},
                             lambda n, x: accs[n].add(x))
            for group in fed:
                self._solve(group, linears, accs[group[0]])

    def _solve(self, group: list[str], linears: dict[str, nn.Module], acc) -> None:
        cfg = self.cfg
        if acc.num_tokens == 0:     # an expert no calibration token was routed to
            for name in group:
                self.quantize_rtn(name)
            return
        # GPTQ treats every output row on its own given the shared Hessian, so the
        # group's linears on one grid are stacked row-wise and solved in one call (same
        # codes, fewer trips through the column loop)
        for grid in dict.fromkeys(self.grid(name) for name in group):
            names = [name for name in group if self.grid(name) == grid]
            ws = [weight_matrix(linears[name]) for name in names]
            codes, scale, zero = gptq_quantize_weight(
                torch.cat(ws), acc.hessian, *grid, cfg.sym, damp=cfg.damp,
                block_size=cfg.block_size, act_order=cfg.act_order,
                preserve_zeros=cfg.preserve_zeros, clip_search=cfg.gptq_clip)
            rows = [w.shape[0] for w in ws]
            for name, c, sc, z in zip(names, codes.split(rows), scale.split(rows),
                                      zero.split(rows)):
                self.record(name, c, sc, z)


class AWQModifier(QuantizeModifier):
    """AWQ (Lin et al., 2023): activation-aware scales, folded where the architecture allows.

    Per block, as the reference implementation does:

    1. one pass over every calibration batch (in the calibration precision) collects a
       token subsample of each linear's input; its outputs, from the full-precision block,
       are the next block's inputs (scaling does not change the block's function, and the
       weights are quantized only after the search);
    2. for each mapping entry (``awq_mappings``) the scale is searched on the module that
       holds the entry's linears (the attention for q/k/v, the MLP for gate/up, the linear
       itself for o/down): candidates ``Q(W s) / s`` are scored by that module's output
       error against full precision. A token-wise module (an MLP) is scored on
       ``search_tokens`` sampled tokens, a sequence-mixing one (attention) on the first
       calibration batch; the best scale is folded into the producer;
    3. linears without an entry get their own scale, searched on their own output and kept
       inside the quantized layer; then (optionally) clipping ratios; round to nearest.
    """

    max_tokens = 4096       # per-linear input subsample: channel statistics, clipping
    search_tokens = 1024    # tokens each candidate scale is scored on (attention: whole
                            # sequences of the first batch, about this many tokens)

    def _collect(self, block, inputs: BlockInputs, linears: dict[str, nn.Module]
                 ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """One pass: each linear's sampled inputs, and the block's outputs per batch."""
        per_batch = max(1, math.ceil(self.max_tokens / max(1, len(inputs.hidden))))
        gen = torch.Generator().manual_seed(self.cfg.seed)
        xs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        picks: dict[int, torch.Tensor] = {}

        def keep(name: str, x: torch.Tensor) -> None:  # x: [tokens, in]
            n = x.shape[0]
            if n not in picks:
                picks[n] = torch.randperm(n, generator=gen)[:per_batch]
            xs[name].append(x[picks[n]].float())

        outputs = []
        with capture_linear_inputs(linears, keep):
            for i in range(len(inputs.hidden)):
                picks.clear()
                out = inputs.forward(block, i)
                outputs.append((out[0] if isinstance(out, (tuple, list)) else out).float())
        return {n: torch.cat(v) for n, v in xs.items() if v}, outputs

    @staticmethod
    def _capture_calls(block, probe: BlockInputs, modules: list[nn.Module]) -> dict[int, tuple]:
        """``{id(module): (args, kwargs, output)}`` of each module's call on ``probe``."""
        calls: dict[int, tuple] = {}

        def hook(module, args, kwargs, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            calls[id(module)] = (args, kwargs, out.detach().float())

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
        try:
            probe.forward(block, 0)
        finally:
            for h in handles:
                h.remove()
        return calls

    def on_block(self, index, block_name, block, inputs):
        linears = self.block_linears(block_name)
        if not linears:
            return None
        cfg = self.cfg
        mappings = block_mappings(self.model_type, block, block_name, linears)
        scopes = [_scope(block, block_name, names) for _, names in mappings]
        xs, outputs = self._collect(block, inputs, linears)
        mixing = [m for m in {id(m): m for m in scopes}.values() if _mixes_tokens(m, block)]
        seq_len = inputs.hidden[0].shape[1]
        probe = inputs.first_sequences(max(1, self.search_tokens // seq_len))
        probe.precision = "fp32"
        calls = self._capture_calls(block, probe, mixing) if mixing else {}
        sample = {n: subsample_tokens(x, self.search_tokens, cfg.seed) for n, x in xs.items()}
        input_scale: dict[str, torch.Tensor] = {}
        folded: set[str] = set()
        for (producer, names), scope in zip(mappings, scopes):
            modules = [linears[n] for n in names]
            ws = [weight_matrix(m).detach().clone() for m in modules]
            if len(names) == 1 and scope is modules[0]:
                scale, _ = awq_search_scale(sample[names[0]], ws, cfg.bits, cfg.group_size,
                                            cfg.sym, cfg.awq_grid, x_mean=_abs_mean(xs[names[0]]))
            else:
                if id(scope) in calls:
                    args, kwargs, reference = calls[id(scope)]
                else:   # token-wise (an MLP): a token sample of its input is enough
                    args = (sample[names[0]][None],)
                    kwargs, reference = {}, None
                scale = self._search_module_scale(scope, args, kwargs, reference, modules, ws,
                                                  xs[names[0]])
                for m, w in zip(modules, ws):
                    set_weight_matrix(m, w)
            fold_scale(producer, modules, scale)
            for n in names:
                xs[n] = xs[n] / scale
                sample[n] = sample[n] / scale
                folded.add(n)
        for name, module in linears.items():
            if name in folded or name not in xs:
                continue
            w = weight_matrix(module)
            scale, errors = awq_search_scale(sample[name], [w], cfg.bits, cfg.group_size,
                                             cfg.sym, cfg.awq_grid, x_mean=_abs_mean(xs[name]))
            if not torch.all(scale == 1):
                set_weight_matrix(module, w * scale[None, :])
                input_scale[name] = scale
                xs[name] = xs[name] / scale
        for name, module in linears.items():
            w = weight_matrix(module).detach().float()
            clip = 1.0
            if cfg.awq_clip and name in xs:
                clip = awq_search_clip(xs[name], w, cfg.bits, cfg.group_size, cfg.sym)
            codes, scale, zero = quantize_rtn(w, cfg.bits, cfg.group_size, cfg.sym, clip)
            self.record(name, codes, scale, zero, input_scale.get(name))
        return outputs

    @torch.no_grad()
    def _search_module_scale(self, scope: nn.Module, args: tuple, kwargs: dict,
                             reference: torch.Tensor | None, modules: list[nn.Module],
                             ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The candidate scale (``s = 1`` first) whose quantized linears, ``Q(W s) / s``,
        change ``scope``'s output on ``args``/``kwargs`` the least (mean squared error)."""
        cfg = self.cfg

        def run() -> torch.Tensor:
            out = scope(*args, **kwargs)
            return (out[0] if isinstance(out, (tuple, list)) else out).float()

        if reference is None:
            reference = run()
        x_mean = _abs_mean(x)
        w_mean = weight_channel_mean(ws, cfg.group_size)
        best, best_err = None, float("inf")
        for s in candidate_scales(x_mean, w_mean, cfg.awq_grid):
            for m, w in zip(modules, ws):
                set_weight_matrix(m, fake_quantize(w.float() * s, cfg.bits, cfg.group_size,
                                                   cfg.sym) / s)
            err = float(((run() - reference) ** 2).mean())
            if err < best_err:
                best, best_err = s, err
        return best


def _abs_mean(x: torch.Tensor) -> torch.Tensor:
    """``[in]`` mean ``|x|`` per input channel over the collected tokens."""
    return x.float().abs().mean(dim=0)


def _scope(block: nn.Module, block_name: str, names: list[str]) -> nn.Module:
    """The innermost submodule of ``block`` holding every one of ``names`` (full names)."""
    parts = [n[len(block_name) + 1:].split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return block.get_submodule(".".join(common)) if common else block


def _mixes_tokens(module: nn.Module, block: nn.Module) -> bool:
    """Whether ``module``'s output at one token depends on other tokens (attention, or the
    whole block); token-wise modules (MLPs, single linears) can be scored on a token
    sample."""
    if module is block:
        return True
    if isinstance(module, nn.Linear):
        return False
    return any("attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower()
               for m in module.modules())


MODIFIERS = {"rtn": RTNModifier, "gptq": GPTQModifier, "awq": AWQModifier}
