"""QuantLinear: kernels agree with ``x @ dequantized_weightᵀ``, dense round trip, fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slmkit.nn.packing import quantize_rtn
from slmkit.nn.quant_linear import QuantLinear, set_kernel_mode

CASES = [  # bits, group, sym, out, in, expected CPU kernel
    (8, -1, True, 48, 64, "int8pack"),
    (8, 32, False, 48, 64, "dequant"),
    (4, 32, True, 48, 64, "int4pack"),
    (4, 128, False, 64, 256, "int4pack"),
    (4, -1, True, 48, 64, "int4pack"),
    (4, 32, True, 40, 64, "dequant"),     # out % 16 != 0: tinygemm cannot take it
    (4, 16, False, 48, 64, "dequant"),    # group 16: not a tinygemm group size
    (3, 32, False, 48, 64, "dequant"),
]


def _layer(bits, group, sym, out, inp, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    q, s, z = quantize_rtn(lin.weight.detach(), bits, group, sym)
    return lin, QuantLinear.from_codes(q, s, z, bits, group, sym,
                                       bias=lin.bias.detach() if bias else None)


@pytest.mark.parametrize("bits,group,sym,out,inp,kernel", CASES)
def test_forward_matches_dequantized_matmul(bits, group, sym, out, inp, kernel):
    lin, ql = _layer(bits, group, sym, out, inp)
    assert ql.kernel_name("cpu") == kernel
    x = torch.randn(2, 5, inp)
    with torch.no_grad():
        y = ql(x)
        ref = x @ ql.dequantize_weight().t() + lin.bias
        dense = lin(x)
    assert y.shape == (2, 5, out) and y.dtype == torch.float32
    # bf16 activations in the packed kernels: about 3 significant digits.
    tol = 0.02 if kernel != "dequant" else 1e-5
    assert float((y - ref).abs().max()) <= tol * float(ref.abs().max())
    # And the quantized layer approximates the original one.
    assert float((ref - dense).abs().max()) < 0.25 * float(dense.abs().max())


def test_decode_shape_and_bf16_input():
    _, ql = _layer(4, 32, True, 48, 64)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = ql(x)
    assert y.shape == (1, 1, 48) and y.dtype == torch.bfloat16


def test_dequant_mode_is_exact_and_grad_flows_to_inputs():
    _, ql = _layer(4, 32, True, 48, 64)
    x = torch.randn(3, 64, requires_grad=True)
    y = ql(x)  # grad enabled + input requires grad: dequantized on the fly, with autograd
    g = torch.randn_like(y)
    y.backward(g)
    w = ql.dequantize_weight()
    torch.testing.assert_close(y, x @ w.t() + ql.bias)
    torch.testing.assert_close(x.grad, g @ w)
    # nothing dense is kept: training over a packed base (QLoRA) stays at the packed size
    assert not any(t.dtype.is_floating_point and t.shape == w.shape
                   for prep in ql._cache.values() if isinstance(prep, tuple) for t in prep)
    set_kernel_mode("dequant")
    try:
        with torch.no_grad():
            torch.testing.assert_close(ql(x), x @ ql.dequantize_weight().t() + ql.bias)
    finally:
        set_kernel_mode("auto")


def test_to_dense_and_input_scale():
    lin, ql = _layer(4, 32, False, 48, 64)
    scale = torch.rand(64) + 0.5
    q, s, z = quantize_rtn(lin.weight.detach() * scale, 4, 32, False)
    scaled = QuantLinear.from_codes(q, s, z, 4, 32, False, bias=lin.bias.detach(),
                                    input_scale=scale)
    dense = scaled.to_dense()
    assert isinstance(dense, nn.Linear)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), (x / scale) @ scaled.dequantize_weight().t()
                                   + lin.bias, atol=1e-5, rtol=1e-5)
        assert float((scaled(x) - dense(x)).abs().max()) < 0.02 * float(dense(x).abs().max())


def test_state_dict_is_compact_and_reloads():
    _, ql = _layer(4, 128, True, 64, 256, bias=False)
    sd = ql.state_dict()
    assert set(sd) == {"qweight", "scales"}
    assert sd["qweight"].shape == (64, 128) and sd["qweight"].dtype == torch.uint8
    assert sd["scales"].dtype == torch.float16
    fresh = QuantLinear(256, 64, 4, 128, True)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ql(x))
    assert ql.bits_per_weight == pytest.approx(4.125)


def test_3bit_codes_are_packed_and_old_unpacked_files_still_load():
    _, ql = _layer(3, 32, False, 48, 64)
    sd = ql.state_dict()
    assert sd["qweight"].shape == (48, 24)               # 64 codes in 24 bytes per row
    assert ql.bits_per_weight == pytest.approx(3 + 16 / 32 + 8 / 32)
    x = torch.randn(2, 64)
    for qweight in (sd["qweight"], ql.codes()):           # packed, and one code per byte
        fresh = QuantLinear(64, 48, 3, 32, False, bias=True)
        fresh.load_state_dict({**sd, "qweight": qweight.clone()})
        assert torch.equal(fresh.qweight, sd["qweight"])
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), ql(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_dequantized_matmul():
    _, ql = _layer(4, 128, True, 64, 256)
    ql = ql.cuda()
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = ql(x).float()
        ref = x.float() @ ql.dequantize_weight().t() + ql.bias
    assert float((y - ref).abs().max()) <= 0.02 * float(ref.abs().max())
