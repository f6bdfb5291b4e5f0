"""``TrainConfig``: the one typed configuration of ``slm train`` and the ``train`` recipe step.

The CLI flags, YAML recipes and the ``params`` recorded in ``slmkit.json`` are all this
model (and its subclasses for distill and finetune), so a flag, a recipe key and a lineage
field always mean the same thing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmkit.step import CORPUS_HELP, Corpus, StepConfig, cli


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 or AMX), or on CUDA."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class TrainConfig(StepConfig):
    """Options of ``slm train`` (pretraining / continued pretraining with the LM objective),
    and the base of ``slm distill`` and ``slm finetune``: one training loop, one set of
    budget, optimizer, precision and checkpoint options."""

    model: str = Field(description="Preset (nano, micro, ...) or model dir for continued "
                       "pretraining.", json_schema_extra=cli(short="-m"))
    tokenizer: str | None = Field(default=None, description="Tokenizer dir (required with a "
                                  "preset).", json_schema_extra=cli(short="-t"))
    data: Corpus = Field(default="stdlib", description=CORPUS_HELP,
                         json_schema_extra=cli(short="-d"))

    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many "
                                  "optimizer steps.")
    max_tokens: int | None = Field(default=None, ge=1, description="Stop after this many "
                                   "training tokens.")
    max_minutes: float | None = Field(default=None, gt=0, description="Stop after this many "
                                      "minutes.")

    seq_len: int = Field(default=256, ge=8, description="Tokens per training sequence.")
    batch_size: int = Field(default=16, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(default=3e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Final learning rate as "
                                "a fraction of the peak (cosine decay).")
    warmup_steps: int = Field(default=50, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW decay (matrices only).")
    beta1: float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(default=0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(default=1.0, ge=0, description="Clip the gradient norm (0 = off).")
    precision: Literal["fp32", "bf16"] | None = Field(
        default=None, description="fp32 or bf16 (default: bf16 where the CPU supports it).")
    compile: bool = Field(default=False, description="torch.compile the model.")
    qat: Literal["int8", "int4"] | None = Field(
        default=None, description="Quantization-aware training: train through the exact grid "
        "of slm quantize's packed format and write a packed quantized model.")
    qat_group_size: int | None = Field(default=None, description="QAT group size: 32, 64, "
                                       "128 or -1 (default as slm quantize: per channel for "
                                       "int8, the largest of 128/64/32 dividing every layer "
                                       "for int4).")
    qat_sym: bool = Field(default=True, description="QAT: symmetric grid (as slm quantize).")
    qat_start: Literal["rtn", "gptq"] = Field(
        default="rtn", description="QAT grid from round-to-nearest of the starting weights, or "
        "from GPTQ (the masters start at GPTQ's weights).")
    qat_calib_data: Corpus = Field(default_factory=lambda: ["stdlib", "stdlib-prose"],
                                   description="Calibration corpus of --qat-start gptq.")
    qat_calib_samples: int = Field(default=128, ge=1, description="Calibration windows of "
                                   "--qat-start gptq.")
    qat_data_free: int = Field(default=0, ge=0, description="QAT without data: train on this "
                               "many sequences the model samples itself (LLM-QAT), instead of "
                               "--data.")
    qat_eval_batches: int = Field(default=8, ge=1, description="Validation batches on "
                                  "which QAT reports the unquantized, starting and packed "
                                  "perplexity.")

    val_fraction: float = Field(default=0.05, ge=0, lt=1, description="Share of documents "
                                "held out.")
    eval_every: int = Field(default=100, ge=1, description="Validate every N steps.")
    eval_tokens: int = Field(default=65536, ge=1, description="Validation tokens per eval.")
    checkpoint_every: int = Field(default=100, ge=1, description="Checkpoint every N steps.")
    keep_checkpoints: int = Field(default=2, ge=1, description="Keep the last K checkpoints.")
    log_every: int = Field(default=10, ge=1, description="Log every N steps.")
    seed: int = Field(default=0, description="Seed for init, data order and sampling.")
    resume: bool = Field(default=False, description="Continue from the last checkpoint in "
                         "--out.")
    distributed: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="Under torchrun: ddp (every process holds the model) or "
        "fsdp (parameters, gradients and AdamW state sharded over the processes, for a model "
        "too big for one; train and full fine-tuning).")
    dist_timeout: float = Field(default=1800.0, gt=0, description="Under torchrun: seconds "
                                "a process waits for a stuck peer before the job fails (a "
                                "dead one fails it at once).")

    @model_validator(mode="after")
    def _qat_options(self) -> "TrainConfig":
        if self.qat is None and ({"qat_group_size", "qat_sym", "qat_start", "qat_calib_data",
                                  "qat_calib_samples", "qat_data_free", "qat_eval_batches"}
                                 & self.model_fields_set):
            raise ValueError("the --qat-* options need --qat int8 or --qat int4")
        method = getattr(self, "method", "full")      # finetune's adapters
        if self.qat is not None and method == "qlora":
            raise ValueError("--qat trains through its own grid, but --method qlora already "
                             "quantizes the base; use --method lora --qat int4 (the adapter "
                             "is trained through the grid and merged into a packed model)")
        if self.qat is not None and method == "lora" and getattr(self, "dropout", 0.0):
            raise ValueError("--qat with --method lora fake-quantizes W + BA as one weight, "
                             "which leaves no separate adapter input to drop out; drop "
                             "--dropout")
        return self

    @model_validator(mode="after")
    def _needs_budget(self) -> "TrainConfig":
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise ValueError("set a training budget: --max-steps, --max-tokens or --max-minutes")
        return self

    def resolved_precision(self) -> str:
        return self.precision or ("bf16" if cpu_has_bf16() else "fp32")

    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    def total_steps(self) -> int | None:
        """The step budget implied by ``max_steps``/``max_tokens`` (None: time only)."""
        limits = []
        if self.max_steps is not None:
            limits.append(self.max_steps)
        if self.max_tokens is not None:
            limits.append(-(-self.max_tokens // self.tokens_per_step()))
        return min(limits) if limits else None


class KDOptions(BaseModel):
    """The loss options of a distillation (a block of ``DistillConfig``)."""

    model_config = ConfigDict(extra="forbid")

    loss: Literal["fkl", "rkl", "jsd"] = Field(
        default="fkl", description="fkl (forward KL), rkl (reverse KL, MiniLLM) or jsd "
        "(generalised JSD, GKD).")
    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature of both "
                               "models.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the plain LM loss "
                         "(KD gets 1 - alpha).")
    beta: float = Field(default=0.5, gt=0, lt=1, description="JSD mixture weight on the "
                        "teacher, in (0, 1).")
    topk_cache: int | None = Field(default=None, ge=1, description="Cache the teacher's top-K "
                                   "log-probs on disk; later epochs skip it.")
    topk_cache_dir: str | None = Field(
        default=None, description="Keep the top-K cache here and reuse it across runs with "
        "the same teacher, data, seq_len, temperature and K (default: <out>/kd-cache, "
        "deleted at the end).")
    chunk_size: int = Field(default=1024, ge=1, description="Positions per "
                            "vocabulary-projection chunk.")
    on_policy_fraction: float = Field(default=0.0, ge=0, le=1, description="Share of batches "
                                      "whose second half the student samples (GKD on-policy).")
    teacher_precision: Literal["fp32", "bf16"] | None = Field(
        default=None, description="The teacher's precision (default: bf16 where the CPU "
        "supports it).")
