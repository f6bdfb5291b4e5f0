"""Pure quantization math against slow references: grids, packing, GPTQ, AWQ."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.hessian import cholesky_inverse_upper, hessian_reference
from slmkit.compress.quantize.awq_ops import awq_search_clip, awq_search_scale
from slmkit.compress.quantize.gptq_ops import gptq_quantize_weight, layer_output_error
from slmkit.compress.quantize.ops import check_scheme, fake_quantize
from slmkit.errors import ConfigError
from slmkit.nn.packing import (
    compute_qparams,
    dequantize_codes,
    effective_bits,
    pack_int3,
    pack_int4,
    quantize_rtn,
    unpack_int3,
    unpack_int4,
)

SCHEMES = [(8, -1, True), (8, 32, False), (4, 32, True), (4, 16, False), (4, -1, True),
           (3, 32, False)]


def _rtn_reference(w, bits, group_size, sym):
    """Element-by-element RTN, one group at a time, in float64."""
    out, inp = w.shape
    g = inp if group_size == -1 else group_size
    res = torch.zeros(out, inp, dtype=torch.float64)
    for o in range(out):
        for start in range(0, inp, g):
            vals = w[o, start:start + g].double()
            if sym:
                scale = float(vals.abs().max()) / (2 ** (bits - 1) - 1)
                zero = 2 ** (bits - 1)
            else:
                lo, hi = min(float(vals.min()), 0.0), max(float(vals.max()), 0.0)
                scale = (hi - lo) / (2 ** bits - 1)
                zero = min(max(round(-lo / scale), 0), 2 ** bits - 1)
            scale = float(torch.tensor(scale).half())  # stored as fp16
            for j, v in enumerate(vals.tolist()):
                q = min(max(round(v / scale) + zero, 0), 2 ** bits - 1)
                res[o, start + j] = (q - zero) * scale
    return res


@pytest.mark.parametrize("bits,group_size,sym", SCHEMES)
def test_rtn_matches_reference_and_error_bound(bits, group_size, sym):
    torch.manual_seed(bits + group_size)
    w = torch.nn.Linear(64, 6).weight.detach()
    q, scale, zero = quantize_rtn(w, bits, group_size, sym)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2 ** bits - 1
    w_hat = dequantize_codes(q, scale, zero, group_size)
    ref = _rtn_reference(w, bits, group_size, sym)
    # Ties at .5 may round differently in float32: allow a handful of one-step differences.
    step = scale.repeat_interleave(64 if group_size == -1 else group_size, 1)
    assert ((w_hat.double() - ref).abs() > 1e-6).float().mean() < 0.02
    # Round to nearest: within half a step (symmetric), or one step for the extreme values
    # an asymmetric grid loses to its rounded zero point.
    bound = step / 2 if sym else step
    assert torch.all((w - w_hat).abs() <= bound * 1.01 + 1e-7)
    assert (w - w_hat).abs().mean() <= step.mean() / 4 * 1.2


def test_asymmetric_grid_contains_zero_and_zero_is_exact():
    w = torch.tensor([[0.5, 0.9, 0.7, 0.0, 0.3, 0.1, 0.2, 0.8]])
    q, scale, zero = quantize_rtn(w, 4, -1, sym=False)
    w_hat = dequantize_codes(q, scale, zero, -1)
    assert w_hat[0, 3] == 0 and float(zero[0, 0]) == 0


def test_pack_unpack_int4_round_trip_and_layout():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (6, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # low nibble first


@pytest.mark.parametrize("cols", [64, 61, 8, 3])
def test_pack_unpack_int3_round_trip_and_layout(cols):
    torch.manual_seed(cols)
    q = torch.randint(0, 8, (5, cols), dtype=torch.uint8)
    packed = pack_int3(q)
    assert packed.shape == (5, 3 * -(-cols // 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int3(packed, cols), q)
    # columns 0..7 of a row are the 24-bit little-endian number sum q_i << 3i
    first = q[0, :8].tolist() + [0] * (8 - min(cols, 8))
    v = sum(c << (3 * i) for i, c in enumerate(first))
    assert packed[0, :3].tolist() == [v & 0xFF, (v >> 8) & 0xFF, v >> 16]


def test_check_scheme_rejects_bad_combinations():
    with pytest.raises(ConfigError, match="--bits 5"):
        check_scheme(5, 128)
    with pytest.raises(ConfigError, match="--group-size 100"):
        check_scheme(4, 100)
    with pytest.raises(ConfigError, match="does not divide the 96 input features of x.fc"):
        check_scheme(4, 64, 96, "x.fc")
    check_scheme(4, 32, 96, "x.fc")


def test_effective_bits():
    assert effective_bits(4, 128, 576, sym=True) == pytest.approx(4.125)
    assert effective_bits(4, 32, 576, sym=False) == pytest.approx(4 + 0.5 + 0.25)
    assert effective_bits(8, -1, 512, sym=True) == pytest.approx(8 + 16 / 512)


def _correlated_inputs(n=2048, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, generator=gen) @ torch.randn(16, d, generator=gen)
    return base + 0.1 * torch.randn(n, d, generator=gen)


def _gptq_reference(w, hessian, bits, group_size, sym, damp):
    """Unbatched OBQ-style loop (no lazy blocks, no act-order), float64."""
    W = w.double().clone()
    U = cholesky_inverse_upper(hessian, damp).double()
    cols = W.shape[1]
    g = cols if group_size == -1 else group_size
    scale = zero = None
    for i in range(cols):
        if i % g == 0:
            scale, zero = compute_qparams(W[:, i:i + g].float(), bits, -1, sym)
            scale, zero = scale[:, 0].double(), zero[:, 0].double()
        q = (torch.clamp(torch.round(W[:, i] / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[:, i] = q
    return W


@pytest.mark.parametrize("group_size", [-1, 16])
def test_gptq_lazy_blocks_match_unbatched_reference(group_size):
    torch.manual_seed(1)
    w = torch.nn.Linear(64, 48).weight.detach()
    h = hessian_reference(_correlated_inputs()).float()
    q, s, z = gptq_quantize_weight(w, h, 4, group_size, sym=False, damp=0.01, block_size=16)
    got = dequantize_codes(q, s, z, group_size).double()
    ref = _gptq_reference(w, h, 4, group_size, False, 0.01)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits,group_size,sym,act_order", [(4, -1, True, False),
                                                            (4, 16, False, False),
                                                            (4, 16, True, True),
                                                            (3, -1, False, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, sym, act_order):
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 48)
    w = lin.weight.detach()
    x = _correlated_inputs(seed=3)
    h = hessian_reference(x).float()
    rtn = fake_quantize(w, bits, group_size, sym)
    q, s, z = gptq_quantize_weight(w, h, bits, group_size, sym, block_size=16,
                                   act_order=act_order)
    gptq = dequantize_codes(q, s, z, group_size)
    assert layer_output_error(x, w, gptq) < 0.5 * layer_output_error(x, w, rtn)


def _outlier_inputs(n=1024, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:, :4] *= 25  # a few salient channels, as in LLM activations
    return x


@pytest.mark.parametrize("seed", range(4))
def test_awq_scale_search_never_worse_than_scale_one(seed):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(48, 64, generator=gen) * 0.05, torch.randn(32, 64, generator=gen)]
    x = _outlier_inputs(seed=seed) if seed % 2 else torch.randn(512, 64, generator=gen)
    scale, errors = awq_search_scale(x, weights, 4, 32, sym=True, n_grid=10)
    assert len(errors) == 11 and min(errors) <= errors[0]
    rtn_err = sum(layer_output_error(x, w, fake_quantize(w, 4, 32, True)) * w.shape[0]
                  for w in weights) / 80
    assert errors[0] == pytest.approx(rtn_err, rel=1e-4)  # candidate 0 is plain RTN
    awq_err = sum(layer_output_error(x, w, fake_quantize(w * scale, 4, 32, True) / scale)
                  * w.shape[0] for w in weights) / 80
    assert awq_err <= rtn_err * (1 + 1e-5)


def test_awq_helps_with_salient_channels_and_clip_never_hurts():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.05
    x = _outlier_inputs()
    scale, errors = awq_search_scale(x, [w], 4, 32, sym=True)
    assert min(errors) < 0.8 * errors[0]
    ws, xs = w * scale, x / scale
    ratios = awq_search_clip(xs, ws, 4, 32, sym=True, max_tokens=4096)
    assert ratios.shape == (48, 2) and float(ratios.min()) >= 0.5 and float(ratios.max()) <= 1
    plain = layer_output_error(xs, ws, fake_quantize(ws, 4, 32, True))
    clipped = layer_output_error(xs, ws, fake_quantize(ws, 4, 32, True, clip=ratios))
    assert clipped <= plain * (1 + 1e-5)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_preserve_zeros_keeps_pruned_weights_at_zero(act_order):
    torch.manual_seed(4)
    w = torch.nn.Linear(64, 48).weight.detach().clone()
    w[torch.rand_like(w) < 0.5] = 0  # 50% unstructured sparsity
    x = _correlated_inputs(seed=5)
    h = hessian_reference(x).float()
    q, s, z = gptq_quantize_weight(w, h, 4, 16, sym=False, act_order=act_order)
    assert (dequantize_codes(q, s, z, 16)[w == 0] != 0).any()  # plain GPTQ refills them
    q, s, z = gptq_quantize_weight(w, h, 4, 16, sym=False, act_order=act_order,
                                   preserve_zeros=True)
    w_hat = dequantize_codes(q, s, z, 16)
    assert torch.all(w_hat[w == 0] == 0)
    assert layer_output_error(x, w, w_hat) < layer_output_error(x, w, fake_quantize(w, 4, 16,
                                                                                   False))


def test_auto_group_size_is_the_largest_that_divides_every_width():
    from slmkit.compress.quantize.ops import auto_group_size

    assert auto_group_size([576, 1536]) == 64          # SmolLM2-135M: 576 is 9 x 64
    assert auto_group_size([256, 512]) == 128
    assert auto_group_size([96, 256]) == 32
    assert auto_group_size([100]) == -1                # no group fits: per channel


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, 64), (8, -1)])
def test_fake_quantize_is_exactly_the_stored_grid(bits, group_size, sym):
    """The fast in-place fake quantization equals decoding the stored codes bit for bit."""
    from slmkit.nn.packing import dequantize_codes, quantize_rtn

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 3
    w[0, :40] = 0                                          # an all-zero group
    q, scale, zero = quantize_rtn(w, bits, group_size, sym)
    assert torch.equal(fake_quantize(w, bits, group_size, sym),
                       dequantize_codes(q, scale, zero, group_size))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_stacked_rows_equals_each_linear_alone(act_order):
    """Linears reading the same input share one Hessian and GPTQ solves every row on its
    own, so stacking q/k/v (or gate/up) row-wise gives each one's codes unchanged."""
    from slmkit.compress.quantize.gptq_ops import gptq_quantize_weight

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=gen)
    x[:, :4] *= 10
    h = 2 * x.t() @ x / x.shape[0]
    ws = [torch.randn(n, 64, generator=gen) for n in (48, 16, 16)]
    ws[1][0, :8] = 0                                           # zeros that stay zeros
    alone = [gptq_quantize_weight(w, h, 4, 32, False, act_order=act_order,
                                  block_size=16) for w in ws]
    codes, scale, zero = gptq_quantize_weight(torch.cat(ws), h, 4, 32, False,
                                              act_order=act_order, block_size=16)
    rows = [w.shape[0] for w in ws]
    for (c, s, z), c2, s2, z2 in zip(alone, codes.split(rows), scale.split(rows),
                                     zero.split(rows)):
        assert torch.equal(c, c2) and torch.equal(s, s2) and torch.equal(z, z2)


