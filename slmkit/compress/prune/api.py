"""``slm prune``: one config and one ``run_prune(cfg) -> StepResult`` for the CLI, recipes
and Python.

Unstructured / N:M pruning (:func:`~slmkit.compress.prune.modifier.prune_model`) keeps the
model's shape and zeros weights; ``structured`` (:func:`~slmkit.compress.prune.structured.
structured_prune`) writes a smaller dense model. Both calibrate on the shared block.
"""

from __future__ import annotations

from slmkit.compress.prune.config import PruneConfig
from slmkit.step import StepResult, Table


def run_prune(cfg: PruneConfig) -> StepResult:
    """Prune ``cfg.model`` into ``cfg.out``."""
    from slmkit.models import load_model

    cfg.check_output()
    cfg.apply_threads()
    net, tok = load_model(cfg.model)
    return _structured(cfg, net, tok) if cfg.structured else _unstructured(cfg, net, tok)


def _structured(cfg: PruneConfig, net, tok) -> StepResult:
    from slmkit.compress.prune.structured import decode_speeds, structured_prune
    from slmkit.console import human_bytes
    from slmkit.models import save_model
    from slmkit.models.info import dir_size

    result = structured_prune(net, tok, cfg)
    metrics = {**result.metrics(), **decode_speeds(net, result.model, tok)}
    final = save_model(result.model, tok, cfg.out, step="prune", overwrite=cfg.overwrite,
                       params=cfg.lineage(), metrics=metrics)
    size = dir_size(final)
    rows = [("parameters", f"{result.params_before:,} -> {result.params_after:,} "
                           f"({result.params_after / result.params_before:.1%})"),
            ("calibration loss", f"{result.loss_before:.3f} -> {result.loss_after:.3f} "
                                 "(before any retraining)")]
    if result.candidates > 1:
        rows.append(("split", f"best of {result.candidates} by calibration loss"))
    if "decode_tok_s" in metrics:
        rows.append(("decode tok/s", f"{metrics['decode_tok_s_before']:.1f} -> "
                                     f"{metrics['decode_tok_s']:.1f} "
                                     f"(x{metrics['decode_speedup']:.2f})"))
    rows += [("size on disk", human_bytes(size)), ("written to", str(final))]
    return StepResult("prune --structured", str(final), {**metrics, "size_on_disk": size},
                      rows, [Table("removed", result.removed_rows(),
                                   ("part", "before", "after", "removed"))])


def _unstructured(cfg: PruneConfig, net, tok) -> StepResult:
    from slmkit.compress.prune.modifier import prune_model
    from slmkit.console import human_bytes
    from slmkit.models import save_model
    from slmkit.models.info import dir_size

    report = prune_model(net, tok, cfg)
    state, compact = None, {}
    if cfg.compact:
        from slmkit.compress.prune import nm_format

        nm = cfg.nm()
        from slmkit.nn.experts import CHILD

        # a mixture's experts are fused 3-D tensors again: they stay in that (dense) layout
        state, compact = nm_format.compact_state_dict(
            net, [n for n in report.layers if not CHILD.match(n)], *nm)
        net.config.slmkit = {"format": nm_format.FORMAT, "pattern": f"{nm[0]}:{nm[1]}",
                             "layers": compact}
    metrics = {"sparsity": round(report.overall, 6),
               "layer_sparsity": {k: round(v, 6) for k, v in report.layers.items()}}
    try:
        final = save_model(net, tok, cfg.out, step="prune", overwrite=cfg.overwrite,
                           params=cfg.lineage(), state_dict=state, metrics=metrics)
    finally:
        if cfg.compact:
            del net.config.slmkit
    size = dir_size(final)
    method = cfg.method + (f" {cfg.pattern}" if cfg.pattern else "")
    rows = [("method", method), ("layers pruned", len(report.layers)),
            ("sparsity (pruned layers)", f"{report.overall:.1%}"),
            ("zeros", f"{report.zeros:,} of {report.total:,}"),
            *([("compact storage", f"{len(compact)} layers (values + bit mask)")]
              if compact else []),
            ("size on disk", human_bytes(size)), ("written to", str(final))]
    per_layer = Table("achieved sparsity per layer",
                      [(n, f"{v:.1%}") for n, v in report.layers.items()], ("layer", "sparsity"))
    return StepResult("prune", str(final), {**metrics, "sparsity": report.overall,
                                            "compact_layers": len(compact),
                                            "size_on_disk": size}, rows, [per_layer])
