"""Registry of slmkit's compressed on-disk formats.

A compressed model (packed int4, low-rank, ...) records its format in ``config.json``
under ``"slmkit": {"format": NAME, ...}``. Plain transformers cannot build such a model,
so :func:`slmkit.load_model` looks the name up here and calls the format's loader, which
builds the skeleton, swaps in the compressed modules and loads the safetensors weights.

Formats register lazily by module path so that importing slmkit stays cheap::

    FORMATS["quant"] = "slmkit.nn.quant_format:load"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from slmkit.errors import ModelLoadError

#: format name -> "module:function". The function is called as
#: ``fn(model_dir: Path, config: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module``.
FORMATS: dict[str, str] = {}
FORMATS["lowrank"] = "slmkit.nn.lowrank:load_lowrank"  # slm factorize (B @ A factors)
FORMATS["quant"] = "slmkit.compress.quantize.format:load"  # slm quantize (int8/int4)
FORMATS["nm_sparse"] = "slmkit.compress.prune.nm_format:load"  # slm prune --compact (N:M)


def register_format(name: str, target: str) -> None:
    FORMATS[name] = target


def format_of(config) -> str | None:
    section = getattr(config, "slmkit", None)
    if isinstance(section, dict):
        return section.get("format")
    return None


def loader_for(name: str, model_dir) -> Callable:
    target = FORMATS.get(name)
    if target is None:
        known = ", ".join(sorted(FORMATS)) or "none"
        raise ModelLoadError(f"'{model_dir}' uses slmkit format '{name}', which this slmkit "
                             f"version cannot load (known: {known}); upgrade slmkit.")
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)
