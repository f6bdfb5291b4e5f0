"""Recipe-step configs and entry points for verbs whose library config lacks input/output.

Each class here *extends* the verb's own pydantic config (same fields, same validation)
with the model it reads and the directory it writes, so a recipe step is checked exactly
like the CLI verb. Entry points return the figures the run summary shows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slmkit.compress.quantize.config import QuantizeConfig
from slmkit.eval.evaluate import EvalConfig


class TokenizerStep(BaseModel):
    """``slm tokenizer train`` options."""

    model_config = ConfigDict(extra="forbid")

    data: str | list[str] = Field(default="stdlib", description="corpus spec(s)")
    vocab_size: int = Field(default=8192, ge=300)
    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    min_frequency: int = Field(default=2, ge=1)
    out: str | None = None
    overwrite: bool = False


def run_tokenizer(cfg: TokenizerStep) -> dict[str, Any]:
    from slmkit.models.tokenizer import train_tokenizer_on_corpus

    res = train_tokenizer_on_corpus(cfg.data, cfg.vocab_size, cfg.out,
                                    val_fraction=cfg.val_fraction,
                                    min_frequency=cfg.min_frequency, overwrite=cfg.overwrite)
    out: dict[str, Any] = {"vocab_size": res["vocab_size"]}
    if res["val"]:
        out["val_bytes_per_token"] = res["val"]["bytes_per_token"]
    return out


class QuantizeStep(QuantizeConfig):
    """``slm quantize MODEL --out DIR`` options: the quantization config plus input/output."""

    model: str = Field(description="model dir or hub id to quantize")
    out: str | None = None
    overwrite: bool = False


def run_quantize(cfg: QuantizeStep) -> dict[str, Any]:
    from slmkit.compress.quantize.api import quantize

    qcfg = QuantizeConfig(**cfg.model_dump(exclude={"model", "out", "overwrite"}))
    return quantize(cfg.model, cfg.out, qcfg, overwrite=cfg.overwrite)


class ExportStep(BaseModel):
    """``slm export`` options. In a recipe the output is a directory holding the file(s):
    ``model.gguf`` (+ ``Modelfile`` with ``ollama``) or the ONNX export."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="the model to export; or pick one "
                              "with from_report")
    from_report: str | None = Field(default=None, description="a `slm compare` report dir: "
                                    "export its best model (lowest bits/byte) that fits "
                                    "max_size_mb and the format")
    max_size_mb: float | None = Field(default=None, gt=0)
    format: str = Field(default="gguf", pattern="^(gguf|onnx)$")
    quant: str | None = None
    ollama: bool = False
    int8: bool = False
    out: str | None = None
    overwrite: bool = False


def ranked_candidates(report_dir: str, max_size_mb: float | None) -> list[dict[str, Any]]:
    """Models of a compare report that loaded and fit the size budget, best bits/byte first."""
    import json
    from pathlib import Path

    from slmkit.errors import ConfigError

    path = Path(report_dir) / "results.json"
    try:
        models = json.loads(path.read_text())["models"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"'{report_dir}' is not a `slm compare` report (no readable "
                          "results.json); point from_report to a compare step.") from None
    budget = max_size_mb * 1e6 if max_size_mb else float("inf")
    ok = [m for m in models if not m.get("error") and m.get("perplexity")
          and m.get("size_on_disk", float("inf")) <= budget]
    if not ok:
        raise ConfigError(f"No model in '{report_dir}' fits {max_size_mb} MB; raise "
                          "max_size_mb or compress further.")
    return sorted(ok, key=lambda m: m["perplexity"]["bits_per_byte"])


def run_export(cfg: ExportStep) -> dict[str, Any]:
    from slmkit.errors import ConfigError, SlmError

    if (cfg.model is None) == (cfg.from_report is None):
        raise ConfigError("export needs exactly one of model or from_report.")
    if cfg.from_report is None:
        return _export_one(cfg, cfg.model)
    reasons = []
    for cand in ranked_candidates(cfg.from_report, cfg.max_size_mb):
        try:
            res = _export_one(cfg, cand["path"])
        except SlmError as e:  # e.g. a g128 int4 model GGUF cannot hold: try the next best
            reasons.append(f"{cand['label']}: {e}")
            continue
        from slmkit.console import console

        console.print(f"exported [bold]{cand['label']}[/] ({cand['size_on_disk'] / 1e6:.1f} MB, "
                      f"{cand['perplexity']['bits_per_byte']:.3f} bits/byte) → {cfg.out}")
        return {**res, "bits_per_byte": cand["perplexity"]["bits_per_byte"]}
    raise ConfigError(f"No model in '{cfg.from_report}' could be exported to {cfg.format}: "
                      + "; ".join(reasons))


