"""What one party does with its own data, in slmkit's one training loop (no Flower here).

A client's round is :func:`train_round`: ``cfg.local_steps`` optimizer steps of the one
:class:`~slmkit.train.loop.Trainer` with the SFT objective on its samples, starting from
the global adapter; batches continue across rounds (round ``t`` reads micro-batches
``(t-1)·steps ...``), the optimizer starts afresh each round (as FedAvg clients do).
The server scores the global adapter with :func:`heldout_loss`, the same loop's
token-weighted validation. The bench calls both for its centralised and client-alone
baselines, so every arm trains in the same code.
"""

from __future__ import annotations

import math
import time
from typing import Any

from slmkit.errors import DataError
from slmkit.federated.config import FederateConfig

__all__ = ["load_examples", "train_round", "heldout_loss"]


def load_examples(cfg: FederateConfig, data: str | list[str], tok, max_samples: int | None = None):
    """Tokenized SFT samples of one party's data (its template resolved like finetune's).

    Raises:
        DataError: the data is missing, unreadable, empty or malformed (one sentence).
    """
    from pathlib import Path

    from slmkit.train.sft import load_sft_examples
    from slmkit.train.task_data import GENERATION_TASKS, default_template, is_builtin_task

    for spec in [data] if isinstance(data, str) else data:
        if not is_builtin_task(spec) and not Path(spec).expanduser().exists():
            raise DataError(f"'{spec}' does not exist; give a task JSONL, a folder of them "
                            f"or a built-in task ({', '.join(GENERATION_TASKS)}).")
    template = default_template(data) if cfg.template == "auto" else cfg.template
    return load_sft_examples(data, tok, cfg.seq_len, template, max_samples or cfg.max_samples)


def _train_config(cfg: FederateConfig, steps: int):
    """The loop's options for one round: constant LR after warm-up, no decay, no evals."""
    from slmkit.train.config import TrainConfig

    return TrainConfig(model=cfg.model, data="-", max_steps=steps, seq_len=cfg.seq_len,
                       batch_size=cfg.batch_size, lr=cfg.lr, min_lr_ratio=1.0,
                       warmup_steps=min(cfg.warmup_steps, steps), weight_decay=0.0,
                       val_fraction=0.0, log_every=steps, eval_every=steps,
                       checkpoint_every=steps, seed=cfg.seed, precision="fp32")


class _From:
    """A batch source read from micro-batch ``start`` on (rounds continue the data order)."""

    def __init__(self, batches, start: int):
        self.batches, self.start = batches, start

    def batch(self, index: int):
        return self.batches.batch(self.start + index)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def train_round(model, tok, examples, cfg: FederateConfig, round_no: int,
                steps: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Train ``model``'s adapter for one round on ``examples`` in the one loop.

    Args:
        round_no: 1-based round; picks where in the data order this round starts.
        steps: optimizer steps (default ``cfg.local_steps``).
        seed: the data-order seed (default ``cfg.seed``).

    Returns:
        ``{"train_loss", "steps", "tokens", "seconds"}``.
    """
    import torch

    from slmkit.train.loop import Trainer
    from slmkit.train.objectives import LMObjective
    from slmkit.train.sft import SFTBatches

    steps = steps or cfg.local_steps
    batches = SFTBatches(examples, cfg.seq_len, cfg.batch_size, _pad_id(tok),
                         seed=cfg.seed if seed is None else seed)
    torch.manual_seed(cfg.seed + round_no)
    t0 = time.perf_counter()
    trainer = Trainer(model, LMObjective(), _From(batches, (round_no - 1) * steps),
                      _train_config(cfg, steps))
    state = trainer.fit()
    losses = [r["loss"] for r in state.history if "loss" in r]
    model.eval()
    return {"train_loss": float(losses[-1]) if losses else math.nan, "steps": state.step,
            "tokens": state.tokens, "seconds": time.perf_counter() - t0}


def heldout_loss(model, tok, examples, cfg: FederateConfig) -> float:
    """Token-weighted completion loss of ``model`` on ``examples`` (each sample once)."""
    from slmkit.train.loop import Trainer
    from slmkit.train.objectives import LMObjective
    from slmkit.train.sft import SFTBatches

    if not examples:
        raise DataError("--eval-data holds no samples; give a task JSONL with rows.")
    ordered = SFTBatches(examples, cfg.seq_len, 1, _pad_id(tok))
    val = [ordered.batch(i) for i in range(len(examples))]   # one sample per batch, once
    trainer = Trainer(model, LMObjective(), ordered, _train_config(cfg, 1), val_batches=val)
    return float(trainer.evaluate()["val_loss"])
