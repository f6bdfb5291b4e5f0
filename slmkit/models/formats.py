"""Registry of slmkit's compressed on-disk formats.

A compressed model (packed int4, low-rank, ...) records its format in ``config.json``
under ``"slmkit": {"format": NAME, ...}``. Plain transformers cannot build such a model,
so :func:`slmkit.load_model` looks the name up here and calls the format's loader, which
builds the skeleton, swaps in the compressed modules and loads the safetensors weights.

This module is the bottom layer and names no loader itself: the package that owns a format
registers it at import, by module path so that importing slmkit stays cheap (no torch)::

    register_format("quant", "slmkit.nn.quant_format:load")      # in slmkit/nn/__init__.py

``slmkit/__init__.py`` imports those packages, so every format is known before any model
loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from slmkit.errors import ModelLoadError

#: format name -> "module:function". The function is called as
#: ``fn(model_dir: Path, config: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module``.
FORMATS: dict[str, str] = {}


def register_format(name: str, target: str) -> None:
    """Make format ``name`` loadable by ``target``, a ``"module:function"`` path."""
    FORMATS[name] = target


def format_of(config) -> str | None:
    section = getattr(config, "slmkit", None)
    if isinstance(section, dict):
        return section.get("format")
    return None


def load_dense_part(model_dir, config, dtype, remake: str):
    """The model of ``config`` (its slmkit and quantization sections dropped) with every
    tensor the dir stores in transformers' layout, loaded by transformers, which knows each
    family's checkpoint names (a mixture's per-expert keys, Mixtral's ``block_sparse_moe``,
    GPT-NeoX's ``embed_out``); a format's own layers are reported missing there, and its
    loader fills them in. ``remake``: the command that re-creates such a dir."""
    import copy

    from transformers import AutoModelForCausalLM

    dense_config = copy.deepcopy(config)
    for attr in ("quantization_config", "slmkit"):
        if hasattr(dense_config, attr):
            delattr(dense_config, attr)
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, config=dense_config, dtype=dtype, use_safetensors=True,
            local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"'{model_dir}' could not be loaded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]}); re-create it with "
                             f"`{remake}`.") from None


def read_weights(model_dir) -> dict:
    """Every tensor of a model dir's safetensors files, by name."""
    from safetensors.torch import load_file

    from slmkit.models import checks

    state: dict = {}
    for f in checks.weight_files(model_dir):
        state.update(load_file(str(f)))
    return state


def load_weights(model, state: dict, config, dtype, model_dir, what: str, remake: str) -> None:
    """Load a format loader's (rebuilt) ``state`` into its skeleton ``model``, every weight
    accounted for, and tie the LM head when the config says so.

    Raises:
        ModelLoadError: a missing or unexpected weight, named with ``what`` (e.g. "low-rank
            weights") and the command that re-creates the model (``remake``).
    """
    result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise ModelLoadError(f"'{model_dir}' has {what} that do not match its config.json "
                             f"(e.g. '{bad}'); re-create it with `{remake}`.")
    if tied:
        model.tie_weights()


def loader_for(name: str, model_dir) -> Callable:
    target = FORMATS.get(name)
    if target is None:
        known = ", ".join(sorted(FORMATS)) or "none"
        raise ModelLoadError(f"'{model_dir}' uses slmkit format '{name}', which this slmkit "
                             f"version cannot load (known: {known}); upgrade slmkit.")
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)
