"""The ``"quant"`` on-disk format: rebuild ``QuantLinear`` layers when loading.

``config.json`` holds ``"slmkit": {"format": "quant", "method", "bits", "group_size",
"sym", "bits_per_weight", "layers"}`` (plus a descriptive ``quantization_config``), and
``"layer_grids": {name: [bits, group_size]}`` for the layers of a mixed-precision model
(``slm search``) whose grid is not the default one;
a mixture of experts whose experts were quantized holds them split, one layer per expert
and stage (``<prefix>.experts.gate_up.<e>``, ``.down.<e>``; :mod:`slmkit.nn.experts`);
``model.safetensors`` holds each quantized layer's ``qweight`` / ``scales`` / ``zeros`` /
``bias`` / ``input_scale`` under the layer's name (a ``.qweight`` tensor marks a quantized
layer), and every other tensor as in a dense checkpoint. :func:`load` is the format's
loader, registered with :mod:`slmkit.models.formats` by :mod:`slmkit.nn`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slmkit.errors import ModelLoadError
from slmkit.models.formats import load_dense_part
from slmkit.nn import experts
from slmkit.nn.quant_embedding import QuantEmbedding, embedding_scale
from slmkit.nn.quant_linear import QuantLinear
from slmkit.nn.surgery import is_conv1d, linear_shape, set_module


def load(model_dir: Path, config, dtype: torch.dtype, device: str):
    """Loader of the ``"quant"`` format: the dense model with its quantized layers rebuilt."""
    from slmkit.models import checks

    section = config.slmkit
    try:
        bits, group_size, sym = section["bits"], section["group_size"], section["sym"]
    except (KeyError, TypeError):
        raise ModelLoadError(f"'{model_dir}' has an incomplete slmkit quant section in "
                             "config.json; re-create it with `slm quantize`.") from None
    model = load_dense_part(model_dir, config, dtype, "slm quantize")
    model.config.slmkit = config.slmkit
    model.config.quantization_config = getattr(config, "quantization_config", None)
    state = _quantized_tensors(checks.weight_files(model_dir))
    rename = _checkpoint_renaming(model)
    state = {rename(k): v for k, v in state.items()}
    modules = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not modules:
        raise ModelLoadError(f"'{model_dir}' says it is quantized but holds no quantized "
                             "layers (*.qweight); re-create it with `slm quantize`.")
    _split_experts(model, state, model_dir)
    # the embedding table (and a head sharing its codes) may have a grid of its own
    emb_grid = (section.get("embedding_bits", bits),
                section.get("embedding_group_size", group_size))
    table = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    for name in modules:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"'{model_dir}' lists quantized layer '{name}', which its "
                                 "architecture does not have; re-create it with "
                                 "`slm quantize`.") from None
        # the table and a head holding its codes (named since the record was added; an
        # untied head quantized as a linear is on the linears' grid)
        in_table = name in section["embedding_layers"] if "embedding_layers" in section \
            else id(old) in table and section.get("embeddings")
        b, g = emb_grid if in_table else \
            tuple(section.get("layer_grids", {}).get(name, (bits, group_size)))
        s = section.get("embedding_sym", sym) if in_table else sym
        if isinstance(old, nn.Embedding):
            layer = QuantEmbedding(old.num_embeddings, old.embedding_dim, b, g, s,
                                   padding_idx=old.padding_idx, dtype=dtype,
                                   embed_scale=embedding_scale(old))
            _fill(layer, state, name, model_dir)
            set_module(model, name, layer)
            continue
        out_f, in_f = linear_shape(old)
        layer = QuantLinear(in_f, out_f, b, g, s,
                            bias=getattr(old, "bias", None) is not None,
                            input_scale=f"{name}.input_scale" in state, conv1d=is_conv1d(old), dtype=dtype)
        _fill(layer, state, name, model_dir)
        set_module(model, name, layer)
    return model.to(device)


def _checkpoint_renaming(model):
    """Checkpoint key -> module key, by transformers' own renamings for the architecture
    (``save_pretrained`` writes Mixtral's ``mlp`` as ``block_sparse_moe``, for one)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renamings = [t for t in get_model_conversion_mapping(model)
                     if isinstance(t, WeightRenaming)]
    except Exception:       # an older transformers renames nothing
        return lambda key: key

    def rename(key: str) -> str:
        for t in renamings:
            key, _ = t.rename_source_key(key)
        return key
    return rename


def _split_experts(model, state: dict, model_dir: Path) -> None:
    """Mixtures whose experts were quantized are saved split (``<prefix>.gate_up.<e>``,
    ``<prefix>.down.<e>``): split those fused modules, and load the experts kept dense."""
    for prefix in sorted(experts.split_prefixes(state)):
        try:
            fused = model.get_submodule(prefix)
        except AttributeError:
            fused = None
        if fused is None or not experts.is_fused(fused):
            raise ModelLoadError(f"'{model_dir}' holds split experts '{prefix}', which its "
                                 "architecture does not have; re-create it with "
                                 "`slm quantize`.")
        split = experts.SplitExperts.from_fused(fused)
        set_module(model, prefix, split)
        for stage in ("gate_up", "down"):
            for e, layer in enumerate(getattr(split, stage)):
                w = state.get(f"{prefix}.{stage}.{e}.weight")
                if f"{prefix}.{stage}.{e}.qweight" in state:
                    continue
                if w is None or w.shape != layer.weight.shape:
                    raise ModelLoadError(f"'{model_dir}' has no dense or quantized weight "
                                         f"for expert '{prefix}.{stage}.{e}'; the checkpoint "
                                         "is incomplete, re-create it with `slm quantize`.")
                with torch.no_grad():
                    layer.weight.copy_(w)


def _fill(layer: QuantLinear, state: dict, name: str, model_dir: Path) -> None:
    """Load one quantized layer's tensors, with a clear error for a broken checkpoint."""
    own = {k: state.get(f"{name}.{k}") for k in layer.state_dict()}
    missing = [k for k, v in own.items() if v is None]
    if missing:
        raise ModelLoadError(f"'{model_dir}' has no '{name}.{missing[0]}' tensor for a "
                             "quantized layer; the checkpoint is incomplete, re-create "
                             "it with `slm quantize`.")
    try:
        layer.load_state_dict(own, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"'{model_dir}' has wrongly shaped tensors for quantized "
                             f"layer '{name}' ({str(e).splitlines()[-1].strip()[:100]}); "
                             "re-create it with `slm quantize`.") from None


def _quantized_tensors(files) -> dict[str, torch.Tensor]:
    """Only the tensors of quantized layers (those beside a ``.qweight``), read lazily."""
    from safetensors import safe_open

    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys = list(st.keys())
            layers = {k[: -len(".qweight")] for k in keys if k.endswith(".qweight")}
            split = experts.split_prefixes(keys)      # split experts' dense ones too
            for k in keys:
                if k.rpartition(".")[0] in layers or any(k.startswith(p + ".") for p in split):
                    state[k] = st.get_tensor(k)
    return state
