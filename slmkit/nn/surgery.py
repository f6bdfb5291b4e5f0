"""Module surgery shared by the layers and the compressors: linear shapes, swapping a module.

Two module kinds count as "linear" (``slmkit.compress.match`` selects them by name):

* ``torch.nn.Linear``: ``y = x @ W.T + b`` with ``W`` of shape ``[out, in]``;
* GPT-2 style ``transformers.pytorch_utils.Conv1D``: ``y = x @ W + b`` with ``W`` of shape
  ``[in, out]`` (transposed).

slmkit's layers replace one such module each, in place, under the same dotted name
(:func:`set_module`); format loaders rebuild them from :func:`linear_shape`.
"""

from __future__ import annotations

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """True for a GPT-2 style ``Conv1D`` (weight stored ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear or Conv1D module."""
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the sub-module at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
