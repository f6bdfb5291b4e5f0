"""``slm quantize``'s config: the quantization options (a block other steps reuse, e.g.
QLoRA's base) and the step config that adds the model, the output and ``--dequantize``.

The CLI flags, YAML recipe steps and the ``slmkit.json`` lineage record are these models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slmkit.errors import ConfigError, validated
from slmkit.step import Calibration, ModelStep, cli, refuse_unused


class QuantizeOptions(Calibration):
    """How to quantize: method, grid, which linears, and the methods' own knobs.

    Attributes:
        method: ``rtn`` (round to nearest), ``gptq`` (Frantar et al., 2022) or ``awq``
            (Lin et al., 2023).
        bits: 8 or 4 (3 is experimental, 8 codes packed in 3 bytes).
        group_size: input columns per scale; -1 is per output channel. ``None`` picks -1
            for 8 bit (the int8 kernel is per channel) and, for 4/3 bit, the largest of
            128, 64 and 32 that divides every targeted layer (``auto_group_size``, resolved
            when the model is known).
        targets / ignore: regexes over linear names (see ``match_linears``).
        damp, act_order, block_size, true_sequential, gptq_clip: GPTQ options; ``preserve_zeros`` keeps exactly-zero
            (pruned) weights at zero (RTN and AWQ always do).
        awq_grid, awq_clip: AWQ scale grid size and whether to search clipping ratios.
        quantize_embeddings: also store the token embedding table quantized (RTN, int8 per
            row unless ``embedding_bits`` says 4). A tied LM head then becomes a quantized
            head with the same codes. On by default: on SmolLM2-135M an int8 table costs
            +0.4% prose / -0.2% code perplexity (4-bit g64 RTN) and decodes 1.4x faster
            than an fp32 one (``bench/quant_speed.py``); an int4 table costs +18% on prose.
            A default that a model cannot take (an embedding that is not a plain
            ``nn.Embedding``) keeps the table dense and says so; asked for, it is refused.
    """

    method: Literal["rtn", "gptq", "awq"] = Field(
        default="rtn", description="rtn, gptq or awq.", json_schema_extra=cli(short="-m"))
    bits: int = Field(default=4, description="8 or 4 (3 is experimental).",
                      json_schema_extra=cli(short="-b"))
    group_size: int | None = Field(default=None, description="32, 64, 128 or -1 (per "
                                   "channel); default -1 for 8 bit and, for 4 bit, the "
                                   "largest of 128, 64 and 32 that divides every layer.",
                                   json_schema_extra=cli(short="-g"))
    sym: bool = Field(default=True, description="Symmetric grid, or asymmetric with zero "
                      "points.", json_schema_extra=cli(flag="--sym/--asym"))
    targets: list[str] = Field(default_factory=lambda: [r".*"], description="Regex of "
                               "linears to quantize (repeatable).")
    ignore: list[str] = Field(default_factory=lambda: [r"lm_head"], description="Regex of "
                              "linears to skip (repeatable).")
    damp: float = Field(default=0.01, ge=0, lt=1, description="GPTQ relative Hessian "
                        "dampening.")
    true_sequential: bool = Field(default=True, description="GPTQ: collect each group's "
                                  "Hessian (q/k/v, o, gate/up, down) after the groups before "
                                  "it are quantized; off: one pass per block for all (faster).")
    act_order: bool = Field(default=False, description="GPTQ: quantize columns in order of "
                            "decreasing Hessian diagonal.")
    preserve_zeros: bool = Field(default=True, description="GPTQ: weights that are exactly "
                                 "zero (pruned) stay zero.")
    block_size: int = Field(default=128, ge=1, description="GPTQ lazy-update block (columns).")
    gptq_clip: bool = Field(default=True, description="GPTQ: fit each group's range to "
                            "its output error on the calibration inputs (a clipping search); "
                            "off: the group's min/max.")
    awq_grid: int = Field(default=20, ge=1, description="AWQ: points of the scale search.")
    awq_clip: bool = Field(default=True, description="AWQ: search per-group clipping ratios.")
    quantize_embeddings: bool = Field(default=True, description="Also store the token "
                                      "embedding table quantized (RTN, int8 per row; a tied "
                                      "LM head shares the codes); off keeps it dense.")
    embedding_bits: int | None = Field(default=None, description="The embedding table's "
                                       "grid: 8 (per row, the default) or 4 (the "
                                       "--group-size grid).")

    @model_validator(mode="after")
    def _check(self) -> "QuantizeOptions":
        from slmkit.compress.quantize.ops import check_scheme

        if self.group_size is None and self.bits == 8:   # a default, not an input
            self.__dict__["group_size"] = -1
        try:
            check_scheme(self.bits, self.group_size if self.group_size is not None else 32)
        except ConfigError as e:     # a ValueError, so recipes name the file and step
            raise ValueError(str(e)) from None
        if self.embedding_bits is not None:
            if not self.quantize_embeddings:
                raise ValueError("--embedding-bits needs a quantized embedding table; drop "
                                 "--no-quantize-embeddings or --embedding-bits.")
            if self.embedding_bits not in (8, 4):
                raise ValueError(f"--embedding-bits {self.embedding_bits} is not supported; "
                                 "use 8 or 4.")
        return self

    def embedding_grid(self) -> tuple[int, int]:
        """``(bits, group_size)`` of a quantized embedding table: int8 per row, or the
        linears' 4-bit grid."""
        bits = self.embedding_bits or 8
        return bits, (-1 if bits == 8 else self.group_size)

    def embedding_sym(self) -> bool:
        """An int8 table is symmetric per row whatever ``sym`` says: Q8_0 holds it exactly."""
        return True if self.embedding_grid()[0] == 8 else self.sym

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    def resolve_group_size(self, widths) -> None:
        """Pick the default group for these layer widths (see ``auto_group_size``)."""
        from slmkit.compress.quantize.ops import auto_group_size

        if self.group_size is None:   # a default, not an input: kept out of fields_set
            self.__dict__["group_size"] = auto_group_size(widths)

    def scheme(self) -> dict:
        """What ``config.json`` records (and what ``QuantLinear`` needs to be rebuilt)."""
        out = {"method": self.method, "bits": self.bits, "group_size": self.group_size,
               "sym": self.sym, "embeddings": self.quantize_embeddings}
        if self.quantize_embeddings:
            out["embedding_bits"], out["embedding_group_size"] = self.embedding_grid()
            out["embedding_sym"] = self.embedding_sym()
        return out


