"""``slm compare``: several models side by side, on the same text and the same task items.

Every model is measured by :func:`slmkit.eval.evaluate.evaluate_model` with one shared set
of documents (cut to the same byte budget, so bits per byte compare across tokenizers) and
one shared set of task items. Every model is checked before any work (it exists, its
config, weights and tokenizer open and agree): one that cannot be loaded is refused with a
:class:`~slmkit.errors.ModelLoadError` naming it, and nothing is written. A model that then
fails inside slmkit while it runs (a bug, not the input) keeps its row, with its error, and
the others still run. The report directory is written atomically::

    REPORT_DIR/results.json            every figure of every model (machine-readable)
    REPORT_DIR/report.md               the table and the lineage, for a terminal or a PR
    REPORT_DIR/report.html             self-contained page (plots inlined) for a browser
    REPORT_DIR/quality_vs_size.png     bits/byte vs size on disk, Pareto front marked
    REPORT_DIR/quality_vs_speed.png    bits/byte vs decode tokens/s, Pareto front marked
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from slmkit.errors import ConfigError, SlmError
from slmkit.eval.evaluate import EvalOptions
from slmkit.step import StepConfig, StepResult, Table, cli


def model_labels(refs: list[str]) -> list[str]:
    """Short unique labels: the directory name, with parents added until they differ."""
    parts = [Path(os.fspath(r).rstrip("/")).parts or (os.fspath(r),) for r in refs]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    seen: dict[str, int] = {}
    out = []
    for label in labels:  # the same model twice: number the repeats
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def compare(refs: list[str], out: str | os.PathLike, data: Any = "stdlib", split: str = "val",
            val_fraction: float = 0.05, task_specs: list[str] | None = None,
            task_limit: int | None = 100, overwrite: bool = False,
            **eval_options: Any) -> dict[str, Any]:
    """Evaluate every model on the same data and write the report directory.

    Args:
        refs: model dirs or hub ids (at least one).
        out: report directory to create (atomically; must not exist unless ``overwrite``).
        data, split, val_fraction: perplexity text and the corpus split tasks are mined from.
        task_specs: task names / JSONL files (see :func:`slmkit.eval.evaluate.resolve_tasks`).
        task_limit: items per task.
        overwrite: replace ``out`` if it exists.
        **eval_options: passed to ``evaluate_model`` (``seq_len``, ``stride``, ``max_bytes``,
            ``max_tokens``, ``speed``, ``decode_tokens``, ``dtype``, ``device``).

    Returns:
        The results dict also written to ``results.json``.

    Raises:
        OutputError: ``out`` cannot be written (checked first).
        ModelLoadError: a model is missing or cannot be opened (checked before any model
            runs); any other SlmError a model's evaluation raises. Nothing is written then.
    """
    from slmkit.console import log
    from slmkit.eval.evaluate import DEFAULT_MAX_BYTES, evaluate_model, resolve_tasks
    from slmkit.eval.perplexity import load_texts
    from slmkit.eval.report import write_report
    from slmkit.models.io import atomic_dir, check_loadable, prepare_out_dir
    from slmkit.models.lineage import utc_now

    if not refs:
        raise ConfigError("slm compare needs at least one model directory.")
    # fail on a bad --out, then on a model that cannot be loaded, before spending minutes
    # on the others
    final, tmp = prepare_out_dir(out, overwrite)
    os.rmdir(tmp)
    for ref in refs:
        check_loadable(ref)
    max_bytes = eval_options.pop("max_bytes", DEFAULT_MAX_BYTES)
    docs = load_texts(data, split, val_fraction, max_bytes)  # the same text for all models
    tasks = resolve_tasks(task_specs, data, split, val_fraction, task_limit)
    labels = model_labels([os.fspath(r) for r in refs])
    rows: list[dict[str, Any]] = []
    for label, ref in zip(labels, refs):
        log.info("evaluating %s", ref)
        try:
            res = evaluate_model(ref, data=docs, split=split, val_fraction=val_fraction,
                                 tasks=tasks, max_bytes=None, record=False, **eval_options)
            res["summary"]["eval_data"] = data if isinstance(data, (str, list)) else "custom"
            res["error"] = None
        except SlmError:
            raise  # the user's input (the model, an option): refused, nothing written
        except Exception as e:  # a bug in slmkit (e.g. a format loader) must not sink the
            log.warning("%s failed: %s: %s", ref, type(e).__name__, e)  # others' results
            res = {"model": os.fspath(ref), "error": f"{type(e).__name__}: {e}"}
        res["label"] = label
        rows.append(res)
    results = {
        "created_utc": utc_now(),
        "data": data if isinstance(data, (str, list)) else "custom",
        "split": split, "val_fraction": val_fraction,
        "text_bytes": sum(len(t.encode("utf-8")) for _, t in docs),
        "documents": len(docs),
        "tasks": {name: {"n": len(items), "type": items[0]["type"],
                         "metric": items[0].get("metric", "acc")}
                  for name, items in tasks.items()},
        "models": rows,
    }
    with atomic_dir(out, overwrite=overwrite) as tmp_dir:
        (tmp_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n",
                                              encoding="utf-8")
        write_report(results, tmp_dir)
    results["out"] = str(final)
    return results


# --------------------------------------------------------------------------- the `compare` step

class CompareConfig(StepConfig, EvalOptions):
    """Options of ``slm compare`` and the ``compare`` recipe step (the output is the report
    directory)."""

    models: list[str] = Field(min_length=1, description="Model directories or hub ids.",
                              json_schema_extra=cli(argument=True))
    out: str | None = Field(default=None, description="Report directory to create.",
                            json_schema_extra=cli(short="-o"))


def run_compare(cfg: CompareConfig) -> StepResult:
    """``slm compare``: every model on the same bytes and items; table, plots and report."""
    from slmkit.eval.report import cell_value, columns, format_cell, pareto_labels

    cfg.check_output()
    cfg.check_device()
    cfg.apply_threads()
    res = compare(cfg.models, cfg.out, data=cfg.data, split=cfg.split,
                  val_fraction=cfg.val_fraction, task_specs=cfg.task_specs(),
                  task_limit=cfg.task_limit or None, overwrite=cfg.overwrite,
                  max_bytes=cfg.max_bytes or None, **cfg.eval_kwargs())
    cols = [c for c in columns(res) if c[1] in ("size_on_disk", "bits_per_byte",
                                                  "decode_tok_s", "peak_rss_bytes")
            or ":" in c[1]]
    fronts = pareto_labels(res)
    rows, notes = [], []
    for m in res["models"]:
        if m.get("error"):
            notes.append(f"{m['label']} failed: {m['error']}")
            rows.append((m["label"], "failed", *["–"] * len(cols)))
            continue
        rows.append((m["label"], ",".join(fronts[m["label"]]),
                     *[format_cell(cell_value(m, key), spec, m, key) for _, key, spec, _ in cols]))
    heads = [c[0].replace("stdlib-", "").replace("exact_match", "EM") for c in cols]
    notes.append(f"report: {res['out']}/report.html  (results.json, report.md, "
                 "quality_vs_size.png, quality_vs_speed.png)")
    ok = [m for m in res["models"] if not m.get("error")]
    return StepResult("compare", str(res["out"]),
                      {"models": len(res["models"]), "failed": len(res["models"]) - len(ok)},
                      tables=[Table("slm compare", rows, ("model", "Pareto", *heads))],
                      data=res, notes=notes)
