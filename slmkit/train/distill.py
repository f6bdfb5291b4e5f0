"""``slm distill``: train a student to imitate a teacher, in the one training loop.

The student is a preset (fresh init), a structurally pruned copy of the teacher (the
Minitron path: Muralidharan et al. 2024, "Compact language models via pruning and knowledge
distillation") or any model dir with the teacher's tokenizer. The teacher is anything
:func:`slmkit.models.load_model` loads, quantized formats included. The loss is
:class:`~slmkit.train.objectives_kd.KDObjective`; budgets, bf16, validation, checkpoints and
``--resume`` are the loop's own. The output dir has the same shape as ``slm train``'s.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slmkit.errors import ConfigError, ModelLoadError
from slmkit.train.config import TrainConfig
from slmkit.train.run import TrainResult

CACHE_DIR = "kd-cache"


class DistillConfig(TrainConfig):
    """Options of ``slm distill``: every ``slm train`` option plus the teacher and the loss.

    ``model`` (the student) is filled from ``student``.
    """

    model: str | None = Field(default=None, description="(set from student)")
    teacher: str = Field(description="teacher model dir (any format load_model reads)")
    student: str = Field(description="preset name (fresh init) or student model dir")
    loss: Literal["fkl", "rkl", "jsd"] = Field(default="fkl", description="KD divergence")
    temperature: float = Field(default=1.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the LM loss")
    beta: float = Field(default=0.5, gt=0, lt=1, description="JSD mixture weight")
    topk_cache: int | None = Field(default=None, ge=1, description="cache teacher top-K")
    topk_cache_dir: str | None = Field(
        default=None, description="shared cache folder, kept and reused by runs with the "
        "same teacher, data, seq_len, temperature and K (default: <out>/kd-cache, deleted "
        "at the end)")
    chunk_size: int = Field(default=1024, ge=1, description="rows per vocabulary chunk")
    on_policy_fraction: float = Field(default=0.0, ge=0, le=1)
    teacher_precision: Literal["fp32", "bf16"] | None = Field(
        default=None, description="None: bf16 where the CPU supports it")

    @model_validator(mode="after")
    def _student_is_model(self) -> "DistillConfig":
        self.model = self.student
        return self


@dataclass
class DistillResult(TrainResult):
    """A :class:`TrainResult` plus the distillation facts."""

    kd_rows: list[tuple[str, Any]] | None = None

    def summary_rows(self) -> list[tuple[str, Any]]:
        return [*(self.kd_rows or []), *super().summary_rows()]


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map every string to the same ids (vocab + added tokens)."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def load_teacher(cfg: DistillConfig):
    """The teacher in eval mode, frozen; a load failure names ``--teacher``."""
    from slmkit.models import load_model

    try:
        teacher, tok = load_model(cfg.teacher)
    except ModelLoadError as e:
        raise ModelLoadError(f"--teacher: {e}") from None
    teacher.eval().requires_grad_(False)
    return teacher, tok


def load_student(cfg: DistillConfig, teacher_tok):
    """A preset initialised on the teacher's tokenizer, or a model dir with the same one."""
    from slmkit.models import load_model, load_tokenizer
    from slmkit.models.presets import PRESETS, init_model

    if cfg.student in PRESETS:
        tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else teacher_tok
        if not same_tokenizer(tok, teacher_tok):
            raise ConfigError(f"--tokenizer '{cfg.tokenizer}' differs from the teacher's; drop "
                              "--tokenizer to use the teacher's (cross-tokenizer distillation "
                              "is not supported).")
        return init_model(cfg.student, tok, seed=cfg.seed), tok
    try:
        model, tok = load_model(cfg.student, dtype="fp32")
    except ModelLoadError as e:
        raise ModelLoadError(f"--student: {e}") from None
    if not same_tokenizer(tok, teacher_tok):
        raise ConfigError(f"The student '{cfg.student}' has a different tokenizer "
                          f"({len(tok):,} tokens) than the teacher '{cfg.teacher}' "
                          f"({len(teacher_tok):,} tokens); cross-tokenizer distillation is not "
                          "supported, so use a student built on the teacher's tokenizer.")
    return model, tok


def shared_vocab(student, teacher, tok) -> int:
    """Rows both output layers have; padding beyond the tokenizer is allowed to differ."""
    from slmkit.models.presets import output_vocab_size

    rows_s, rows_t = output_vocab_size(student), output_vocab_size(teacher)
    vocab = min(rows_s, rows_t)
    if len(tok) > vocab:
        raise ConfigError(f"The tokenizer has {len(tok):,} tokens but the "
                          f"{'student' if rows_s < rows_t else 'teacher'} predicts only "
                          f"{vocab:,}; use models that cover the whole tokenizer.")
    return vocab


