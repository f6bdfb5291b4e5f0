"""Distillation math (slmkit.train.kd_ops) against slow references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slmkit.train.kd_ops import (
    IGNORE_INDEX,
    KD_LOSSES,
    chunked_kd_loss,
    divergence,
    teacher_topk,
    token_kd,
)


def _slow_divergence(t_logits, s_logits, kind, temperature, beta):
    """Per-row divergence with Python loops in float64 (the definitions, nothing shared)."""
    out = []
    for t_row, s_row in zip(t_logits.tolist(), s_logits.tolist()):
        zt = [x / temperature for x in t_row]
        zs = [x / temperature for x in s_row]
        nt, ns = sum(math.exp(x) for x in zt), sum(math.exp(x) for x in zs)
        p = [math.exp(x) / nt for x in zt]
        q = [math.exp(x) / ns for x in zs]
        if kind == "fkl":
            d = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        elif kind == "rkl":
            d = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        else:
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
            d = beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + \
                (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
        out.append(d * temperature ** 2)
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 40, generator=g) * 3, torch.randn(6, 40, generator=g) * 3


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_matches_slow_reference(logits, kind, temperature):
    t, s = logits
    got = token_kd(s, ("dense", t), kind, temperature, beta=0.3)
    want = _slow_divergence(t, s, kind, temperature, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_zero_for_equal_and_positive_otherwise(logits, kind):
    t, s = logits
    same = token_kd(t, ("dense", t), kind, 2.0, 0.5)
    assert same.abs().max() < 1e-6
    assert (token_kd(s, ("dense", t), kind, 2.0, 0.5) > 1e-3).all()
    lp, ids = teacher_topk(t, 5, 1.0)
    student_equal = torch.log_softmax(t, -1)            # same distribution, shifted logits
    assert token_kd(student_equal + 7.0, ("topk", lp, ids), kind, 1.0, 0.5).abs().max() < 2e-3
    assert (token_kd(s, ("topk", lp, ids), kind, 1.0, 0.5) > 1e-3).all()


def test_jsd_is_symmetric_at_half_and_rejects_bad_beta(logits):
    t, s = logits
    a = divergence(F.log_softmax(t, -1), F.log_softmax(s, -1), "jsd", 0.5)
    b = divergence(F.log_softmax(s, -1), F.log_softmax(t, -1), "jsd", 0.5)
    torch.testing.assert_close(a, b)
    assert (a <= math.log(2) + 1e-6).all()               # JSD(0.5) is bounded by ln 2
    with pytest.raises(ValueError):
        divergence(F.log_softmax(t, -1), F.log_softmax(s, -1), "jsd", 1.0)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_topk_with_full_k_equals_dense(logits, kind):
    t, s = logits
    lp, ids = teacher_topk(t, t.shape[1], 1.5)
    dense = token_kd(s, ("dense", t), kind, 1.5, 0.5)
    torch.testing.assert_close(token_kd(s, ("topk", lp, ids), kind, 1.5, 0.5), dense,
                               rtol=1e-2, atol=1e-3)    # fp16 teacher log-probs


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_chunked_equals_unchunked_values_and_grads(kind):
    torch.manual_seed(0)
    N, H, V, vocab = 37, 16, 50, 45                      # 5 padded vocabulary rows
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(N, H, requires_grad=True)
    teacher = torch.randn(N, vocab) * 2
    labels = torch.randint(0, vocab, (N,))
    labels[:4] = IGNORE_INDEX
    mask = (torch.rand(N) > 0.2).float()

    def run(chunk, ckpt):
        hidden.grad, head.weight.grad = None, None
        ce, kd = chunked_kd_loss(hidden, head, labels, mask, lambda a, b: ("dense", teacher[a:b]),
                                 vocab=vocab, kind=kind, temperature=1.3, beta=0.4,
                                 chunk_size=chunk, use_checkpoint=ckpt)
        (ce + kd).backward()
        return ce.detach(), kd.detach(), hidden.grad.clone(), head.weight.grad.clone()

    # plain reference: one full [N, V] logits tensor
    hidden.grad = None
    logits = head(hidden)
    ce_ref = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    kd_ref = (token_kd(logits[:, :vocab], ("dense", teacher), kind, 1.3, 0.4) * mask).sum()
    (ce_ref + kd_ref).backward()
    ref = (ce_ref.detach(), kd_ref.detach(), hidden.grad.clone(), head.weight.grad.clone())
    for chunk, ckpt in [(5, True), (8, False), (N, True)]:
        for got, want in zip(run(chunk, ckpt), ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_gradient_reaches_the_teacher_target():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 20)
    hidden = torch.randn(10, 8, requires_grad=True)
    teacher = torch.randn(10, 20, requires_grad=True)
    ce, kd = chunked_kd_loss(hidden, head, torch.randint(0, 20, (10,)), torch.ones(10),
                             lambda a, b: ("dense", teacher[a:b].detach()), vocab=20,
                             chunk_size=4)
    kd.backward()
    assert teacher.grad is None and hidden.grad.abs().sum() > 0
