"""``slm prune``'s config: the unstructured / N:M options, the structured options and the
step config that joins them with the model and the output. Light to import (no torch): the
CLI builds its flags from these classes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slmkit.errors import ConfigError
from slmkit.step import Calibration, ModelStep, cli, refuse_unused


class PruneOptions(Calibration):
    """How to prune unstructured / N:M (recorded in ``slmkit.json``).

    Attributes:
        method: ``magnitude``, ``wanda`` or ``sparsegpt``.
        sparsity: fraction of weights to remove per row, in ``[0, 1)`` (unused with pattern).
        pattern: ``"N:M"`` semi-structured pattern, e.g. ``"2:4"``, or None.
        targets / ignore: regexes selecting linears (``compress.match``).
        damp: relative Hessian dampening (sparsegpt).
        block_size: SparseGPT lazy-update block (columns).
    """

    method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        default="wanda", description="magnitude, wanda or sparsegpt (unstructured / N:M).",
        json_schema_extra=cli(short="-m"))
    sparsity: float = Field(default=0.5, ge=0, lt=1, description="Fraction of weights to "
                            "remove, in [0, 1).")
    pattern: str | None = Field(default=None, description="N:M semi-structured pattern, e.g. "
                                "2:4.")
    targets: list[str] | None = Field(default=None, description="Regex of linears to prune "
                                      "(repeatable; default all but lm_head).")
    ignore: list[str] | None = Field(default=None, description="Regex of linears to skip "
                                     "(repeatable; default lm_head).")
    damp: float = Field(default=0.01, ge=0, lt=1, description="SparseGPT relative Hessian "
                        "dampening.")
    block_size: int = Field(default=128, ge=1, description="SparseGPT lazy-update block "
                            "(columns).")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            from slmkit.compress.prune.ops import parse_pattern

            n, m = parse_pattern(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return f"{n}:{m}"

    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` of the N:M pattern, or None for unstructured sparsity."""
        from slmkit.compress.prune.ops import parse_pattern

        return parse_pattern(self.pattern) if self.pattern else None


class StructuredOptions(Calibration):
    """How much structure to remove (recorded in ``slmkit.json``): a parameter target, or
    explicit counts of heads (whole KV groups when divisible), MLP channels, hidden
    channels and decoder layers."""

    target_params: float | None = Field(default=None, gt=0, lt=1, description="Structured: "
                                        "keep this fraction of parameters, e.g. 0.75.")
    heads: int | None = Field(default=None, ge=0, description="Structured: attention heads "
                              "to remove per layer.")
    mlp_channels: int | None = Field(default=None, ge=0, description="Structured: MLP "
                                     "channels to remove per layer.")
    hidden: int | None = Field(default=None, ge=0, description="Structured: hidden "
                               "(embedding) channels to remove.")
    drop_layers: int | None = Field(default=None, ge=0, description="Structured: whole "
                                    "layers to remove.")
    experts: int | None = Field(default=None, ge=0, description="Structured: experts to "
                                "remove from each mixture-of-experts layer (those the router "
                                "gives the least probability on the calibration text).")

    def explicit(self) -> bool:
        return any(v is not None for v in (self.heads, self.mlp_channels, self.hidden,
                                            self.drop_layers, self.experts))

    def check_target(self) -> None:
        """One kind of target: a parameter fraction or explicit counts."""
        if self.target_params is not None and self.explicit():
            raise ConfigError("--target-params and explicit --heads/--mlp-channels/--hidden/"
                              "--drop-layers/--experts were both given; pass one or the other.")
        if self.target_params is None and not self.explicit():
            raise ConfigError("--structured needs --target-params (e.g. 0.75) or at least one "
                              "of --heads, --mlp-channels, --hidden, --drop-layers, --experts.")


class PruneConfig(ModelStep, PruneOptions, StructuredOptions):
    """Options of ``slm prune`` and the ``prune`` recipe step."""

    structured: bool = Field(default=False, description="Remove whole heads, MLP channels, "
                             "hidden channels and layers (smaller dense model).")
    compact: bool = Field(default=False, description="With --pattern: store N:M layers as "
                          "kept values + a bit mask (2:4 fp32: 53% of the dense bytes); loads "
                          "with slmkit only.")

    @model_validator(mode="after")
    def _consistent(self) -> "PruneConfig":
        try:
            if self.compact and self.structured:
                raise ConfigError("--compact stores N:M-sparse layers, and --structured makes "
                                  "a smaller dense model; drop one of them.")
            if self.compact and not self.pattern:
                raise ConfigError("--compact stores N:M-sparse layers; add --pattern (e.g. "
                                  "2:4) or drop --compact.")
            if self.structured:
                self.check_target()
            elif self.target_params is not None or self.explicit():
                raise ConfigError("--target-params, --heads, --mlp-channels, --hidden, "
                                  "--drop-layers and --experts apply to --structured pruning; "
                                  "add --structured or drop them.")
        except ConfigError as e:     # a ValueError, so recipes name the file and step
            raise ValueError(str(e)) from None
        if self.structured:
            refuse_unused(self, set(PruneOptions.model_fields) - set(Calibration.model_fields),
                          "--structured pruning")
        elif self.method == "magnitude":
            refuse_unused(self, set(Calibration.model_fields) | {"damp", "block_size"},
                          "--method magnitude, which needs no calibration")
        elif self.method == "wanda":
            refuse_unused(self, {"damp", "block_size"}, "--method wanda")
        return self

    def lineage(self) -> dict:
        skip = {"method", "sparsity", "pattern", "targets", "ignore", "damp", "block_size",
                "compact"} if self.structured else {"target_params", "heads", "mlp_channels",
                                                    "hidden", "drop_layers"}
        if not self.structured and self.method == "magnitude":   # needs no data
            skip |= {"calib_data", "calib_samples", "calib_seq_len", "seed", "calib_precision", "damp",
                     "block_size"}
        return {k: v for k, v in super().lineage().items() if k not in skip}