def run_distillation(cfg: DistillConfig) -> DistillResult:
    """Run ``slm distill`` end to end and return what it measured.

    Raises:
        ConfigError, DataError, ModelLoadError, OutputError: bad options or inputs, each a
        one-sentence message; no output dir is left half-written.
    """
    import torch

    from slmkit.data.corpus import CorpusStats
    from slmkit.data.tokens import token_stream
    from slmkit.models.presets import count_params
    from slmkit.train import checkpoint as ckpt
    from slmkit.train.batches import PackedBatches
    from slmkit.train.loop import Trainer
    from slmkit.train.objectives_kd import IndexedBatches, KDObjective, KDSettings, TopKCache
    from slmkit.train.run import finish_run, prepare_out, validation_set

    out, ck_root = prepare_out(cfg)
    if not cfg.resume:
        shutil.rmtree(out / CACHE_DIR, ignore_errors=True)   # another run's teacher targets
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    teacher, teacher_tok = load_teacher(cfg)
    model, tok = load_student(cfg, teacher_tok)
    vocab = shared_vocab(model, teacher, tok)
    for name, net in (("student", model), ("teacher", teacher)):
        max_pos = getattr(net.config, "max_position_embeddings", None) or \
            getattr(net.config, "n_positions", None)
        if max_pos and cfg.seq_len > max_pos:
            raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the {name}'s context of "
                              f"{max_pos} tokens; lower --seq-len.")

    stats = CorpusStats()
    train_tokens = token_stream(cfg.data, tok, "train", cfg.val_fraction, stats=stats)
    val_b, val_bpt = validation_set(cfg, tok)
    packed = PackedBatches(train_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    precision = cfg.resolved_precision()
    settings = KDSettings(loss=cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha,
                          beta=cfg.beta, chunk_size=cfg.chunk_size, topk=cfg.topk_cache,
                          on_policy_fraction=cfg.on_policy_fraction,
                          teacher_bf16=(cfg.teacher_precision or precision) == "bf16")
    cache = None
    if cfg.topk_cache:
        meta = {"teacher": _teacher_stamp(cfg.teacher), "temperature": cfg.temperature,
                "tokens": train_tokens.meta.get("key") if hasattr(train_tokens, "meta")
                else len(train_tokens), "vocab": vocab,
                "teacher_bf16": settings.teacher_bf16}
        cache_dir = Path(cfg.topk_cache_dir).expanduser() if cfg.topk_cache_dir \
            else out / CACHE_DIR
        cache = TopKCache(cache_dir, packed.n_chunks, cfg.seq_len, cfg.topk_cache, meta)
    objective = KDObjective(teacher, settings, vocab, cache)

    torch.manual_seed(cfg.seed)
    trainer = Trainer(model, objective, IndexedBatches(packed), cfg, val_batches=val_b,
                      val_bytes_per_token=val_bpt, checkpoint_root=ck_root)
    latest = ckpt.latest_checkpoint(ck_root) if cfg.resume else None
    if latest is not None:
        trainer.resume(latest)
    state = trainer.fit()

    kd_rows = [("teacher", f"{cfg.teacher} ({count_params(teacher)['total']:,} params)"),
               ("student", cfg.student),
               ("loss", f"{cfg.loss}, T={cfg.temperature:g}, alpha={cfg.alpha:g}"
                        + (f", beta={cfg.beta:g}" if cfg.loss == "jsd" else ""))]
    if cache is not None:
        kd_rows.append(("top-K cache", f"K={cfg.topk_cache}, {cache.hits:,} hits / "
                                       f"{cache.misses:,} teacher runs"))
    if cfg.on_policy_fraction:
        kd_rows.append(("on-policy batches", objective.on_policy_batches))
    extra = {"kd_loss": _tail_mean(state.history, "kd_loss")}
    shutil.rmtree(out / CACHE_DIR, ignore_errors=True)
    metrics = finish_run(cfg, model, tok, state, out, ck_root, step="distill",
                         title=f"distill {cfg.student} from {cfg.teacher}", extra=extra)
    skipped = [r for r in stats.summary_rows() if r[0].startswith(("skipped", "non-UTF"))]
    return DistillResult(out=out, metrics=metrics, params=count_params(model)["total"],
                         precision=trainer.precision, skipped=skipped, kd_rows=kd_rows)


def _teacher_stamp(ref: str) -> str:
    """Teacher path plus size and mtime of its weights: a changed teacher misses the cache."""
    root = Path(ref).expanduser().resolve()
    files = sorted(root.glob("*.safetensors"))
    return f"{root}:" + ",".join(f"{f.stat().st_size}@{f.stat().st_mtime_ns}" for f in files)


def _tail_mean(history: list[dict], key: str) -> float | None:
    vals = [r[key] for r in history[-10:] if key in r]
    return sum(vals) / len(vals) if vals else None


def run_distill(cfg: DistillConfig, resume: bool = False) -> dict[str, Any]:
    """Recipe step entry point: distill, return the measured figures."""
    if resume:
        cfg = cfg.model_copy(update={"resume": True})
    result = run_distillation(cfg)
    return {**result.metrics, "params": result.params, "out": str(result.out)}
