"""``slm export``: one config and one ``run_export(cfg) -> StepResult`` for the CLI,
recipes and Python.

GGUF goes to a ``.gguf`` file, or, when ``--out`` is a directory (always in a recipe), to
``DIR/model.gguf`` (+ ``DIR/Modelfile`` with ``--ollama``). ONNX goes to a directory.
``--from-report`` picks the best model of a ``slm compare`` report that fits
``--max-size-mb`` and can be exported, instead of naming one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from slmkit.errors import ConfigError
from slmkit.step import StepConfig, StepResult, cli


class ExportConfig(StepConfig):
    """Options of ``slm export`` and the ``export`` recipe step."""

    model: str | None = Field(default=None, description="Model directory or hub id (or pick "
                              "one with --from-report).", json_schema_extra=cli(argument=True))
    format: Literal["gguf", "onnx"] = Field(description="gguf (llama.cpp, Ollama) or onnx "
                                            "(ONNX Runtime).", json_schema_extra=cli(short="-f"))
    out: str | None = Field(default=None, description="GGUF: a .gguf file, or a directory "
                            "that gets model.gguf; ONNX: a directory.",
                            json_schema_extra=cli(short="-o"))
    quant: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"] | None = Field(
        default=None, description="GGUF tensor type (default f16). Models from `slm quantize` "
        "keep their calibrated g32 blocks; --quant sets their other matrices.")
    ollama: bool = Field(default=False, description="GGUF: also write a Modelfile for "
                         "`ollama create`.")
    int8: bool = Field(default=False, description="ONNX: ONNX Runtime dynamic int8 "
                       "quantization of the matrices.")
    from_report: str | None = Field(default=None, description="A `slm compare` report dir: "
                                    "export its best model (lowest bits/byte) that fits "
                                    "--max-size-mb and the format.")
    max_size_mb: float | None = Field(default=None, gt=0, description="With --from-report: "
                                      "the size budget on disk.")

    @model_validator(mode="after")
    def _consistent(self) -> "ExportConfig":
        if (self.model is None) == (self.from_report is None):
            raise ValueError("export needs exactly one of MODEL or --from-report")
        if self.max_size_mb is not None and self.from_report is None:
            raise ValueError("--max-size-mb applies to --from-report; drop it or add a report")
        if self.format == "gguf" and self.int8:
            raise ValueError("--int8 is an ONNX option; for GGUF use --quant q8_0")
        if self.format == "onnx" and (self.quant or self.ollama):
            raise ValueError("--quant and --ollama are GGUF options; for ONNX use --int8")
        return self


def ranked_candidates(report_dir: str, max_size_mb: float | None) -> list[dict[str, Any]]:
    """Models of a compare report that loaded and fit the size budget, best bits/byte first."""
    import json
    from pathlib import Path

    path = Path(report_dir) / "results.json"
    try:
        models = json.loads(path.read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"'{report_dir}' is not a `slm compare` report (no readable "
                          "results.json); point --from-report to a compare output.") from None
    budget = max_size_mb * 1e6 if max_size_mb else float("inf")
    ok = [m for m in models if not m.get("error") and m.get("perplexity")
          and m.get("size_on_disk", float("inf")) <= budget]
    if not ok:
        raise ConfigError(f"No model in '{report_dir}' fits {max_size_mb} MB; raise "
                          "--max-size-mb or compress further.")
    return sorted(ok, key=lambda m: m["perplexity"]["bits_per_byte"])


def run_export(cfg: ExportConfig) -> StepResult:
    """Export ``cfg.model`` (or the best model of ``cfg.from_report``) to ``cfg.out``."""
    from slmkit.errors import SlmError

    cfg.output()
    cfg.apply_threads()
    if cfg.from_report is None:
        return _export_one(cfg, cfg.model)
    reasons = []
    for cand in ranked_candidates(cfg.from_report, cfg.max_size_mb):
        try:
            res = _export_one(cfg, cand["path"])
        except SlmError as e:  # e.g. a g128 int4 model GGUF cannot hold: try the next best
            reasons.append(f"{cand['label']}: {e}")
            continue
        bpb = cand["perplexity"]["bits_per_byte"]
        res.figures["bits_per_byte"] = bpb
        res.rows.insert(0, ("picked", f"{cand['label']} ({cand['size_on_disk'] / 1e6:.1f} MB, "
                                      f"{bpb:.3f} bits/byte) from {cfg.from_report}"))
        return res
    raise ConfigError(f"No model in '{cfg.from_report}' could be exported to {cfg.format}: "
                      + "; ".join(reasons))


def _export_one(cfg: ExportConfig, model: str) -> StepResult:
    from pathlib import Path

    if cfg.format == "onnx":
        from slmkit.export.onnx_export import export_onnx

        res = export_onnx(model, cfg.out, int8=cfg.int8, overwrite=cfg.overwrite)
        return StepResult("export --format onnx", cfg.out, {}, res.rows())
    from slmkit.export.gguf_export import export_gguf

    if cfg.out.endswith(".gguf"):
        res = export_gguf(model, cfg.out, quant=cfg.quant, ollama=cfg.ollama,
                          overwrite=cfg.overwrite)
        return StepResult("export --format gguf", cfg.out,
                          {"gguf_bytes": Path(cfg.out).stat().st_size}, res.rows())
    from slmkit.models.io import atomic_dir

    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        res = export_gguf(model, tmp / "model.gguf", quant=cfg.quant, ollama=cfg.ollama)
        size = (tmp / "model.gguf").stat().st_size
        rows = [(k, v.replace(str(tmp), cfg.out) if isinstance(v, str) else v)
                for k, v in res.rows()]
    return StepResult("export --format gguf", cfg.out, {"gguf_bytes": size}, rows)
