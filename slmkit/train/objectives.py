"""Training objectives: what the one loop minimises.

An objective is any callable ``objective(model, batch) -> (loss, metrics)``:

* ``batch`` is a dict of tensors from a :class:`~slmkit.train.batches.BatchSource`. The
  loop only relies on ``batch["labels"]`` (``[B, T]``, :data:`IGNORE_INDEX` where nothing
  is predicted) to count tokens; everything else is the objective's business.
* ``loss`` is a scalar tensor to back-propagate (the loop scales it for accumulation).
* ``metrics`` is a dict of floats or 0-d tensors, averaged over a step and logged.

The loop is the same for every objective, so distillation and SFT slot in as new classes:

* SFT: same :class:`LMObjective`; the batch source writes :data:`IGNORE_INDEX` into the
  labels of prompt tokens.
* Distillation: an objective that holds the teacher, computes its logits on
  ``batch["input_ids"]`` under ``torch.no_grad()``, and mixes a KL term with the LM loss.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from slmkit.train.ops import IGNORE_INDEX, token_cross_entropy

__all__ = ["Objective", "LMObjective", "IGNORE_INDEX", "model_logits"]


class Objective(Protocol):
    """``objective(model, batch) -> (loss, metrics)``; see the module docstring."""

    name: str

    def __call__(self, model: torch.nn.Module,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]: ...


def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run a causal LM on ``batch["input_ids"]`` (``[B, T]``) and return logits ``[B, T, V]``."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    return model(**kwargs).logits


class LMObjective:
    """Next-token prediction (causal language modelling), the pretraining objective.

    Labels come pre-shifted from the batch source, so ``labels[:, t]`` is the token after
    ``input_ids[:, t]``; masked positions (:data:`IGNORE_INDEX`) are skipped, which is all
    SFT needs.
    """

    name = "lm"

    def __call__(self, model: torch.nn.Module,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model_logits(model, batch)                    # [B, T, V]
        loss = token_cross_entropy(logits, batch["labels"])
        return loss, {"loss": loss.detach()}
