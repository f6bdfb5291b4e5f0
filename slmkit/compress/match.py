"""Pick the linear layers a compression step works on, by name and regex.

Every compression method in slmkit (quantize, prune, factorize) touches plain linear
layers found by name, never model classes (DESIGN.md, "Generic over architectures").
This module is that one selection rule, shared by all of them.

Two module kinds count as "linear" (see :mod:`slmkit.nn.surgery`): ``torch.nn.Linear``
(``W`` is ``[out, in]``) and GPT-2 style ``Conv1D`` (``W`` is ``[in, out]``).
:func:`weight_matrix` / :func:`set_weight_matrix` hide the difference so that algorithms
always see ``[out, in]``.

Fused 3-D expert tensors (Mixtral's ``MixtralExperts``) are parameters, not linear
modules; they are not matched and stay dense.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from slmkit.errors import ConfigError
from slmkit.nn.surgery import is_conv1d

#: Default selection: every linear inside the decoder, never the output head.
DEFAULT_TARGETS: list[str] = [r".*"]
DEFAULT_IGNORE: list[str] = [r"lm_head", r"(^|\.)embed_out$", r"(^|\.)output$"]


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2 ``Conv1D`` (and their slmkit replacements' sources)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a transposed view for Conv1D; no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write a ``[out, in]`` weight back into a Linear or Conv1D module, in place."""
    target = module.weight.data
    with torch.no_grad():
        target.copy_(w.t() if is_conv1d(module) else w)


def compile_patterns(patterns: Iterable[str], flag: str) -> list[re.Pattern]:
    """Compile regexes; an invalid one is a ConfigError naming the flag and the pattern."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{flag} pattern '{p}' is not a valid regular expression "
                              f"({e}); fix the pattern.") from None
    return out


def match_linears(model: nn.Module, targets: Iterable[str] | None = None,
                  ignore: Iterable[str] | None = None,
                  within: str | None = None) -> dict[str, nn.Module]:
    """Find the linear layers of ``model`` selected by regexes.

    A module is selected when it is a linear (``nn.Linear`` or GPT-2 ``Conv1D``), its full
    dotted name matches (``re.search``) at least one ``targets`` pattern and none of the
    ``ignore`` patterns. Use ``within`` to restrict to one sub-module (e.g. a decoder
    block) while still matching against full names.

    Args:
        model: any module (a whole causal LM or one decoder block).
        targets: regexes to select (default: every linear).
        ignore: regexes to exclude (default: ``lm_head`` and other output heads).
        within: dotted prefix of a sub-module; names returned are still full names.

    Returns:
        ``{full_name: module}`` in ``named_modules`` order (execution order in HF models).

    Raises:
        ConfigError: a pattern is not a valid regex.
    """
    tgt = compile_patterns(DEFAULT_TARGETS if targets is None else list(targets), "--targets")
    ign = compile_patterns(DEFAULT_IGNORE if ignore is None else list(ignore), "--ignore")
    root = model.get_submodule(within) if within else model
    prefix = f"{within}." if within else ""
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if not name or not is_linear(module):
            continue
        full = prefix + name
        if any(p.search(full) for p in tgt) and not any(p.search(full) for p in ign):
            found[full] = module
    return found
