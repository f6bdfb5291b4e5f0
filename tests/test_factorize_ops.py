"""Low-rank factorization math and LowRankLinear on small linears."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.factorize import ops
from slmkit.errors import ConfigError
from slmkit.nn.lowrank import LowRankLinear, merge_lowrank


def test_svd_at_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6)
    a, b = ops.svd_factor(layer.weight.detach(), rank=6)
    low = LowRankLinear.from_factors(a, b, layer.bias.detach())
    x = torch.randn(5, 8)
    torch.testing.assert_close(low(x), layer(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low.to_linear()(x), layer(x), atol=1e-5, rtol=1e-5)


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(1)
    w = torch.randn(6, 8)
    a, b = ops.svd_factor(w, rank=2)
    s = torch.linalg.svdvals(w.double())
    err = torch.linalg.norm((w - b @ a).double())
    torch.testing.assert_close(err, s[2:].pow(2).sum().sqrt(), atol=1e-4, rtol=1e-4)


def test_asvd_beats_svd_on_outlier_activations():
    torch.manual_seed(2)
    w = torch.randn(16, 32)
    scales = torch.ones(32)
    scales[:4] = 20.0  # a few outlier channels
    x = torch.randn(400, 32) * scales
    rank = 6
    a1, b1 = ops.svd_factor(w, rank)
    a2, b2 = ops.asvd_factor(w, x.abs().mean(0), rank)
    err_svd = torch.linalg.norm(x @ (w - b1 @ a1).T)
    err_asvd = torch.linalg.norm(x @ (w - b2 @ a2).T)
    assert err_asvd < 0.8 * err_svd


def test_rank_for_ratio_and_energy():
    assert ops.rank_for_ratio(192, 192, 0.8) == 76
    assert 76 * (192 + 192) <= 0.8 * 192 * 192
    with pytest.raises(ConfigError, match="gives rank 0"):
        ops.rank_for_ratio(6, 8, 0.1, "q_proj")
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert ops.rank_for_energy(s, 9 / 14) == 1
    assert ops.rank_for_energy(s, 0.9) == 2
    assert ops.rank_for_energy(s, 1.0) == 3
    assert not ops.saves_params(6, 8, 4) and ops.saves_params(6, 8, 3)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.2, -0.5])
def test_bad_ratio_is_refused(bad):
    with pytest.raises(ConfigError, match="outside"):
        ops.check_ratio(bad)


def test_merge_lowrank_swaps_modules_back():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    a, b = ops.svd_factor(model[0].weight.detach(), 3)
    model[0] = LowRankLinear.from_factors(a, b, torch.zeros(6))
    x = torch.randn(2, 8)
    before = model(x)
    assert merge_lowrank(model) == 1
    assert isinstance(model[0], torch.nn.Linear)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_allocate_ranks_meets_the_budget_and_favours_flat_spectra():
    shapes = {"flat": (64, 64), "steep": (64, 64), "wide": (32, 128)}
    spectra = {"flat": torch.ones(64), "steep": 0.5 ** torch.arange(64.0),
               "wide": torch.linspace(2, 1, 32)}
    ranks = ops.allocate_ranks(spectra, shapes, 0.5)
    params = sum(r * (o + i) for (n, r), (o, i) in zip(ranks.items(), shapes.values()))
    dense = sum(o * i for o, i in shapes.values())
    assert 0.45 * dense < params <= 0.5 * dense
    assert ranks["steep"] <= 3 < ranks["flat"]     # the steep spectrum gives up (almost) all
    # the dropped energy is never more than a uniform split of the same budget drops
    def lost(rk):
        return sum(float((spectra[n][rk[n]:] ** 2).sum() / (spectra[n] ** 2).sum())
                   for n in rk)
    uniform = {n: ops.rank_for_ratio(o, i, 0.5) for n, (o, i) in shapes.items()}
    assert lost(ranks) < lost(uniform)
    with pytest.raises(ConfigError, match="--ratio"):
        ops.allocate_ranks(spectra, shapes, 0.01)
