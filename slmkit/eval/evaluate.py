"""``slm eval``: every figure for one model, measured in one call and recorded in its lineage.

:func:`evaluate_model` loads a model (any format ``load_model`` loads), then measures
perplexity / bits per byte, task accuracy, speed, memory and size, and merges a flat
summary into the model's ``slmkit.json`` metrics. ``slm compare`` calls it once per model
with the same data and the same task items.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slmkit.errors import ConfigError, DataError
from slmkit.step import Corpus, StepConfig, StepResult, cli

#: Default text budget for perplexity: the same bytes for every tokenizer, a few seconds
#: per small model on 2 cores. 0/None scores the whole split.
DEFAULT_MAX_BYTES = 200_000
EXAMPLES_KEPT = 5


class EvalOptions(BaseModel):
    """What to measure and on which text: the block ``slm eval`` and ``slm compare`` share,
    so both score the same bytes and the same task items the same way."""

    model_config = ConfigDict(extra="forbid")

    data: Corpus = Field(default="stdlib", description="Text for perplexity and where "
                         "built-in tasks are mined: stdlib, a file, dir, glob or .jsonl.",
                         json_schema_extra=cli(short="-d"))
    split: Literal["val", "train", "all"] = Field(default="val", description="Corpus split.")
    val_fraction: float = Field(default=0.05, ge=0, lt=1, description="Validation share of "
                                "the corpus split.")
    tasks: list[str] | None = Field(
        default=None, description="Comma-separated: stdlib (all built-ins), stdlib-funcname, "
        "stdlib-docstring-mc, stdlib-nextline, stdlib-docstring, function-calling (built-in "
        "tool calls, BFCL-style scoring), or .jsonl task files. "
        'JSONL lines: {"type":"multiple_choice","context":..,"choices":[..],"answer":i} or '
        '{"type":"generation","prompt":..,"answer":..,"stop":["\\n"]}.',
        json_schema_extra=cli(short="-t"))
    task_limit: int = Field(default=100, ge=0, description="Items per task (0: all).")
    seq_len: int | None = Field(default=None, ge=2, description="Perplexity window (default "
                                "min(context, 512)).")
    stride: int | None = Field(default=None, ge=1, description="New tokens per window "
                               "(default half).")
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=0, description="Text budget in "
                           "bytes, the same for every tokenizer (0: the whole split).")
    max_tokens: int | None = Field(default=None, ge=1, description="Score at most this many "
                                   "tokens.")
    speed: bool = Field(default=True, description="Measure prefill/decode speed and TTFT.")
    decode_tokens: int = Field(default=32, ge=1, description="Tokens generated for the "
                               "decode speed.")
    dtype: Literal["fp32", "bf16", "fp16"] | None = Field(default=None, description="fp32 "
                                                          "(default), bf16 or fp16.")
    device: Literal["cpu", "cuda", "auto"] = Field(default="cpu", description="cpu, cuda or "
                                                   "auto.")

    def task_specs(self) -> list[str]:
        """The task names/files, comma-separated items split."""
        return [t.strip() for item in self.tasks or [] for t in item.split(",") if t.strip()]

    def task_sets(self) -> dict[str, list[dict[str, Any]]]:
        """``{task: items}`` for these options (see :func:`resolve_tasks`)."""
        return resolve_tasks(self.task_specs(), self.data, self.split, self.val_fraction,
                             self.task_limit or None)

    def check_device(self) -> None:
        """Refuse ``--device cuda`` where torch sees no GPU (before loading anything)."""
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("--device cuda: torch sees no CUDA GPU on this machine; use "
                                  "--device cpu or auto.")

    def eval_kwargs(self) -> dict[str, Any]:
        """The options :func:`evaluate_model` takes directly."""
        return dict(seq_len=self.seq_len, stride=self.stride, max_tokens=self.max_tokens,
                    speed=self.speed, decode_tokens=self.decode_tokens, dtype=self.dtype,
                    device=self.device)


class EvalConfig(StepConfig, EvalOptions):
    """Options of ``slm eval`` and the ``eval`` recipe step.

    With ``--out`` (always in a recipe) the output is a directory holding ``results.json``
    (every figure ``--json`` prints) and ``slmkit.json`` (the evaluated model's lineage plus
    an ``eval`` entry whose metrics are the flat summary).
    """

    model: str | None = Field(default=None, description="Model directory or hub id (omit "
                              "with --write-tasks to only write the task files).",
                              json_schema_extra=cli(argument=True))
    out: str | None = Field(default=None, description="Also write results.json and a lineage "
                            "record into this new directory.", json_schema_extra=cli(short="-o"))
    ppl: bool = Field(default=True, description="Measure perplexity.")
    record: bool | None = Field(default=None, description="Append the results to the model's "
                                "slmkit.json metrics (default: yes without --out; a step "
                                "never modifies another step's output).")
    write_tasks: str | None = Field(default=None, description="Write the task sets as JSONL "
                                    "into this new directory.")


def run_eval(cfg: EvalConfig) -> StepResult:
    """``slm eval``: measure one model (and/or write its task sets)."""
    import json

    from slmkit.models.io import atomic_dir
    from slmkit.models.lineage import make_record, write_record

    task_sets = cfg.task_sets()
    if cfg.write_tasks is not None:
        from slmkit.eval.tasks import write_task_file

        if not task_sets:
            raise ConfigError("--write-tasks needs --tasks, e.g. --tasks stdlib.")
        with atomic_dir(cfg.write_tasks, overwrite=cfg.overwrite) as tmp:
            for name, items in task_sets.items():
                write_task_file(tmp / f"{name}.jsonl", items)
        if cfg.model is None:
            return StepResult("eval --write-tasks", cfg.write_tasks, {}, [
                (f"{cfg.write_tasks}/{n}.jsonl", f"{len(i)} {i[0]['type']} items")
                for n, i in task_sets.items()])
    if cfg.model is None:
        raise ConfigError("slm eval needs a MODEL directory (or --write-tasks DIR to only "
                          "write the task sets).")
    if cfg.out:
        cfg.check_output()
    cfg.check_device()
    cfg.apply_threads()
    record = cfg.record if cfg.record is not None else cfg.out is None
    res = evaluate_model(cfg.model, data=cfg.data, split=cfg.split,
                         val_fraction=cfg.val_fraction, max_bytes=cfg.max_bytes or None,
                         tasks=task_sets, perplexity=cfg.ppl, record=record,
                         **cfg.eval_kwargs())
    lineage = res.pop("lineage")
    notes = []
    if cfg.out:
        with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
            (tmp / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n",
                                              encoding="utf-8")
            write_record(tmp, make_record("eval", cfg.lineage(), res["summary"], lineage))
        notes.append(f"results: {cfg.out}/results.json")
    if res.get("recorded"):
        notes.append(f"metrics appended to {res['path']}/slmkit.json")
    return StepResult(f"eval {cfg.model}", cfg.out, eval_figures(res), result_rows(res),
                      data=res, notes=notes)


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


def resolve_tasks(specs: list[str] | None, data: Any = "stdlib", split: str = "val",
                  val_fraction: float = 0.05, limit: int | None = 100
                  ) -> dict[str, list[dict[str, Any]]]:
    """Turn task names and files into ``{task: items}``.

    Args:
        specs: built-in names (``stdlib-funcname``...), ``"stdlib"`` for all built-ins, or
            paths to ``.jsonl`` task files (task name = file stem).
        data, split, val_fraction: where built-in tasks are mined (the corpus split).
        limit: items per task (first ``limit`` of a file; mined sets are cut the same way).
    """
    from slmkit.eval.function_calling import TASK as FC_TASK
    from slmkit.eval.function_calling import builtin_items
    from slmkit.eval.mining import BUILTIN_TASKS, mine_tasks
    from slmkit.eval.tasks import read_task_file

    out: dict[str, list[dict[str, Any]]] = {}
    builtin: list[str] = []
    for spec in specs or []:
        spec = spec.strip()
        if not spec:
            continue
        if spec == FC_TASK:
            out[spec] = builtin_items(split, limit)  # its own fixed 20% held-out split
        elif spec == "stdlib":
            builtin += [t for t in BUILTIN_TASKS if t not in builtin]
        elif spec in BUILTIN_TASKS:
            if spec not in builtin:
                builtin.append(spec)
        elif spec.endswith(".jsonl") or os.path.sep in spec or Path(spec).exists():
            out[Path(spec).stem] = read_task_file(spec)[:limit]
        else:
            raise ConfigError(f"Unknown task '{spec}'; use a built-in task "
                              f"({', '.join(BUILTIN_TASKS)}, or 'stdlib' for all) or a "
                              ".jsonl task file.")
    if builtin:
        data_spec = data if isinstance(data, (str, list)) else "stdlib"
        mined = mine_tasks(builtin, data=data_spec, split=split, val_fraction=val_fraction,
                           limit=limit)
        for name in builtin:
            if not mined[name]:
                raise DataError(f"Task '{name}' found no items in {data_spec!r} (split "
                                f"'{split}'); use --data with Python source or a .jsonl "
                                "task file.")
            out[name] = mined[name]
    return out


def evaluate_model(ref: str | os.PathLike, data: Any = "stdlib", split: str = "val",
                   val_fraction: float = 0.05, seq_len: int | None = None,
                   stride: int | None = None, max_tokens: int | None = None,
                   max_bytes: int | None = DEFAULT_MAX_BYTES,
                   tasks: dict[str, list[dict[str, Any]]] | None = None,
                   perplexity: bool = True, speed: bool = True, decode_tokens: int = 32,
                   dtype: Any = None, device: str | None = "cpu",
                   record: bool = True) -> dict[str, Any]:
    """Measure one model: quality, task accuracy, speed, memory, size.

    Args:
        ref: model dir or hub id.
        data, split, val_fraction, seq_len, stride, max_tokens, max_bytes: perplexity data
            and window (see :func:`slmkit.eval.perplexity.perplexity`).
        tasks: ``{task: items}`` from :func:`resolve_tasks` (None: no task accuracy).
        perplexity: measure perplexity / bits per byte.
        speed: measure prefill/decode speed and TTFT.
        decode_tokens: tokens generated for the decode figure.
        dtype, device: how to load the model.
        record: merge the summary into the model dir's ``slmkit.json`` (local dirs only).

    Returns:
        A JSON-ready dict: ``model``, ``path``, ``architecture``, ``format``, size stats,
        ``perplexity``, ``tasks``, ``speed``, ``peak_rss_bytes``, ``summary`` (the flat
        figures written to ``slmkit.json``).
    """
    from slmkit.eval.perplexity import perplexity as measure_ppl
    from slmkit.eval.speed import measure_speed, peak_rss, reset_peak_rss, size_stats
    from slmkit.eval.tasks import score_task
    from slmkit.models.io import load_config, load_model
    from slmkit.models.lineage import read_lineage, update_metrics, utc_now

    t0 = time.perf_counter()
    model_dir, config = load_config(ref)
    gc.collect()
    rss_reset = reset_peak_rss()
    rss_before = peak_rss()  # right after the reset: the current RSS, before the model
    model, tokenizer = load_model(ref, dtype=dtype, device=device)
    result: dict[str, Any] = {
        "model": os.fspath(ref), "path": str(model_dir),
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "model_type": config.model_type, "vocab_size": len(tokenizer),
        "format": _format_name(config), "dtype": str(next(model.parameters()).dtype)
        .replace("torch.", ""),
        **size_stats(model_dir, config),
        "lineage": read_lineage(model_dir, ref=os.fspath(ref)),
    }
    if perplexity:
        result["perplexity"] = measure_ppl(model, tokenizer, data=data, split=split,
                                           seq_len=seq_len, stride=stride,
                                           max_tokens=max_tokens, max_bytes=max_bytes,
                                           val_fraction=val_fraction)
    result["tasks"] = {}
    for name, items in (tasks or {}).items():
        scored = score_task(model, tokenizer, items)
        scored["examples"] = scored.pop("predictions")[:EXAMPLES_KEPT]
        result["tasks"][name] = scored
    if speed:
        result["speed"] = measure_speed(model, tokenizer, decode_tokens=decode_tokens)
    result["peak_rss_bytes"] = peak_rss()
    result["peak_rss_scope"] = "model" if rss_reset else "process"
    # what loading and running this model added on top of the process (torch, libraries)
    result["peak_rss_added_bytes"] = result["peak_rss_bytes"] - rss_before \
        if rss_reset else None
    result["eval_seconds"] = time.perf_counter() - t0
    result["evaluated_utc"] = utc_now()
    result["summary"] = summarize(result, data, split)
    del model
    gc.collect()
    result["recorded"] = bool(record and Path(os.fspath(ref)).expanduser().is_dir())
    if result["recorded"]:
        update_metrics(model_dir, result["summary"])
    return result


def _format_name(config) -> str:
    from slmkit.models.formats import format_of

    fmt = format_of(config)
    if fmt:
        return fmt
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else \
            getattr(quant, "quant_method", None)
        return f"hf-{method or 'quantized'}"
    return "dense"


def summarize(result: dict[str, Any], data: Any = None, split: str | None = None
              ) -> dict[str, Any]:
    """The flat figures that go into ``slmkit.json`` metrics and the comparison table."""
    s: dict[str, Any] = {}
    ppl = result.get("perplexity")
    if ppl:
        s.update(ppl=ppl["ppl"], bits_per_byte=ppl["bits_per_byte"], eval_loss=ppl["loss"],
                 eval_tokens=ppl["tokens"], eval_bytes=ppl["bytes"])
        s["eval_data"] = data if isinstance(data, (str, list)) else "custom"
        s["eval_split"] = split
    for name, t in (result.get("tasks") or {}).items():
        s[f"{name}:{t['metric']}"] = t["score"]
    sp = result.get("speed")
    if sp:
        for n, v in sp["prefill_tok_s"].items():
            s[f"prefill_tok_s@{n}"] = v
        s.update(ttft_s=sp["ttft_s"], decode_tok_s=sp["decode_tok_s"])
    for key in ("peak_rss_bytes", "peak_rss_added_bytes", "size_on_disk", "params", "active_params",
                "bits_per_weight"):
        if result.get(key) is not None:
            s[key] = result[key]
    s["evaluated_utc"] = result.get("evaluated_utc")
    return s


def result_rows(res: dict[str, Any]) -> list[tuple[str, str]]:
    """Key/value rows for the ``slm eval`` result table."""
    from slmkit.console import human_bytes, human_count

    rows: list[tuple[str, str]] = [
        ("model", f"{res['architecture']} · {res['format']} · {res['dtype']}"),
        ("parameters", human_count(res["params"]) + (
            f" ({human_count(res['active_params'])} active per token)"
            if res["active_params"] != res["params"] else "")),
        ("size on disk", human_bytes(res["size_on_disk"])),
        ("bits per weight", f"{res['bits_per_weight']:.2f}" if res["bits_per_weight"] else "–")]
    p = res.get("perplexity")
    if p:
        rows += [("perplexity", f"{p['ppl']:.3f}  (loss {p['loss']:.4f} nats/token)"),
                 ("bits per byte", f"{p['bits_per_byte']:.4f}"),
                 ("scored", f"{p['tokens']:,} tokens, {p['bytes']:,} bytes, "
                            f"{p['documents']} docs (split {p['split']}, window {p['seq_len']}, "
                            f"stride {p['stride']})")]
    for name, t in (res.get("tasks") or {}).items():
        if t["type"] == "multiple_choice":
            text = f"acc {t['acc']:.3f}  acc_norm {t['acc_norm']:.3f}"
        elif t["type"] == "function_call":
            text = f"exact call {t['exact_call']:.3f} constrained, " \
                   f"{t['exact_call_unconstrained']:.3f} free (parsed " \
                   f"{t['parsed_unconstrained']:.3f} free)"
        else:
            text = f"EM {t['exact_match']:.3f}  F1 {t['f1']:.3f}  ROUGE-L {t['rouge_l']:.3f}"
        rows.append((f"{name} (n={t['n']})", text))
    sp = res.get("speed")
    if sp:
        for n, v in sp["prefill_tok_s"].items():
            rows.append((f"prefill @{n} tokens", f"{v:,.0f} tok/s" if v else
                         "– (beyond the model's context)"))
        rows.append(("time to first token", f"{sp['ttft_s'] * 1000:.1f} ms"
                     if sp["ttft_s"] else "–"))
        rows.append(("decode (batch 1)", f"{sp['decode_tok_s']:,.1f} tok/s"
                     if sp["decode_tok_s"] else "–"))
        rows.append(("generation path", f"{sp['backend']}, {sp['threads']} threads"))
    added = res.get("peak_rss_added_bytes")
    rows.append(("peak RSS", human_bytes(res["peak_rss_bytes"]) + (
        f"  (+{human_bytes(added)} for this model)" if added is not None
        else "  (whole process)")))
    rows.append(("took", f"{res['eval_seconds']:.1f} s"))
    return rows
