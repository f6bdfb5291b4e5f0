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

from slmkit.compress.calibrate import (BlockInputs, capture_linear_inputs, feed_linears,
                                      sequential_groups)
from slmkit.compress.hessian import HessianAccumulator
from slmkit.compress.match import set_weight_matrix, weight_matrix
from slmkit.compress.quantize.awq_mappings import block_mappings, fold_scale
from slmkit.compress.quantize.awq_ops import (
    awq_search_clip,
    awq_search_scale,
    candidate_scales,
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
    """

    def __init__(self, cfg: QuantizeConfig, linears: dict[str, nn.Module], model_type: str):
        self.cfg = cfg
        self.linears = linears
        self.model_type = model_type
        self.results: dict[str, QuantizedLayer] = {}

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
        w = dequantize_codes(codes, scale, zero, self.cfg.group_size)
        if input_scale is not None:
            w = w / input_scale[None, :]
        set_weight_matrix(self.linears[name], w)

    def quantize_rtn(self, name: str) -> None:
        w = weight_matrix(self.linears[name])
        self.record(name, *quantize_rtn(w, self.cfg.bits, self.cfg.group_size, self.cfg.sym))

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
    the earlier groups were quantized, then each linear of the group is quantized.
    """

    def on_block(self, index, block_name, block, inputs) -> None:
        linears = self.block_linears(block_name)
        if not linears:
            return
        cfg = self.cfg
        for group in sequential_groups(block, inputs, linears):
            # the group's linears read the very same input: one Hessian serves them all
            acc = HessianAccumulator(weight_matrix(linears[group[0]]).shape[1])
            feed_linears(block, inputs, {group[0]: linears[group[0]]},
                         lambda n, x: acc.add(x))
            for name in group:
                w = weight_matrix(linears[name])
                codes, scale, zero = gptq_quantize_weight(
                    w, acc.hessian, cfg.bits, cfg.group_size, cfg.sym, damp=cfg.damp,
                    block_size=cfg.block_size, act_order=cfg.act_order,
                    preserve_zeros=cfg.preserve_zeros)
                self.record(name, codes, scale, zero)


class AWQModifier(QuantizeModifier):
    """AWQ (Lin et al., 2023): activation-aware scales, folded where the architecture allows.

    Per block: collect a token subsample of every linear's input; for each mapping entry
    (``awq_mappings``), search the scale that minimises the error of the *block's output*
    with that entry's linears quantized (as the reference implementation inspects the
    attention or MLP module rather than each linear), and fold it into the producer;
    linears without an entry get their own scale, searched on their output and kept inside
    the quantized layer; then (optionally) search clipping ratios and round to nearest.
    """

    max_tokens = 4096
    search_batches = 8     # calibration batches the block-output search runs on (its cost)

    def _collect_inputs(self, block, inputs: BlockInputs,
                        linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        per_batch = max(1, math.ceil(self.max_tokens / max(1, len(inputs.hidden))))
        gen = torch.Generator().manual_seed(self.cfg.seed)
        xs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        picks: dict[int, torch.Tensor] = {}

        def keep(name: str, x: torch.Tensor) -> None:  # x: [tokens, in]
            n = x.shape[0]
            if n not in picks:
                picks[n] = torch.randperm(n, generator=gen)[:per_batch]
            xs[name].append(x[picks[n]].float())

        with capture_linear_inputs(linears, keep):
            inputs.run(block)
        return {n: torch.cat(v) for n, v in xs.items() if v}

    def on_block(self, index, block_name, block, inputs) -> None:
        linears = self.block_linears(block_name)
        if not linears:
            return
        cfg = self.cfg
        xs = self._collect_inputs(block, inputs, linears)
        input_scale: dict[str, torch.Tensor] = {}
        folded: set[str] = set()
        k = min(self.search_batches, len(inputs.hidden))
        probe = BlockInputs(hidden=inputs.hidden[:k], args=inputs.args[:k],
                            kwargs=inputs.kwargs[:k])
        reference = probe.run(block)                      # the block in full precision
        for producer, names in block_mappings(self.model_type, block, block_name, linears):
            ws = [weight_matrix(linears[n]).detach().clone() for n in names]
            scale = self._search_block_scale(block, probe, reference,
                                             [linears[n] for n in names], ws, xs[names[0]])
            for n, w in zip(names, ws):
                set_weight_matrix(linears[n], w)
            fold_scale(producer, [linears[n] for n in names], scale)
            for n in names:
                xs[n] = xs[n] / scale
                folded.add(n)
        for name, module in linears.items():
            if name in folded or name not in xs:
                continue
            w = weight_matrix(module)
            scale, errors = awq_search_scale(xs[name], [w], cfg.bits, cfg.group_size, cfg.sym,
                                             cfg.awq_grid)
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


    @torch.no_grad()
    def _search_block_scale(self, block: nn.Module, probe: BlockInputs,
                            reference: list[torch.Tensor], modules: list[nn.Module],
                            ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The candidate scale (``s = 1`` first) whose quantized linears, ``Q(W s) / s``,
        change the block's output the least (mean squared error over the probe batches)."""
        cfg = self.cfg
        x_mean = x.float().abs().mean(dim=0)
        w_mean = weight_channel_mean(ws, cfg.group_size)
        best, best_err = None, float("inf")
        for s in candidate_scales(x_mean, w_mean, cfg.awq_grid):
            for m, w in zip(modules, ws):
                set_weight_matrix(m, fake_quantize(w.float() * s, cfg.bits, cfg.group_size,
                                                   cfg.sym) / s)
            out = probe.run(block)
            err = sum(float(((o.float() - r.float()) ** 2).sum()) for o, r in zip(out, reference))
            if err < best_err:
                best, best_err = s, err
        return best


MODIFIERS = {"rtn": RTNModifier, "gptq": GPTQModifier, "awq": AWQModifier}
