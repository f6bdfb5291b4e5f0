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

from slmkit.errors import ConfigError, DataError, validated

#: Default text budget for perplexity: the same bytes for every tokenizer, a few seconds
#: per small model on 2 cores. 0/None scores the whole split.
DEFAULT_MAX_BYTES = 200_000
EXAMPLES_KEPT = 5


class EvalConfig(BaseModel):
    """Options of ``slm eval`` (the ``eval`` recipe step adds the model and its output dir).

    The CLI flags and the recipe step are both this model, so ``--task-limit`` and
    ``task_limit:`` are checked the same way.
    """

    model_config = ConfigDict(extra="forbid")

    data: str | list[str] = Field(default="stdlib", description="text for perplexity and "
                                  "where built-in tasks are mined")
    split: Literal["val", "train", "all"] = "val"
    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    tasks: list[str] | None = Field(default=None, description="built-in task names, "
                                    "'stdlib' for all, or .jsonl task files (comma-separated "
                                    "items allowed)")
    task_limit: int = Field(default=100, ge=0, description="items per task (0: all)")
    seq_len: int | None = Field(default=None, ge=2)
    stride: int | None = Field(default=None, ge=1)
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=0,
                           description="text budget (0: whole split)")
    max_tokens: int | None = Field(default=None, ge=1)
    ppl: bool = Field(default=True, description="measure perplexity / bits per byte")
    speed: bool = Field(default=True, description="measure prefill/decode speed and TTFT")
    decode_tokens: int = Field(default=32, ge=1)
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1)
    record: bool = Field(default=True, description="merge the summary into the model's "
                         "slmkit.json metrics")

    @classmethod
    def from_cli(cls, **kwargs: Any) -> "EvalConfig":
        """Build from CLI values; a validation error becomes a one-sentence ConfigError."""
        return validated(cls, **kwargs)

    def task_specs(self) -> list[str]:
        """The task names/files, comma-separated items split."""
        return [t.strip() for item in self.tasks or [] for t in item.split(",") if t.strip()]

    def task_sets(self) -> dict[str, list[dict[str, Any]]]:
        """``{task: items}`` for these options (see :func:`resolve_tasks`)."""
        return resolve_tasks(self.task_specs(), self.data, self.split, self.val_fraction,
                             self.task_limit or None)


def evaluate_with(ref: str | os.PathLike, cfg: EvalConfig,
                  tasks: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """:func:`evaluate_model` with the options of ``cfg`` (tasks resolved unless given)."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return evaluate_model(ref, data=cfg.data, split=cfg.split, val_fraction=cfg.val_fraction,
                          seq_len=cfg.seq_len, stride=cfg.stride, max_tokens=cfg.max_tokens,
                          max_bytes=cfg.max_bytes or None,
                          tasks=cfg.task_sets() if tasks is None else tasks,
                          perplexity=cfg.ppl, speed=cfg.speed,
                          decode_tokens=cfg.decode_tokens, dtype=cfg.dtype,
                          device=cfg.device, record=cfg.record)


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
    from slmkit.eval.mining import BUILTIN_TASKS, mine_tasks
    from slmkit.eval.tasks import read_task_file

    out: dict[str, list[dict[str, Any]]] = {}
    builtin: list[str] = []
    for spec in specs or []:
        spec = spec.strip()
        if not spec:
            continue
        if spec == "stdlib":
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