CALIBRATION = {"calib_data", "calib_samples", "calib_seq_len", "seed", "calib_precision"}
GPTQ_ONLY = {"damp", "act_order", "block_size", "preserve_zeros", "true_sequential",
             "gptq_clip"}
AWQ_ONLY = {"awq_grid", "awq_clip"}


class QuantizeConfig(ModelStep, QuantizeOptions):
    """Options of ``slm quantize`` and the ``quantize`` recipe step."""

    dequantize: bool = Field(default=False, description="Instead: write a dense copy of a "
                             "quantized MODEL (for tools that need one).")

    @model_validator(mode="after")
    def _used(self) -> "QuantizeConfig":
        if self.dequantize:
            options = set(QuantizeOptions.model_fields)
            refuse_unused(self, options, "--dequantize (it only undoes a quantization)")
        elif self.method == "rtn":
            refuse_unused(self, CALIBRATION | GPTQ_ONLY | AWQ_ONLY,
                          "--method rtn, which needs no calibration")
        else:
            refuse_unused(self, AWQ_ONLY if self.method == "gptq" else GPTQ_ONLY,
                          f"--method {self.method}")
        return self


def make_config(**kwargs) -> QuantizeOptions:
    """Quantization options, with validation errors as one-sentence ConfigErrors."""
    return validated(QuantizeOptions, **kwargs)
