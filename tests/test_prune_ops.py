"""Pure pruning math against slow references, on small linears."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.prune import ops
from slmkit.errors import ConfigError


def _hinv(x: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (2 X^T X + damp I)^-1 for x: [tokens, in] (reference)."""
    h = 2 * x.T.double() @ x.double()
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                 upper=True).float()


def _correlated_inputs(n_tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * 0.5 + torch.eye(dim)
    scales = torch.logspace(-1, 1, dim)
    return (torch.randn(n_tokens, dim, generator=g) @ mix) * scales  # [tokens, in]


def test_wanda_mask_keeps_highest_scores_per_row():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6)
    act = torch.rand(8) * 3
    scores = ops.wanda_scores(layer.weight.detach(), act)
    mask = ops.row_mask(scores, 0.5)
    for r in range(6):  # slow reference: sort each row
        order = sorted(range(8), key=lambda j: float(scores[r, j]), reverse=True)
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == set(order[:4])
    assert torch.equal(scores, layer.weight.detach().abs() * act[None, :])


def test_wanda_differs_from_magnitude_when_activations_vary():
    w = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    act = torch.tensor([10.0, 1.0])
    assert ops.row_mask(ops.magnitude_scores(w), 0.5).tolist() == [[False, True], [True, False]]
    assert ops.row_mask(ops.wanda_scores(w, act), 0.5).tolist() == [[True, False], [True, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_holds_pattern_exactly(n, m):
    torch.manual_seed(1)
    scores = torch.rand(6, 16)
    mask = ops.nm_mask(scores, n, m)
    groups = mask.reshape(6, 16 // m, m)
    assert (groups.sum(dim=2) == n).all()
    for r in range(6):
        for g in range(16 // m):
            block = scores[r, g * m:(g + 1) * m]
            top = set(torch.topk(block, n).indices.tolist())
            assert set(torch.nonzero(groups[r, g]).flatten().tolist()) == top
    assert ops.holds_nm(scores * mask, n, m)


def _sparsegpt_reference(w, hinv, sparsity, block):
    """No lazy batching: every column update is applied to all later columns at once."""
    w = w.clone().double()
    hinv = hinv.double()
    mask = torch.ones_like(w, dtype=torch.bool)
    for i in range(w.shape[1]):
        if i % block == 0:
            blk = slice(i, min(i + block, w.shape[1]))
            d = torch.diag(hinv)[blk]
            mask[:, blk] = ops.row_mask(w[:, blk] ** 2 / d[None, :] ** 2, sparsity)
        err = w[:, i] * (~mask[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
    w[~mask] = 0
    return w.float(), mask


def test_sparsegpt_matches_slow_reference():
    torch.manual_seed(2)
    w = torch.nn.Linear(16, 6).weight.detach()
    hinv = _hinv(_correlated_inputs(256, 16))
    got, mask = ops.sparsegpt_prune(w, hinv, sparsity=0.5, block_size=8)
    ref, ref_mask = _sparsegpt_reference(w, hinv, 0.5, 8)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert ops.achieved_sparsity(got) == 0.5


def test_sparsegpt_output_error_below_magnitude_on_correlated_inputs():
    torch.manual_seed(3)
    layer = torch.nn.Linear(32, 16, bias=False)
    w = layer.weight.detach()
    x = _correlated_inputs(512, 32, seed=3)
    hinv = _hinv(x)
    pruned, _ = ops.sparsegpt_prune(w, hinv, sparsity=0.5)
    magnitude = w * ops.row_mask(ops.magnitude_scores(w), 0.5)
    err_sgpt = torch.linalg.norm(x @ (w - pruned).T)
    err_mag = torch.linalg.norm(x @ (w - magnitude).T)
    assert ops.achieved_sparsity(pruned) == ops.achieved_sparsity(magnitude) == 0.5
    assert err_sgpt < 0.8 * err_mag


def test_sparsegpt_nm_pattern_and_error():
    torch.manual_seed(4)
    w = torch.nn.Linear(32, 8, bias=False).weight.detach()
    x = _correlated_inputs(512, 32, seed=4)
    pruned, mask = ops.sparsegpt_prune(w, _hinv(x), nm=(2, 4), block_size=6)
    assert ops.holds_nm(pruned, 2, 4) and (mask.reshape(8, 8, 4).sum(2) == 2).all()
    magnitude = w * ops.nm_mask(w.abs(), 2, 4)
    assert torch.linalg.norm(x @ (w - pruned).T) < torch.linalg.norm(x @ (w - magnitude).T)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_range_is_refused(bad):
    with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
        ops.check_sparsity(bad)


def test_pattern_parsing_and_divisibility():
    assert ops.parse_pattern("2:4") == (2, 4)
    for bad in ("2-4", "4:4", "0:4", "x"):
        with pytest.raises(ConfigError):
            ops.parse_pattern(bad)
    with pytest.raises(ConfigError, match="does not divide the input dimension 6"):
        ops.check_pattern_fits(6, 4, "layers.0.q_proj")
