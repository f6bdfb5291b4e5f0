"""``slm factorize`` as one typed config and one entry point, shared by the CLI and recipes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class FactorizeConfig(BaseModel):
    """Options of ``slm factorize`` (and of the ``factorize`` recipe step)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model dir or hub id")
    out: str | None = None
    method: Literal["svd", "asvd"] = "svd"
    ratio: float | None = None
    energy: float | None = None
    merge: bool = False
    targets: list[str] | None = None
    ignore: list[str] | None = None
    data: str = "stdlib"
    calib_samples: int = 64
    calib_seq_len: int = 256
    overwrite: bool = False


def run_factorize(cfg: FactorizeConfig) -> dict[str, Any]:
    """Factorize ``cfg.model`` (or merge a low-rank one back) into ``cfg.out``."""
    from slmkit.compress.factorize.modifier import FactorizeSettings, factorize_model
    from slmkit.errors import ConfigError
    from slmkit.models import load_model, save_model
    from slmkit.models.info import dir_size
    from slmkit.nn.lowrank import lowrank_modules, merge_lowrank

    if cfg.out is None:
        raise ConfigError("factorize needs an output directory; pass --out DIR.")
    settings = FactorizeSettings(method=cfg.method, ratio=cfg.ratio, energy=cfg.energy,
                                 targets=cfg.targets, ignore=cfg.ignore, data=cfg.data,
                                 calib_samples=cfg.calib_samples,
                                 calib_seq_len=cfg.calib_seq_len)
    net, tok = load_model(cfg.model)
    if lowrank_modules(net):
        if not cfg.merge:
            raise ConfigError(f"'{cfg.model}' is already factorized; pass --merge to turn it "
                              "back into a dense model, or factorize its dense parent.")
        n = merge_lowrank(net)
        final = save_model(net, tok, cfg.out, step="factorize-merge", overwrite=cfg.overwrite,
                           params={"merge": True})
        return {"merged_only": True, "layers_merged": n, "size_on_disk": dir_size(final),
                "out": str(final)}
    settings.validate()
    report = factorize_model(net, tok, settings)
    ranks = dict(report.ranks)
    if cfg.merge:
        merge_lowrank(net)
    params = {k: v for k, v in vars(settings).items() if v is not None}
    params["merge"] = cfg.merge
    final = save_model(net, tok, cfg.out, step="factorize", overwrite=cfg.overwrite,
                       params=params, metrics={"factored_params": report.factored_params,
                                               "dense_params": report.dense_params,
                                               "ranks": ranks})
    return {"merged_only": False, "method": settings.method, "ratio": settings.ratio,
            "energy": settings.energy, "ranks": ranks, "skipped": list(report.skipped),
            "layers_factorized": len(ranks), "factored_params": report.factored_params,
            "dense_params": report.dense_params, "size_on_disk": dir_size(final),
            "out": str(final)}