def _export_one(cfg: ExportStep, model: str) -> dict[str, Any]:
    from slmkit.models.io import atomic_dir

    if cfg.format == "onnx":
        from slmkit.export.onnx_export import export_onnx

        export_onnx(model, cfg.out, int8=cfg.int8, overwrite=cfg.overwrite)
        return {}
    from slmkit.export.gguf_export import export_gguf

    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        export_gguf(model, tmp / "model.gguf", quant=cfg.quant, ollama=cfg.ollama)
        size = (tmp / "model.gguf").stat().st_size
    return {"gguf_bytes": size}


class CompareStep(BaseModel):
    """``slm compare`` options (the output is the report directory)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1)
    data: str = "stdlib"
    split: str = "val"
    val_fraction: float = 0.05
    tasks: list[str] | None = None
    task_limit: int = 100
    seq_len: int | None = None
    stride: int | None = None
    max_bytes: int = 200_000
    speed: bool = True
    decode_tokens: int = 32
    dtype: str | None = None
    device: str = "cpu"
    out: str | None = None
    overwrite: bool = False


def run_compare(cfg: CompareStep) -> dict[str, Any]:
    from slmkit.eval.compare import compare

    tasks = [t.strip() for spec in (cfg.tasks or []) for t in spec.split(",") if t.strip()]
    res = compare(cfg.models, cfg.out, data=cfg.data, split=cfg.split,
                  val_fraction=cfg.val_fraction, task_specs=tasks,
                  task_limit=cfg.task_limit or None, overwrite=cfg.overwrite,
                  seq_len=cfg.seq_len, stride=cfg.stride, max_bytes=cfg.max_bytes or None,
                  speed=cfg.speed, decode_tokens=cfg.decode_tokens, dtype=cfg.dtype,
                  device=cfg.device)
    ok = [m for m in res["models"] if not m.get("error")]
    return {"models": len(res["models"]), "failed": len(res["models"]) - len(ok)}


class EvalStep(EvalConfig):
    """``slm eval MODEL`` options: the verb's own config plus the model and output dir.

    In a recipe the output is a directory holding ``results.json`` (every figure
    ``slm eval --json`` prints) and ``slmkit.json`` (the evaluated model's lineage plus an
    ``eval`` entry whose metrics are the flat summary).
    """

    model: str = Field(description="model dir or hub id to measure")
    record: bool = Field(default=False, description="also merge the summary into the "
                         "evaluated model's own slmkit.json (off in recipes: a step never "
                         "modifies another step's output)")
    out: str | None = None
    overwrite: bool = False


def run_eval(cfg: EvalStep) -> dict[str, Any]:
    """Evaluate ``cfg.model`` and write ``results.json`` + ``slmkit.json`` into ``cfg.out``.

    Returns:
        The headline figures: ``ppl``, ``bits_per_byte``, ``decode_tok_s``, one
        ``"<task>:<metric>"`` score per task and their mean as ``task_score``.
    """
    import json
    import os

    from slmkit.console import console, print_table
    from slmkit.errors import ConfigError
    from slmkit.eval.evaluate import evaluate_with, result_rows
    from slmkit.models.io import atomic_dir, prepare_out_dir
    from slmkit.models.lineage import make_record, write_record

    if cfg.out is None:
        raise ConfigError("the eval step needs an output directory (out).")
    _, tmp = prepare_out_dir(cfg.out, cfg.overwrite)  # fail fast on an existing output
    os.rmdir(tmp)
    res = evaluate_with(cfg.model, cfg)
    lineage = res.pop("lineage")
    params = cfg.model_dump(exclude={"out", "overwrite"})
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp_dir:
        (tmp_dir / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n",
                                              encoding="utf-8")
        write_record(tmp_dir, make_record("eval", params, res["summary"], lineage))
    print_table(f"eval {cfg.model}", result_rows(res))
    console.print(f"[dim]results: {cfg.out}/results.json[/dim]")
    return eval_figures(res)


def eval_figures(res: dict[str, Any]) -> dict[str, Any]:
    """The flat figures of an ``evaluate_model`` result that a run summary shows."""
    figures: dict[str, Any] = {}
    ppl = res.get("perplexity")
    if ppl:
        figures.update(ppl=ppl["ppl"], bits_per_byte=ppl["bits_per_byte"])
    scores = {f"{name}:{t['metric']}": t["score"] for name, t in (res.get("tasks") or {}).items()}
    if scores:
        figures["task_score"] = sum(scores.values()) / len(scores)
        figures.update(scores)
    if (res.get("speed") or {}).get("decode_tok_s"):
        figures["decode_tok_s"] = res["speed"]["decode_tok_s"]
    for key in ("params", "size_on_disk"):
        if res.get(key) is not None:
            figures[key] = res[key]
    return figures
