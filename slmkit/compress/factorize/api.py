"""``slm factorize``: one config and one ``run_factorize(cfg) -> StepResult`` for the CLI,
recipes and Python."""

from __future__ import annotations

from slmkit.compress.factorize.config import FactorizeConfig
from slmkit.step import StepResult, Table


def run_factorize(cfg: FactorizeConfig) -> StepResult:
    """Factorize ``cfg.model`` (or merge a low-rank one back) into ``cfg.out``."""
    from slmkit.compress.factorize.modifier import factorize_model
    from slmkit.console import human_bytes
    from slmkit.errors import ConfigError
    from slmkit.models import load_model, save_model
    from slmkit.models.info import dir_size
    from slmkit.nn.lowrank import lowrank_modules, merge_lowrank

    cfg.check_output()
    cfg.apply_threads()
    net, tok = load_model(cfg.model)
    if lowrank_modules(net):
        if not cfg.merge:
            raise ConfigError(f"'{cfg.model}' is already factorized; pass --merge to turn it "
                              "back into a dense model, or factorize its dense parent.")
        n = merge_lowrank(net)
        final = save_model(net, tok, cfg.out, step="factorize-merge", overwrite=cfg.overwrite,
                           params={"model": cfg.model, "merge": True})
        size = dir_size(final)
        return StepResult("factorize --merge", str(final), {"size_on_disk": size}, [
            ("layers merged", n), ("size on disk", human_bytes(size)),
            ("written to", str(final))])
    report = factorize_model(net, tok, cfg)
    ranks = dict(report.ranks)
    if cfg.merge:
        merge_lowrank(net)
    metrics = {"factored_params": report.factored_params, "dense_params": report.dense_params,
               "ranks": ranks}
    final = save_model(net, tok, cfg.out, step="factorize", overwrite=cfg.overwrite,
                       params=cfg.lineage(), metrics=metrics)
    size = dir_size(final)
    rows = [("method", cfg.method),
            ("target", f"ratio {cfg.ratio}" if cfg.ratio else f"energy {cfg.energy}"),
            ("layers factorized", f"{len(ranks)} (kept dense: {len(report.skipped)})"),
            ("targeted parameters", f"{report.dense_params:,} -> {report.factored_params:,} "
                                    f"({report.factored_params / max(1, report.dense_params):.1%})"),
            ("format", "dense (merged)" if cfg.merge else "lowrank"),
            ("size on disk", human_bytes(size)), ("written to", str(final))]
    per_layer = Table("ranks per layer", [(n, r) for n, r in ranks.items()]
                      + [(n, "dense (no saving)") for n in report.skipped], ("layer", "rank"))
    return StepResult("factorize", str(final), {**metrics, "size_on_disk": size}, rows,
                      [per_layer])
