"""``slm train``: load or build the model, tokenize the corpus, run the loop, save the result.

The output is a normal model dir (loads in plain transformers) with lineage, plus
``loss_curve.png``, ``train_log.json`` and ``checkpoints/`` (the last K). While training,
``<out>/checkpoints/`` is all that exists, so an interrupted run is visibly unfinished and
``--resume`` continues it; the model files appear in one atomic rename at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slmkit.console import human_count, log
from slmkit.errors import ConfigError, DataError, OutputError
from slmkit.step import StepResult
from slmkit.train.config import TrainConfig


@dataclass
class Job:
    """What an objective's ``setup`` hands :func:`drive`: the model to train, how, on what.

    Attributes:
        model, tok: the model being trained and its tokenizer.
        objective, batches: the loss (``LMObjective``, ``KDObjective``) and its batches.
        val_batches, val_bytes_per_token: fixed validation batches (None: no validation).
        params: parameters reported (default: the trained model's).
        rows: leading rows of the result table (the objective's own facts).
        skipped: corpus rows about skipped input, shown after the figures.
        finish: ``finish(state) -> (model, extra metrics, extra rows)`` after training
            (merge adapters, re-quantize, ...); default keeps the model as it is.
        curve: show the loss-curve row.
    """

    model: Any
    tok: Any
    objective: Any
    batches: Any
    val_batches: list | None = None
    val_bytes_per_token: float | None = None
    params: int | None = None
    rows: list[tuple[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, Any]] = field(default_factory=list)
    finish: Callable[[Any], tuple[Any, dict[str, Any], list[tuple[str, Any]]]] | None = None
    curve: bool = True


def drive(cfg: TrainConfig, step: str, title: str,
          setup: Callable[[TrainConfig, Path], Job]) -> StepResult:
    """The one driver of every training step (train, distill, finetune).

    Prepares ``--out`` (refusing an existing one unless ``--resume``/``--overwrite``), sets
    the threads, lets ``setup`` load models and data, seeds, trains in the one loop
    (resuming from the last checkpoint with ``--resume``), runs ``job.finish`` and saves
    the model with lineage in one atomic rename.

    Raises:
        ConfigError, DataError, ModelLoadError, OutputError: bad options or inputs, each a
        one-sentence message; no output dir is left half-written.
    """
    from slmkit.train.distributed import Dist

    dist = Dist.from_env()
    if cfg.distributed == "fsdp" and not dist.active:
        raise ConfigError("--distributed fsdp shards the model over the processes of a "
                          "torchrun job; start the command with torchrun --nproc-per-node N "
                          "(N >= 2), or drop it.")
    dist.init(cfg.dist_timeout)
    try:
        with dist.stop_on_sigterm():
            return _drive(cfg, step, title, setup, dist)
    finally:
        dist.close()


def _drive(cfg: TrainConfig, step: str, title: str, setup: Callable[[TrainConfig, Path], Job],
           dist) -> StepResult:
    """:func:`drive` inside the job's process group (world size 1 without torchrun)."""
    import torch

    from slmkit.models.presets import count_params
    from slmkit.train import checkpoint as ckpt
    from slmkit.train.distributed import check_world, describe
    from slmkit.train.loop import Trainer

    if dist.active:
        check_world(cfg.batch_size, dist.world_size)
        if not dist.is_main:
            _quiet_rank()
    out, ck_root = prepare_out(cfg, main=dist.is_main)
    dist.barrier()                     # every rank checked --out before rank 0 writes in it
    cfg.apply_threads()
    if cfg.qat and cfg.qat_data_free:
        from slmkit.train.qat import data_free_corpus

        cfg = data_free_corpus(cfg)
    with dist.rank_zero_first():       # rank 0 fills the token and teacher caches first
        job = setup(cfg, out)
    if cfg.qat:
        from slmkit.train.qat import qat_job

        job = qat_job(cfg, job)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(job.model, job.objective, job.batches, cfg, val_batches=job.val_batches,
                      val_bytes_per_token=job.val_bytes_per_token,
                      checkpoint_root=ck_root, dist=dist)     # rank 0 alone writes
    latest = ckpt.latest_checkpoint(ck_root) if cfg.resume else None
    if latest is not None:
        trainer.resume(latest)
    elif cfg.resume and ck_root.exists() and dist.is_main:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", ck_root)
    if dist.active:
        main_step = int(dist.broadcast_float(trainer.state.step))
        if main_step != trainer.state.step:
            raise ConfigError(f"--resume: rank {dist.rank} finds step {trainer.state.step} in "
                              f"{ck_root} but rank 0 resumes at step {main_step}; on several "
                              "machines put --out on a filesystem they all share.")
    params = job.params or count_params(job.model)["total"]
    log.info("%s %s (%s params, %s), %d tokens per step", step, cfg.model,
             human_count(params), trainer.precision, cfg.tokens_per_step())
    state = trainer.fit()
    dense = trainer.gather()[0] if trainer.sharded else None    # FSDP: full weights, rank 0
    dist.barrier()
    if not dist.is_main:               # rank 0 alone finishes and writes the output
        return StepResult(step, None, {}, [])
    model, extra, more_rows = job.finish(state) if job.finish else (job.model, {}, [])
    if dense is not None and model is job.model:
        model = dense
    metrics = finish_run(cfg, model, job.tok, state, out, ck_root, step=step, title=title,
                         extra={**(extra or {}), **describe(dist)})
    m = metrics
    rows = [*job.rows, *more_rows,
            ("parameters", f"{params:,} ({human_count(params)})"),
            ("precision", trainer.precision),
            ("steps", m["steps"]), ("tokens", f"{m['tokens']:,}"),
            ("time", f"{m['train_minutes']:.1f} min"),
            ("throughput", f"{m['tokens_per_s']:,.0f} tokens/s  (MFU {m['mfu']:.1%})"),
            ("train loss", m.get("train_loss"))]
    if dist.active:
        rows.insert(len(job.rows) + len(more_rows),
                    ("processes", f"{dist.world_size} ({dist.backend}, "
                                  f"{'FSDP' if trainer.sharded else 'DistributedDataParallel'})"))
    if "val_loss" in m:
        rows += [("val loss", m["val_loss"]), ("val perplexity", m["val_ppl"])]
    if "val_bpb" in m:
        rows.append(("val bits/byte", m["val_bpb"]))
    rows += job.skipped
    if job.curve:
        rows.append(("loss curve", str(out / "loss_curve.png")))
    rows.append(("written to", str(out)))
    return StepResult(step, str(out), {**metrics, "params": params}, rows)


def check_context(model, seq_len: int, name: str = "model") -> None:
    """Refuse a ``--seq-len`` longer than the model's context."""
    from slmkit.models.arch import context_length

    max_pos = context_length(model.config)
    if max_pos and seq_len > max_pos:
        raise ConfigError(f"--seq-len {seq_len} exceeds the {name}'s context of {max_pos} "
                          "tokens; lower --seq-len.")


def corpus_skips(stats) -> list[tuple[str, Any]]:
    """The rows of a corpus' statistics that report skipped input."""
    return [r for r in stats.summary_rows() if r[0].startswith(("skipped", "non-UTF"))]


def _quiet_rank() -> None:
    """Ranks other than 0 print no tables, bars or info logs (errors still reach stderr)."""
    import logging
    import sys

    from slmkit.console import configure

    configure(quiet=True)
    log.setLevel(logging.ERROR)
    sys.stdout = open(os.devnull, "w")     # --json and result tables: rank 0's only


def prepare_out(cfg: TrainConfig, main: bool = True) -> tuple[Path, Path]:
    """``(out, out/checkpoints)`` after the checks on ``--out``; only the ``main`` rank
    removes a replaced run's checkpoints or creates the parent."""
    if not cfg.out:
        raise ConfigError("train needs an output directory; pass --out DIR.")
    out = Path(cfg.out).expanduser()
    ck_root = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise OutputError(f"Output '{cfg.out}' is an existing file; choose a directory path.")
    if out.exists() and not cfg.resume:
        if not cfg.overwrite:
            raise OutputError(f"Output directory '{cfg.out}' already exists; pass --resume to "
                              "continue its training, --overwrite to start over, or a new "
                              "--out.")
        if main:
            shutil.rmtree(ck_root, ignore_errors=True)   # stale checkpoints of an older run
    if not main:
        return out, ck_root
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot create the parent of '{cfg.out}' ({e.strerror}); choose a "
                          "writable location.") from None
    return out, ck_root


def load_model_and_tokenizer(cfg: TrainConfig):
    """A preset initialised with ``cfg.seed``, or an existing model dir (fp32 masters)."""
    from slmkit.models import load_model, load_tokenizer
    from slmkit.models.presets import PRESETS, init_model

    if cfg.model not in PRESETS and not {"/", ":"} & set(cfg.model) \
            and not Path(cfg.model).exists():
        raise ConfigError(f"--model '{cfg.model}' is neither a preset ({', '.join(PRESETS)}) "
                          "nor a model directory; pass one of those presets or a model dir.")
    if cfg.model in PRESETS:
        if not cfg.tokenizer:
            raise ConfigError(f"--model {cfg.model} is a preset, which needs --tokenizer DIR "
                              "(train one with `slm tokenizer train`).")
        tok = load_tokenizer(cfg.tokenizer)
        return init_model(cfg.model, tok, seed=cfg.seed), tok
    model, tok = load_model(cfg.model, dtype="fp32")
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise ConfigError(f"The tokenizer has {len(tok):,} tokens but '{cfg.model}' embeds "
                          f"only {rows:,}; use the model's own tokenizer.")
    return model, tok


def val_bytes_per_token(tok, batches: list[dict]) -> float:
    """UTF-8 bytes per target token of the validation batches (special tokens: 0 bytes)."""
    n_bytes = n_tokens = 0
    for b in batches:
        for row in b["labels"].tolist():
            n_bytes += len(tok.decode(row, skip_special_tokens=True).encode("utf-8"))
            n_tokens += len(row)
    return n_bytes / max(n_tokens, 1)


def validation_set(cfg: TrainConfig, tok) -> tuple[list[dict] | None, float | None]:
    """Fixed validation batches and their bytes per target token (None, None without one)."""
    from slmkit.data.tokens import token_stream
    from slmkit.train.batches import eval_batches

    if cfg.val_fraction <= 0:
        return None, None
    try:
        val_tokens = token_stream(cfg.data, tok, "val", cfg.val_fraction)
    except DataError as e:
        log.warning("no validation: %s", e)
        return None, None
    val_b = eval_batches(val_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_tokens)
    return val_b, val_bytes_per_token(tok, val_b)


def finish_run(cfg: TrainConfig, model, tok, state, out: Path, ck_root: Path, step: str,
               title: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save the trained model as ``out``: lineage, loss curve, log, checkpoints; one rename.

    Every objective's verb (train, distill, finetune) ends with this, so all leave the same
    output shape. The model files are staged beside ``out``; the run's ``checkpoints/``
    folder is moved in, and the staged dir replaces ``out`` atomically.

    Args:
        state: the :class:`~slmkit.train.loop.TrainState` after :meth:`Trainer.fit`.
        step: lineage step name (``"train"``, ``"distill"``, ...).
        title: loss-curve title.
        extra: more metrics to record (None values are dropped).

    Returns:
        The metrics recorded in ``slmkit.json``.
    """
    from slmkit.models import save_model
    from slmkit.models.io import commit_out_dir
    from slmkit.train.plot import loss_curve_png

    hist, val_hist = state.history, state.val_history
    tail = hist[-max(1, min(10, len(hist))):]
    metrics: dict[str, Any] = {
        "steps": state.step, "tokens": state.tokens,
        "train_minutes": state.elapsed / 60,
        "tokens_per_s": sum(r["tokens_per_s"] for r in tail) / max(len(tail), 1),
        "mfu": sum(r["mfu"] for r in tail) / max(len(tail), 1),
        "train_loss": sum(r["loss"] for r in tail) / len(tail) if tail else math.nan,
        **{k: v for k, v in (extra or {}).items() if v is not None},
    }
    if val_hist:
        metrics.update({k: v for k, v in val_hist[-1].items() if k.startswith("val_")})
    png = loss_curve_png(hist, val_hist, title=title)
    log_json = json.dumps({"history": hist, "val_history": val_hist}, indent=1)
    params = cfg.lineage()
    staging = out.parent / f".{out.name}.final-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    save_model(model, tok, staging, step=step, params=params, metrics=metrics,
               extra_files={"loss_curve.png": png, "train_log.json": log_json})
    try:
        if ck_root.is_dir():
            os.replace(ck_root, staging / "checkpoints")
        commit_out_dir(staging, out)
    except BaseException:
        if (staging / "checkpoints").is_dir() and not ck_root.exists():
            out.mkdir(parents=True, exist_ok=True)
            os.replace(staging / "checkpoints", ck_root)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    model.slmkit_ref = str(out)
    return metrics


def run_train(cfg: TrainConfig) -> StepResult:
    """``slm train``: pretrain (or continue pretraining) with the LM objective."""
    return drive(cfg, "train", f"{cfg.model} on {cfg.data}", _lm_job)


def _lm_job(cfg: TrainConfig, out: Path) -> Job:
    from slmkit.data.corpus import CorpusStats
    from slmkit.data.tokens import token_stream
    from slmkit.train.batches import PackedBatches
    from slmkit.train.objectives import LMObjective

    model, tok = load_model_and_tokenizer(cfg)
    check_context(model, cfg.seq_len)
    stats = CorpusStats()
    train_tokens = token_stream(cfg.data, tok, "train", cfg.val_fraction, stats=stats)
    val_b, val_bpt = validation_set(cfg, tok)
    batches = PackedBatches(train_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    log.info("%s train tokens", f"{len(train_tokens):,}")
    return Job(model, tok, LMObjective(), batches, val_b, val_bpt, skipped=corpus_skips(stats))