@pytest.mark.parametrize("group_size,sym", [(16, True), (-1, False)])
def test_hessian_clip_matches_slow_search_and_never_hurts(group_size, sym):
    """Each group's ratio is the one a slow loop over ratios picks by ``dᵀ H_GG d``; the
    chosen ranges never raise that error over plain min/max (ratio 1 is a candidate)."""
    from slmkit.compress.quantize.gptq_ops import hessian_clip

    torch.manual_seed(5)
    w = torch.randn(12, 64)
    w[:, 3] *= 6                                                   # an outlier column
    h = hessian_reference(_correlated_inputs(seed=6)).float()
    clip = hessian_clip(w, h, 4, group_size, sym, n_grid=10, max_shrink=0.5)
    g = 64 if group_size == -1 else group_size
    ratios = [1.0 - k / 10 for k in range(5)]
    for o in range(12):
        for gi in range(64 // g):
            cols = slice(gi * g, (gi + 1) * g)
            hg = h[cols, cols].double()

            def err(r):
                q = fake_quantize(w[o:o + 1, cols], 4, -1, sym, clip=r)
                d = (w[o:o + 1, cols] - q).double()[0]
                return float(d @ hg @ d)
            errs = [err(r) for r in ratios]
            assert clip[o, gi] == pytest.approx(ratios[errs.index(min(errs))])
            assert err(float(clip[o, gi])) <= err(1.0) + 1e-9
    assert (clip < 1).any()                                       # the search does clip


def test_gptq_clip_search_lowers_output_error_on_outlier_weights():
    torch.manual_seed(7)
    w = torch.randn(48, 64) * 0.05
    w[torch.rand_like(w) < 0.02] *= 12                            # heavy-tailed weights
    x = _correlated_inputs(seed=8)
    h = hessian_reference(x).float()
    errs = {}
    for clip in (False, True):
        q, s, z = gptq_quantize_weight(w, h, 4, 16, sym=True, clip_search=clip)
        errs[clip] = layer_output_error(x, w, dequantize_codes(q, s, z, 16))
    assert errs[True] < 0.9 * errs[False]
