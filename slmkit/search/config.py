"""``slm search``'s config: the budgets, the search space and the quality measurement.

Light to import (no torch): the CLI builds its flags from this class.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slmkit.step import Calibration, ModelStep, cli, refuse_unused


class SearchConfig(ModelStep, Calibration):
    """Options of ``slm search``: per-layer compression chosen under hardware budgets.

    The calibration block feeds GPTQ's Hessians; the quality of each choice is the KL
    divergence of the model's next-token distribution to the uncompressed model's on
    ``kl_samples`` windows of ``kl_seq_len`` tokens of the same corpora (other windows).
    """

    max_size_mb: float | None = Field(default=None, gt=0, description="Size budget of the "
                                      "written model dir in MB (10^6 bytes), as `slm info` "
                                      "reports it.")
    min_decode_tok_s: float | None = Field(default=None, gt=0, description="Speed budget: "
                                           "batch-1 decode tokens/s on slmkit's engine on "
                                           "this machine, predicted by a per-layer cost "
                                           "model measured here, then re-measured.")
    max_memory_mb: float | None = Field(default=None, gt=0, description="Memory budget: "
                                        "peak resident MB of serving the model on slmkit's "
                                        "engine (weights as its kernels hold them, the KV "
                                        "cache for --streams x --context, the runtime), "
                                        "predicted by a measured model, then re-measured in a "
                                        "fresh process.")
    streams: int = Field(default=1, ge=1, description="Concurrent streams the speed and "
                         "memory budgets are for (the engine's continuous batching): "
                         "--min-decode-tok-s is then each stream's decode speed.")
    context: int | None = Field(default=None, ge=16, description="Tokens per stream the KV "
                                "cache holds under --max-memory-mb (default: the model's "
                                "context, at most 2048, as the engine sizes it).")
    method: Literal["gptq", "rtn"] = Field(default="gptq", description="Quantizer of every "
                                           "quantized option: gptq or rtn.")
    bits: list[int] = Field(default_factory=lambda: [8, 4, 3], description="Bit widths a "
                            "layer may take (repeatable; 8 is per channel).")
    group_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128], description="Group "
                                   "sizes of 4- and 3-bit layers (repeatable; those that "
                                   "divide a layer's width are tried).")
    embeddings: bool = Field(default=True, description="The token embedding table (and a "
                             "tied LM head) may also be stored int8 per row, as `slm quantize "
                             "--quantize-embeddings` stores it (needs 8 in --bits).")
    keep_dense: bool = Field(default=True, description="A layer may also stay dense.")
    sym: bool = Field(default=True, description="Symmetric grids, or asymmetric with zero "
                      "points.", json_schema_extra=cli(flag="--sym/--asym"))
    sensitivity: Literal["exact", "scaled"] = Field(
        default="scaled", description="exact: the KL of every (layer, option) with only that "
        "layer changed; scaled: that KL for each layer's smallest option, the others scaled "
        "by their Hessian-weighted output error (one model tail per layer instead of one "
        "per option).")
    kl_samples: int = Field(default=4, ge=1, description="Windows the KL divergence is "
                            "measured on.")
    kl_seq_len: int = Field(default=128, ge=8, description="Tokens per KL window.")
    drop_layers: int = Field(default=0, ge=0, description="At most this many whole "
                             "decoder blocks may be dropped (each block's KL measured with "
                             "it skipped; for k = 0..N the k cheapest blocks are dropped and "
                             "the rest solved, the best total kept).")
    refine: int = Field(default=0, ge=0, description="Generations of evolutionary refinement "
                        "(EvoPress-style) of the chosen assignment on the true end-to-end "
                        "KL; 0 = the additive solve's answer as is.")
    refine_offspring: int = Field(default=4, ge=1, description="Candidates per refinement "
                                  "generation (each one full-model KL evaluation).")
    pareto_points: int = Field(default=12, ge=2, description="Budgets on the Pareto front "
                               "(from the smallest model to the dense one).")
    time_limit: float | None = Field(default=None, gt=0, description="Stop the search after "
                                     "this many seconds and write the best model so far.")
    cache_dir: str | None = Field(default=None, description="Where the per-layer "
                                  "sensitivities and costs are cached (default "
                                  "$SLMKIT_CACHE_DIR/search).")

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        if self.max_size_mb is None and self.min_decode_tok_s is None \
                and self.max_memory_mb is None:
            raise ValueError("give a budget: --max-size-mb, --max-memory-mb and/or "
                             "--min-decode-tok-s")
        if self.max_memory_mb is None:
            refuse_unused(self, {"context"}, "a search without --max-memory-mb")
            if self.min_decode_tok_s is None:
                refuse_unused(self, {"streams"}, "a search without --min-decode-tok-s or "
                              "--max-memory-mb")
        bad = sorted(set(self.bits) - {8, 4, 3})
        if bad:
            raise ValueError(f"--bits {bad[0]} is not supported; use 8, 4 or 3")
        if not self.bits:
            raise ValueError("give at least one --bits")
        if self.method == "rtn":   # the KL windows still use --calib-data and --seed
            refuse_unused(self, {"calib_samples", "calib_seq_len", "calib_precision"},
                          "--method rtn, which needs no calibration windows")
        if self.drop_layers and self.min_decode_tok_s is not None:
            raise ValueError("--drop-layers with --min-decode-tok-s is not supported (the "
                             "decode cost model has no per-block term); drop one of them")
        if self.drop_layers and self.refine:
            raise ValueError("--drop-layers with --refine is not supported (refinement "
                             "mutates per-layer levels only); drop one of them")
        badg = [g for g in self.group_sizes if g <= 0 or g % 8]
        if badg:
            raise ValueError(f"--group-sizes {badg[0]} is invalid; use multiples of 8 such "
                             "as 32, 64 or 128")
        return self
