"""Recipe-step configs and entry points for verbs whose library config lacks input/output.

Each class here *extends* the verb's own pydantic config (same fields, same validation)
with the model it reads and the directory it writes, so a recipe step is checked exactly
like the CLI verb. Entry points return the figures the run summary shows.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slmkit.compress.quantize.config import QuantizeConfig


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
