"""``slm factorize``'s config: the factorization options and the step config that adds the
model, the output and ``--merge``. Light to import (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slmkit.step import Calibration, ModelStep, cli, refuse_unused


class FactorizeOptions(Calibration):
    """How to factorize (recorded in ``slmkit.json``).

    Attributes:
        method: ``svd`` or ``asvd`` (activation-aware, Yuan et al. 2023).
        ratio: fraction of each layer's parameters to keep, in (0, 1); 0.8 when neither
            ratio nor energy is given.
        energy: fraction of spectral energy to keep, in (0, 1] (instead of ratio).
        targets / ignore: regexes selecting linears (``compress.match``).
        alpha: ASVD scaling exponent, ``s = mean|X| ** alpha``.
        allocate: with ``ratio``, ``global`` spends one parameter budget over all targeted
            layers where their (scaled) spectra lose the least energy; ``uniform`` keeps
            the same share of every layer. Default: ``global`` for ASVD (its
            activation-scaled spectra say where truncation hurts), ``uniform`` for SVD.
    """

    method: Literal["svd", "asvd"] = Field(default="svd", description="svd or asvd "
                                           "(activation-aware).",
                                           json_schema_extra=cli(short="-m"))
    ratio: float | None = Field(default=None, gt=0, lt=1, description="Fraction of each "
                                "layer's parameters to keep, in (0, 1) (default 0.8).")
    energy: float | None = Field(default=None, gt=0, le=1, description="Fraction of spectral "
                                 "energy to keep (instead of --ratio).")
    targets: list[str] | None = Field(default=None, description="Regex of linears to "
                                      "factorize (repeatable; default all but lm_head).")
    ignore: list[str] | None = Field(default=None, description="Regex of linears to skip "
                                     "(repeatable; default lm_head).")
    alpha: float = Field(default=0.5, gt=0, description="ASVD scaling exponent: s = "
                         "mean|X| ** alpha.")
    allocate: Literal["global", "uniform"] | None = Field(
        default=None, description="With --ratio: one budget over all layers (global) or the "
        "same share of each (uniform); default global for asvd, uniform for svd.")

    @model_validator(mode="after")
    def _one_target(self) -> "FactorizeOptions":
        if self.ratio is not None and self.energy is not None:
            raise ValueError("Both --ratio and --energy were given; pass only one of them")
        if self.ratio is None and self.energy is None:   # a default, not an input
            self.__dict__["ratio"] = 0.8
        if self.allocate is not None and self.ratio is None:
            raise ValueError("--allocate applies to --ratio; with --energy each layer keeps "
                             "its own energy share, so drop --allocate")
        if self.allocate is None:                         # a default, not an input
            self.__dict__["allocate"] = "global" if self.method == "asvd" else "uniform"
        return self


class FactorizeConfig(ModelStep, FactorizeOptions):
    """Options of ``slm factorize`` and the ``factorize`` recipe step."""

    merge: bool = Field(default=False, description="Write a dense model (B @ A merged back); "
                        "on a low-rank input, only merge.")

    @model_validator(mode="after")
    def _used(self) -> "FactorizeConfig":
        if self.method == "svd":
            refuse_unused(self, set(Calibration.model_fields) | {"alpha"},
                          "--method svd, which needs no calibration")
        return self

    def lineage(self) -> dict:
        skip = set() if self.method == "asvd" else {"calib_data", "calib_samples",
                                                    "calib_seq_len", "seed", "calib_precision",
                                                    "alpha"}
        return {k: v for k, v in super().lineage().items() if k not in skip}
