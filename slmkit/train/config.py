"""``TrainConfig``: the one typed configuration of ``slm train`` and the ``train`` recipe step.

The CLI flags, YAML recipes and the ``params`` recorded in ``slmkit.json`` are all this
model, so a flag, a recipe key and a lineage field always mean the same thing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmkit.errors import ConfigError, validated


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


class TrainConfig(BaseModel):
    """Options of ``slm train`` (pretraining / continued pretraining with the LM objective)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="preset name (nano, micro, ...) or a model directory")
    tokenizer: str | None = Field(default=None, description="tokenizer dir (needed for presets)")
    data: str | list[str] = Field(default="stdlib", description="corpus spec(s)")
    out: str | None = Field(default=None, description="output model directory")

    max_steps: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_minutes: float | None = Field(default=None, gt=0)

    seq_len: int = Field(default=256, ge=8)
    batch_size: int = Field(default=16, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0, description="max grad norm; 0 disables")
    precision: Literal["fp32", "bf16"] | None = Field(
        default=None, description="None picks bf16 where the CPU supports it")
    compile: bool = False

    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    eval_every: int = Field(default=100, ge=1)
    eval_tokens: int = Field(default=65536, ge=1, description="validation tokens per eval")
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    seed: int = 0
    threads: int | None = Field(default=None, ge=1, description="torch threads (None: torch's)")

    resume: bool = False
    overwrite: bool = False

    @model_validator(mode="after")
    def _needs_budget(self) -> "TrainConfig":
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise ValueError("set a training budget: --max-steps, --max-tokens or --max-minutes")
        return self

    @classmethod
    def from_cli(cls, **kwargs) -> "TrainConfig":
        """Build from CLI values, turning validation errors into one-sentence ConfigErrors."""
        return validated(cls, **kwargs)

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
