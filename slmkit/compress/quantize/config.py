"""``QuantizeConfig``: the one typed description of a quantization run.

Used by ``slm quantize`` flags, YAML recipe steps and the ``slmkit.json`` lineage record.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmkit.errors import ConfigError, validated


class QuantizeConfig(BaseModel):
    """Options of one quantization run.

    Attributes:
        method: ``rtn`` (round to nearest), ``gptq`` (Frantar et al., 2022) or ``awq``
            (Lin et al., 2023).
        bits: 8 or 4 (3 is experimental, stored one code per byte).
        group_size: input columns per scale; -1 is per output channel. ``None`` picks 128
            for 4/3 bit and -1 for 8 bit (the int8 kernel is per channel).
        sym: symmetric grid (no zero points) or asymmetric.
        targets / ignore: regexes over linear names (see ``match_linears``).
        calib_data / calib_samples / calib_seq_len: calibration corpus (train split) and
            how many windows of how many tokens (GPTQ and AWQ only).
        damp, act_order, block_size: GPTQ options; ``preserve_zeros`` keeps exactly-zero
            (pruned) weights at zero (RTN and AWQ always do).
        awq_grid, awq_clip: AWQ scale grid size and whether to search clipping ratios.
        quantize_embeddings: also store the token embedding table with the same grid (RTN,
            row by row). A tied LM head then becomes a quantized head with the same codes.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["rtn", "gptq", "awq"] = "rtn"
    bits: int = 4
    group_size: int | None = None
    sym: bool = True
    targets: list[str] = Field(default_factory=lambda: [r".*"])
    ignore: list[str] = Field(default_factory=lambda: [r"lm_head"])
    calib_data: str = "stdlib"
    calib_samples: int = 128
    calib_seq_len: int = 512
    damp: float = 0.01
    act_order: bool = False
    preserve_zeros: bool = True
    block_size: int = 128
    awq_grid: int = 20
    awq_clip: bool = True
    quantize_embeddings: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        from slmkit.compress.quantize.ops import check_scheme

        if self.group_size is None:
            self.group_size = -1 if self.bits == 8 else 128
        check_scheme(self.bits, self.group_size)
        if self.calib_samples < 1 or self.calib_seq_len < 8:
            raise ConfigError(f"--calib-samples {self.calib_samples} / --calib-seq-len "
                              f"{self.calib_seq_len} are too small; use at least 1 sample of "
                              "8 tokens (128 x 512 is typical).")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"--damp {self.damp} is out of range; use a small fraction such "
                              "as 0.01.")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    def scheme(self) -> dict:
        """What ``config.json`` records (and what ``QuantLinear`` needs to be rebuilt)."""
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "embeddings": self.quantize_embeddings}


def make_config(**kwargs) -> QuantizeConfig:
    """Build a config, turning pydantic validation errors into one-sentence ConfigErrors."""
    return validated(QuantizeConfig, **kwargs)
