"""Quantize a model, or turn a quantized one back into a dense one.

    >>> from slmkit.compress.quantize import quantize_model, make_config
    >>> model, tok = slmkit.load_model("runs/teacher")
    >>> summary = quantize_model(model, tok, make_config(method="gptq", bits=4))
    >>> slmkit.save_model(model, tok, "runs/teacher-gptq4", step="quantize", ...)

:func:`run_quantize` is the whole model dir -> model dir step (``slm quantize``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit.compress.match import match_linears
from slmkit.compress.quantize.config import QuantizeConfig, QuantizeOptions
from slmkit.compress.quantize.ops import check_scheme
from slmkit.errors import ConfigError
from slmkit.models.memory import release_file_pages, trim_heap
from slmkit.nn.experts import fuse as fuse_experts
from slmkit.nn.experts import split as split_experts
from slmkit.nn.quant_linear import QuantLinear
from slmkit.nn.surgery import is_conv1d, linear_shape, set_module
from slmkit.step import StepResult

FORMAT = "quant"


def is_quantized(model: nn.Module) -> bool:
    """True when the model already holds ``QuantLinear`` layers or says it is quantized."""
    section = getattr(getattr(model, "config", None), "slmkit", None)
    if isinstance(section, dict) and section.get("format") == FORMAT:
        return True
    return any(isinstance(m, QuantLinear) for m in model.modules())


def _check_layers(linears: dict[str, nn.Module], cfg: QuantizeOptions,
                  grids: dict[str, tuple[int, int]]) -> None:
    for name, module in linears.items():
        _, in_features = linear_shape(module)
        bits, group_size = grids.get(name, (cfg.bits, cfg.group_size))
        check_scheme(bits, group_size, in_features, name)
        if bits == 4 and in_features % 2:
            raise ConfigError(f"{name} has an odd number of input features ({in_features}), "
                              "which 4-bit packing cannot store; --ignore it or use --bits 8.")


@torch.no_grad()
def quantize_model(model: nn.Module, tokenizer, cfg: QuantizeOptions,
                   grids: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Quantize ``model``'s selected linears in place and mark its config as quantized.

    Args:
        model: a dense causal LM (fp32 recommended).
        tokenizer: its tokenizer (for calibration data).
        cfg: the run's options.
        grids: ``{linear name: (bits, group_size)}`` for layers on a grid of their own (a
            mixed-precision model, as ``slm search`` writes; RTN and GPTQ); recorded in
            ``config.json`` as ``layer_grids``.

    Returns:
        A summary: ``layers``, ``quantized_params``, ``bits_per_weight`` (effective, over
        the quantized weights).

    Raises:
        ConfigError: the model is already quantized, nothing matches the targets, or the
            scheme does not fit a layer's shape.
        DataError: calibration data too short.
    """
    if is_quantized(model):
        raise ConfigError("This model is already quantized; quantize the original dense "
                          "model instead (or `slm quantize --dequantize` it first).")
    # a mixture's fused experts become one linear per expert and stage, which the
    # patterns select like any other (``.experts.gate_up.<e>``, ``.experts.down.<e>``);
    # those left dense are fused back before the model is returned
    split_experts(model)
    try:
        summary = _quantize_split(model, tokenizer, cfg, grids)
    finally:
        fuse_experts(model)
    return summary


def _quantize_split(model, tokenizer, cfg: QuantizeOptions, grids) -> dict[str, Any]:
    from slmkit.compress.calibrate import calibrate_layer_by_layer, calibration_batches
    from slmkit.compress.quantize.modifiers import MODIFIERS

    linears = match_linears(model, cfg.targets, cfg.ignore)
    if not linears:
        raise ConfigError(f"No linear layer matches --targets {cfg.targets} (minus --ignore "
                          f"{cfg.ignore}); check the patterns against `slm info` layer names.")
    grids = dict(grids or {})
    if grids and cfg.method == "awq":
        raise ConfigError("Per-layer grids work with --method rtn or gptq, not awq.")
    widths = [linear_shape(m)[1] for n, m in linears.items() if n not in grids]
    if cfg.quantize_embeddings and cfg.embedding_grid()[0] == 4:   # on the linears' grid
        widths.append(model.get_input_embeddings().embedding_dim)
    cfg.resolve_group_size(widths)
    dense_table = None
    if cfg.quantize_embeddings:
        try:
            _check_embedding(model, cfg)
        except ConfigError as e:
            if "quantize_embeddings" in cfg.model_fields_set:
                raise
            cfg.__dict__["quantize_embeddings"] = False     # a default this model cannot take
            dense_table = f"kept dense ({e})"
    _check_layers(linears, cfg, grids)
    model_type = getattr(model.config, "model_type", "")
    modifier = MODIFIERS[cfg.method](cfg, linears, model_type, grids=grids)
    if cfg.needs_calibration:
        batches = calibration_batches(tokenizer, cfg.calib_data, "train", cfg.calib_samples,
                                      cfg.calib_seq_len, seed=cfg.seed)
        calibrate_layer_by_layer(model, batches, modifier.on_block,
                                 desc=f"{cfg.method} {cfg.bits}-bit",
                                 precision=cfg.calib_precision)
    else:
        from slmkit.console import track

        for name in track(list(linears), f"rtn {cfg.bits}-bit"):
            modifier.quantize_rtn(name)
    modifier.quantize_remaining()
    summary = install_codes(model, linears, modifier.results, cfg, grids)
    if dense_table:
        summary["embeddings"] = dense_table
    return summary


