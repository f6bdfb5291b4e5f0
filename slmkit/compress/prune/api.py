"""``slm prune`` as one typed config and one entry point, shared by the CLI and recipes.

The entry point loads the model, runs unstructured / N:M pruning (:func:`prune_model`) or
structured pruning (:func:`structured_prune`), saves the result with lineage, and returns
its figures plus the rows the CLI prints.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PruneConfig(BaseModel):
    """Options of ``slm prune`` (and of the ``prune`` recipe step)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model dir or hub id")
    out: str | None = None
    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None
    compact: bool = False
    structured: bool = False
    target_params: float | None = None
    heads: int | None = None
    mlp_channels: int | None = None
    hidden: int | None = None
    drop_layers: int | None = None
    targets: list[str] | None = None
    ignore: list[str] | None = None
    data: str = "stdlib"
    calib_samples: int | None = Field(default=None, description="default 32 structured, 64 "
                                      "otherwise")
    calib_seq_len: int = 256
    damp: float = 0.01
    overwrite: bool = False


def run_prune(cfg: PruneConfig) -> dict[str, Any]:
    """Prune ``cfg.model`` into ``cfg.out``; returns figures and printable rows."""
    from slmkit.errors import ConfigError
    from slmkit.models import load_model, save_model
    from slmkit.models.info import dir_size

    if cfg.out is None:
        raise ConfigError("prune needs an output directory; pass --out DIR.")
    if cfg.compact and cfg.structured:
        raise ConfigError("--compact stores N:M-sparse layers, and --structured makes a smaller "
                          "dense model; drop one of them.")
    if cfg.structured:
        from slmkit.compress.prune.structured import (
            StructuredSettings,
            decode_speeds,
            structured_prune,
        )

        st = StructuredSettings(target_params=cfg.target_params, heads=cfg.heads,
                                mlp_channels=cfg.mlp_channels, hidden=cfg.hidden,
                                drop_layers=cfg.drop_layers, data=cfg.data,
                                calib_samples=cfg.calib_samples or 32,
                                calib_seq_len=cfg.calib_seq_len)
        st.validate_shape_free()
        net, tok = load_model(cfg.model)
        result = structured_prune(net, tok, st)
        speed = decode_speeds(net, result.model, tok)
        metrics = {**result.metrics(), **speed}
        final = save_model(result.model, tok, cfg.out, step="prune", overwrite=cfg.overwrite,
                           params={"structured": True, **st.as_dict()}, metrics=metrics)
        return {**metrics, "params_before": result.params_before,
                "params_after": result.params_after, "loss_before": result.loss_before,
                "loss_after": result.loss_after, "candidates": result.candidates,
                "removed_rows": result.removed_rows(), "size_on_disk": dir_size(final),
                "out": str(final)}

    from slmkit.compress.prune.modifier import PruneSettings, prune_model

    settings = PruneSettings(method=cfg.method, sparsity=cfg.sparsity, pattern=cfg.pattern,
                             targets=cfg.targets, ignore=cfg.ignore, data=cfg.data,
                             calib_samples=cfg.calib_samples or 64,
                             calib_seq_len=cfg.calib_seq_len, damp=cfg.damp)
    nm = settings.validate()
    if cfg.compact and nm is None:
        raise ConfigError("--compact stores N:M-sparse layers; add --pattern (e.g. 2:4) or "
                          "drop --compact.")
    net, tok = load_model(cfg.model)
    report = prune_model(net, tok, settings)
    params = {k: v for k, v in vars(settings).items() if v is not None}
    if settings.method == "magnitude":
        for k in ("data", "calib_samples", "calib_seq_len", "damp", "block_size", "seed"):
            params.pop(k, None)
    state, compact = None, {}
    if cfg.compact:
        from slmkit.compress.prune import nm_format

        state, compact = nm_format.compact_state_dict(net, list(report.layers), *nm)
        net.config.slmkit = {"format": nm_format.FORMAT, "pattern": f"{nm[0]}:{nm[1]}",
                             "layers": compact}
        params["compact"] = True
    try:
        final = save_model(net, tok, cfg.out, step="prune", overwrite=cfg.overwrite,
                           params=params, state_dict=state,
                           metrics={"sparsity": round(report.overall, 6),
                                    "layer_sparsity": {k: round(v, 6)
                                                       for k, v in report.layers.items()}})
    finally:
        if cfg.compact:
            del net.config.slmkit
    return {"compact_layers": len(compact), "sparsity": report.overall, "layers_pruned": len(report.layers),
            "zeros": report.zeros, "total": report.total, "layer_sparsity": report.layers,
            "method": settings.method + (f" {settings.pattern}" if settings.pattern else ""),
            "size_on_disk": dir_size(final), "out": str(final)}
