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
from pathlib import Path

from pydantic import Field, model_validator

from slmkit.errors import ConfigError, ModelLoadError
from slmkit.step import StepResult, cli
from slmkit.train.config import KDOptions, TrainConfig
from slmkit.train.run import Job

CACHE_DIR = "kd-cache"


class DistillConfig(TrainConfig, KDOptions):
    """Options of ``slm distill``: every ``slm train`` option plus the teacher and the loss.

    ``model`` (the student) is filled from ``student``.
    """

    model: str | None = Field(default=None, description="(set from --student)",
                              json_schema_extra=cli(hidden=True))
    teacher: str = Field(description="Teacher model dir (any format, quantized included).")
    student: str = Field(description="Preset (fresh init), a pruned teacher (`slm prune "
                         "--structured`) or any model dir with the teacher's tokenizer.",
                         json_schema_extra=cli(short="-s"))
    lr: float = Field(default=3e-3, gt=0, description="Peak learning rate (lower it for "
                      "pruned students).")

    @model_validator(mode="after")
    def _student_is_model(self) -> "DistillConfig":
        self.model = self.student
        if self.distributed == "fsdp":
            raise ValueError("--distributed fsdp is not supported by distill (the teacher and "
                             "the chunked KD projection run outside the sharded forward); use "
                             "ddp")
        return self


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


def run_distill(cfg: DistillConfig) -> StepResult:
    """``slm distill``: train ``cfg.student`` to imitate ``cfg.teacher`` in the one loop."""
    from slmkit.train.run import drive

    return drive(cfg, "distill", f"distill {cfg.student} from {cfg.teacher}", _kd_job)


def _kd_job(cfg: DistillConfig, out: Path) -> Job:
    from slmkit.data.corpus import CorpusStats
    from slmkit.data.tokens import token_stream
    from slmkit.models.presets import count_params
    from slmkit.train.batches import PackedBatches
    from slmkit.train.objectives_kd import IndexedBatches, KDObjective, TopKCache
    from slmkit.train.run import check_context, corpus_skips, validation_set

    from slmkit.train.distributed import Dist

    if not cfg.resume and Dist.from_env().is_main:      # rank 0 sets up before the others
        shutil.rmtree(out / CACHE_DIR, ignore_errors=True)   # another run's teacher targets
    teacher, teacher_tok = load_teacher(cfg)
    model, tok = load_student(cfg, teacher_tok)
    vocab = shared_vocab(model, teacher, tok)
    check_context(model, cfg.seq_len, "student")
    check_context(teacher, cfg.seq_len, "teacher")

    stats = CorpusStats()
    train_tokens = token_stream(cfg.data, tok, "train", cfg.val_fraction, stats=stats)
    val_b, val_bpt = validation_set(cfg, tok)
    packed = PackedBatches(train_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    if cfg.teacher_precision is None:                        # the lineage records it
        cfg.teacher_precision = cfg.resolved_precision()
    cache = None
    if cfg.topk_cache:
        meta = {"teacher": _teacher_stamp(cfg.teacher), "temperature": cfg.temperature,
                "tokens": train_tokens.meta.get("key") if hasattr(train_tokens, "meta")
                else len(train_tokens), "vocab": vocab,
                "teacher_bf16": cfg.teacher_precision == "bf16"}
        cache_dir = Path(cfg.topk_cache_dir).expanduser() if cfg.topk_cache_dir \
            else out / CACHE_DIR
        cache = TopKCache(cache_dir, packed.n_chunks, cfg.seq_len, cfg.topk_cache, meta)
    objective = KDObjective(teacher, cfg, vocab, cache)

    def finish(state):
        rows = []
        if cache is not None:
            rows.append(("top-K cache", f"K={cfg.topk_cache}, {cache.hits:,} hits / "
                                        f"{cache.misses:,} teacher runs"))
        if cfg.on_policy_fraction:
            rows.append(("on-policy batches", objective.on_policy_batches))
        shutil.rmtree(out / CACHE_DIR, ignore_errors=True)
        return model, {"kd_loss": _tail_mean(state.history, "kd_loss")}, rows

    rows = [("teacher", f"{cfg.teacher} ({count_params(teacher)['total']:,} params)"),
            ("student", cfg.student),
            ("loss", f"{cfg.loss}, T={cfg.temperature:g}, alpha={cfg.alpha:g}"
                     + (f", beta={cfg.beta:g}" if cfg.loss == "jsd" else ""))]
    return Job(model, tok, objective, IndexedBatches(packed), val_b, val_bpt, rows=rows,
               skipped=corpus_skips(stats), finish=finish)


def _teacher_stamp(ref: str) -> str:
    """Teacher path plus size and mtime of its weights: a changed teacher misses the cache."""
    root = Path(ref).expanduser().resolve()
    files = sorted(root.glob("*.safetensors"))
    return f"{root}:" + ",".join(f"{f.stat().st_size}@{f.stat().st_mtime_ns}" for f in files)


def _tail_mean(history: list[dict], key: str) -> float | None:
    vals = [r[key] for r in history[-10:] if key in r]
    return sum(vals) / len(vals) if vals else None