def install_codes(model: nn.Module, linears: dict[str, nn.Module], results: dict, cfg,
                  grids: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Swap each quantized linear for its ``QuantLinear`` and mark the config (the end of
    :func:`quantize_model`; ``slm search`` calls it with codes it made earlier).

    Args:
        linears: ``{name: dense module}``; results: ``{name: QuantizedLayer}``.
        cfg: the scheme (its grid is the default; ``grids`` gives per-layer ones).
    """
    grids = dict(grids or {})
    dtype = next(model.parameters()).dtype
    total_bits = n_params = 0
    for name, r in results.items():
        old = linears[name]
        bias = old.bias if getattr(old, "bias", None) is not None else None
        layer = QuantLinear.from_codes(r.codes, r.scale, r.zero,
                                       *grids.get(name, (cfg.bits, cfg.group_size)),
                                       cfg.sym, bias=bias, input_scale=r.input_scale,
                                       conv1d=is_conv1d(old), dtype=dtype)
        set_module(model, name, layer)
        n = layer.in_features * layer.out_features
        n_params += n
        total_bits += n * layer.bits_per_weight
    # the dense originals are garbage now: drop their file pages (still mapped while a tied
    # embedding keeps the safetensors mapping alive) and the quantizer's freed temporaries
    release_file_pages([linears[name].weight.data for name in results
                        if isinstance(getattr(linears[name], "weight", None), torch.Tensor)])
    trim_heap()
    bpw = total_bits / n_params
    summary = {"layers": len(results), "quantized_params": n_params,
               "bits_per_weight": round(bpw, 3)}
    if cfg.quantize_embeddings:
        summary["embeddings"] = quantize_embeddings(model, cfg)
    _mark_config(model, cfg, results, bpw)
    if "tied lm_head" in summary.get("embeddings", ""):
        model.config.slmkit["tied_head"] = True     # the head is a copy of the table's codes
    if cfg.quantize_embeddings:                     # on the table's grid (slm info counts)
        table = {id(model.get_input_embeddings())}
        if model.config.slmkit.get("tied_head"):
            table.add(id(model.get_output_embeddings()))
        model.config.slmkit["embedding_layers"] = [n for n, m in model.named_modules()
                                                   if id(m) in table]
    own = {n: list(g) for n, g in grids.items()
           if n in results and tuple(g) != (cfg.bits, cfg.group_size)}
    if own:
        model.config.slmkit["layer_grids"] = own
        model.config.quantization_config["layer_grids"] = own
    return summary


def _check_embedding(model: nn.Module, cfg: QuantizeOptions) -> nn.Embedding:
    emb = model.get_input_embeddings()
    scaled = isinstance(emb, nn.Embedding) and hasattr(emb, "scalar_embed_scale")  # Gemma
    if type(emb) is not nn.Embedding and not scaled:
        raise ConfigError(f"--quantize-embeddings needs a plain nn.Embedding, but this model's "
                          f"input embedding is {type(emb).__name__}; drop the option.")
    bits, group_size = cfg.embedding_grid()
    check_scheme(bits, group_size, emb.embedding_dim, "the embedding")
    if bits == 4 and emb.embedding_dim % 2:
        raise ConfigError(f"The embedding has an odd width ({emb.embedding_dim}), which 4-bit "
                          "packing cannot store; drop --quantize-embeddings or use --bits 8.")
    return emb


def quantize_embeddings(model: nn.Module, cfg: QuantizeOptions) -> str:
    """Replace the input embedding by a :class:`QuantEmbedding` (RTN, ``cfg``'s grid).

    A tied LM head (``tie_word_embeddings``) cannot keep pointing at a dense table that no
    longer exists, so it becomes a ``QuantLinear`` with the same codes and the config is
    untied; an untied head is left to ``--targets`` / ``--ignore``.

    Returns:
        A one-line description for the summary.
    """
    from slmkit.nn.quant_embedding import QuantEmbedding

    emb = _check_embedding(model, cfg)
    name = next(n for n, m in model.named_modules() if m is emb)
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    bits, group_size = cfg.embedding_grid()
    qemb = QuantEmbedding.from_embedding(emb, bits, group_size, cfg.embedding_sym())
    set_module(model, name, qemb)
    what = f"{name} ({emb.num_embeddings}x{emb.embedding_dim}, {bits}-bit RTN)"
    if tied:
        head_name = next(n for n, m in model.named_modules() if m is head)
        set_module(model, head_name, qemb.as_linear())
        what += f"; tied {head_name} uses the same codes"
    model.config.tie_word_embeddings = False
    return what


def _mark_config(model: nn.Module, cfg: QuantizeOptions, results: dict, bpw: float) -> None:
    scheme = cfg.scheme()
    # The quantized layers themselves are recognised by their ``.qweight`` tensors.
    model.config.slmkit = {"format": FORMAT, **scheme, "bits_per_weight": round(bpw, 3),
                           "layers": len(results)}
    model.config.quantization_config = {"quant_method": "slmkit", **scheme,
                                        "zero_point": not cfg.sym,
                                        "storage": "uint8 codes (int4 packed two per byte), "
                                                   "fp16 scales, uint8 zeros"}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every ``QuantLinear`` by the equivalent dense layer, in place; unmark config."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_module(model, name, module.to_dense())
    fuse_experts(model)           # split experts, now dense, back to the fused layout
    for attr in ("slmkit", "quantization_config"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return model


def run_quantize(cfg: QuantizeConfig) -> StepResult:
    """``slm quantize``: load ``cfg.model``, quantize (or dequantize), save to ``cfg.out``."""
    from slmkit.console import human_bytes
    from slmkit.models.info import dir_size
    from slmkit.models.io import load_model, resolve_ref, save_model

    final = cfg.check_output()
    cfg.apply_threads()
    model, tok = load_model(cfg.model, dtype="fp32")
    if cfg.dequantize:
        if not is_quantized(model):
            raise ConfigError(f"'{cfg.model}' is not quantized, so there is nothing to "
                              "dequantize; pass a model made by `slm quantize`.")
        dequantize_model(model)
        saved = save_model(model, tok, final, step="dequantize", params=cfg.lineage(),
                           overwrite=cfg.overwrite)
        size = dir_size(saved)
        return StepResult("quantize --dequantize", str(saved), {"size_on_disk": size}, [
            ("input", cfg.model), ("size on disk", human_bytes(size)),
            ("written to", str(saved))])
    if is_quantized(model):
        raise ConfigError(f"'{cfg.model}' is already quantized; quantize the original dense "
                          "model instead (or `slm quantize --dequantize` it first).")
    summary = quantize_model(model, tok, cfg)
    saved = save_model(model, tok, final, step="quantize", params=cfg.lineage(),
                       metrics=summary, overwrite=cfg.overwrite)
    size = dir_size(saved)
    auto = "group_size" not in cfg.model_fields_set and cfg.bits != 8
    rows = [("method", f"{cfg.method} {cfg.bits}-bit, group {cfg.group_size}"
                       + (" (the largest of 128/64/32 dividing every layer)" if auto else "")
                       + f", {'sym' if cfg.sym else 'asym'}"),
            ("layers quantized", summary["layers"]),
            ("weights quantized", f"{summary['quantized_params']:,}"),
            ("bits per weight", f"{summary['bits_per_weight']:.3f} "
                                f"({summary['bits_per_weight'] / 16:.1%} of fp16)"),
            *([("embeddings", summary["embeddings"])] if "embeddings" in summary else []),
            ("size on disk", f"{human_bytes(size)} (input "
                             f"{human_bytes(dir_size(resolve_ref(cfg.model)))})"),
            ("written to", str(saved))]
    experts = dense_experts(model)
    if experts:   # experts the patterns left out are fused back dense: say so
        rows.insert(4, ("left dense", f"{experts:,} expert weights of this "
                                      f"{model.config.model_type} model (not selected by "
                                      "--targets / --ignore)"))
    return StepResult("quantize", str(saved), {**summary, "size_on_disk": size}, rows)


def dense_experts(model: nn.Module) -> int:
    """Weights in a mixture-of-experts model's fused expert tensors (``[experts, out, in]``
    parameters under an ``experts`` module): the experts quantization left dense (those
    the patterns did not select are fused back)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 3 and ".experts." in f".{name}")


def dequantize(ref: str | os.PathLike, out: str | os.PathLike,
               overwrite: bool = False) -> Path:
    """A dense copy of a quantized model dir (``slm quantize --dequantize`` in Python)."""
    res = run_quantize(QuantizeConfig(model=str(ref), out=str(out), overwrite=overwrite,
                                      dequantize=True))
    return Path(res.out)
