"""The training loop: overfitting, exact resume, schedule, decay groups, accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slmkit.errors import validated
from slmkit.train.batches import PackedBatches, eval_batches
from slmkit.train.config import TrainConfig
from slmkit.train.loop import Trainer
from slmkit.train.objectives import IGNORE_INDEX, LMObjective
from slmkit.train.ops import lr_at, param_groups, token_cross_entropy
from tests.conftest import build_tiny_model


def _cfg(**kw) -> TrainConfig:
    base = dict(model="x", max_steps=20, seq_len=32, batch_size=4, lr=3e-3, warmup_steps=3,
                eval_every=5, checkpoint_every=10, keep_checkpoints=5, log_every=1,
                precision="fp32", eval_tokens=256)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def stream(tokenizer):
    rng = np.random.default_rng(0)
    return rng.integers(0, len(tokenizer), size=4000).astype(np.uint16)


class FixedBatch:
    """The same batch at every index: for overfitting."""

    def __init__(self, batch):
        self.b, self.batch_size, self.seq_len = batch, batch["input_ids"].shape[0], 32

    def batch(self, index):
        return self.b


def test_cross_entropy_matches_slow_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = IGNORE_INDEX
    got = token_cross_entropy(logits, labels)
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t]]
             for b in range(2) for t in range(5) if labels[b, t] != IGNORE_INDEX]
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-6)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 1.0, 4, 0.0) == pytest.approx(0.25)
    assert lr_at(3, 1.0, 4, 0.0) == pytest.approx(1.0)
    assert lr_at(4, 1.0, 4, 0.0) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 4, 0.5, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(10, 1.0, 4, 1.0, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_weight_decay_on_matrices_only(tokenizer):
    model = build_tiny_model("llama", tokenizer)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["params"]
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["params"]
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique


def test_packed_batches_are_deterministic_and_cover_an_epoch(stream):
    a = PackedBatches(stream, seq_len=32, batch_size=4, seed=1)
    b = PackedBatches(stream, seq_len=32, batch_size=4, seed=1)
    per_epoch = a.n_chunks // 4
    seen = [c for i in range(per_epoch) for c in a.chunk_ids(i)]
    assert len(set(seen)) == len(seen)
    torch.testing.assert_close(a.batch(7), b.batch(7))
    x = a.batch(3)
    assert x["input_ids"].shape == (4, 32)
    torch.testing.assert_close(x["input_ids"][:, 1:], x["labels"][:, :-1])
    assert PackedBatches(stream, 32, 4, seed=2).chunk_ids(0) != a.chunk_ids(0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_overfits_one_batch(tokenizer, stream, precision):
    torch.manual_seed(0)
    model = build_tiny_model("llama", tokenizer)
    batch = PackedBatches(stream, 32, 4).batch(0)
    trainer = Trainer(model, LMObjective(), FixedBatch(batch),
                      _cfg(max_steps=25, lr=2e-2, warmup_steps=2, precision=precision))
    state = trainer.fit()
    losses = [r["loss"] for r in state.history]
    assert losses[0] > math.log(len(tokenizer)) - 1.0
    assert losses[-1] < 0.3 * losses[0]
    assert all(math.isfinite(x) for x in losses)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_grad_accumulation_equals_big_batch(tokenizer, stream):
    """2 x 2 sequences accumulated gives the same update as one batch of 4."""
    def run(batch_size, accum):
        torch.manual_seed(0)
        model = build_tiny_model("llama", tokenizer)
        source = PackedBatches(stream, 32, batch_size, seed=0)
        Trainer(model, LMObjective(), source,
                _cfg(max_steps=2, batch_size=batch_size, grad_accum=accum)).fit()
        return model.lm_head.weight.detach().clone()

    torch.testing.assert_close(run(4, 1), run(2, 2), atol=2e-5, rtol=1e-4)


def test_resume_matches_straight_run(tokenizer, stream, tmp_path):
    """20 steps straight == 10 steps, checkpoint, new process state, resume for 10."""
    def make(root):
        torch.manual_seed(0)
        model = build_tiny_model("llama", tokenizer)
        source = PackedBatches(stream, 32, 4, seed=0)
        val = eval_batches(stream[:1000], 32, 4, 256)
        return model, Trainer(model, LMObjective(), source, _cfg(), val_batches=val,
                              val_bytes_per_token=3.0, checkpoint_root=root)

    model_a, straight = make(tmp_path / "a")
    state_a = straight.fit()
    model_b, first = make(tmp_path / "b")
    first.fit(until_step=10)
    torch.manual_seed(123)           # resume must restore the RNG, not rely on it
    model_c, resumed = make(tmp_path / "b")
    resumed.resume(tmp_path / "b" / "step-00000010")
    state_c = resumed.fit()
    assert state_c.step == 20 and state_c.tokens == state_a.tokens
    loss_a = [r["loss"] for r in state_a.history]
    loss_c = [r["loss"] for r in state_c.history]
    np.testing.assert_allclose(loss_c, loss_a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([r["val_loss"] for r in state_c.val_history],
                               [r["val_loss"] for r in state_a.val_history], rtol=1e-6)
    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
        torch.testing.assert_close(pa, pc, atol=1e-6, rtol=1e-6, msg=name)
    kept = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert kept == ["step-00000010", "step-00000020"]


def test_checkpoints_pruned_to_last_k(tokenizer, stream, tmp_path):
    torch.manual_seed(0)
    model = build_tiny_model("llama", tokenizer)
    trainer = Trainer(model, LMObjective(), PackedBatches(stream, 32, 2), _cfg(
        max_steps=8, checkpoint_every=2, keep_checkpoints=2), checkpoint_root=tmp_path)
    trainer.fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006", "step-00000008"]


def test_budget_needs_one_limit_and_token_budget_stops():
    from slmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="training budget"):
        validated(TrainConfig, model="nano")
    cfg = TrainConfig(model="nano", max_tokens=1000, seq_len=32, batch_size=4)
    assert cfg.total_steps() == 8
