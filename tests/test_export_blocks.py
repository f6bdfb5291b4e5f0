"""GGML block packing: bit-exact against a slow, literal transcription of ggml's reference
quantizers (``ggml-quants.c``) and against the ``gguf`` package's numpy quantizers."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from slmkit.export import ggml_blocks as gb
from slmkit.export.gguf_meta import permute_rope_rows


def _f16(x: float) -> bytes:
    return struct.pack("<e", np.float32(x))


def _f32(x) -> np.float32:
    return np.float32(x)


def slow_q8_0(row: np.ndarray) -> bytes:
    """``quantize_row_q8_0_ref``: one block at a time, one weight at a time."""
    out = b""
    for b in range(len(row) // 32):
        x = [_f32(v) for v in row[b * 32:(b + 1) * 32]]
        amax = _f32(0)
        for v in x:
            amax = max(amax, _f32(abs(v)))
        d = _f32(amax / _f32(127))
        inv = _f32(1) / d if d else _f32(0)
        qs = []
        for v in x:
            p = _f32(v * inv)
            qs.append(int(math.copysign(math.floor(abs(p) + 0.5), p)))  # C roundf (exact in f64)
        out += _f16(d) + struct.pack("<32b", *qs)
    return out


def slow_q4_0(row: np.ndarray) -> bytes:
    """``quantize_row_q4_0_ref``."""
    out = b""
    for b in range(len(row) // 32):
        x = [_f32(v) for v in row[b * 32:(b + 1) * 32]]
        amax, mx = _f32(0), _f32(0)
        for v in x:
            if amax < abs(v):
                amax, mx = _f32(abs(v)), v
        d = _f32(mx / _f32(-8))
        inv = _f32(1) / d if d else _f32(0)
        q = [min(15, int(_f32(_f32(v * inv) + _f32(8.5)))) for v in x]
        out += _f16(d) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return out


def slow_q4_1(row: np.ndarray) -> bytes:
    """``quantize_row_q4_1_ref``."""
    out = b""
    for b in range(len(row) // 32):
        x = [_f32(v) for v in row[b * 32:(b + 1) * 32]]
        lo, hi = min(x), max(x)
        d = _f32(_f32(hi - lo) / _f32(15))
        inv = _f32(1) / d if d else _f32(0)
        q = [min(15, int(_f32(_f32(_f32(v - lo) * inv) + _f32(0.5)))) for v in x]
        out += _f16(d) + _f16(lo) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return out


SLOW = {"q8_0": slow_q8_0, "q4_0": slow_q4_0, "q4_1": slow_q4_1}


def _weights() -> torch.Tensor:
    """Random rows plus the edge cases: an all-zero block, ties, exact halves."""
    torch.manual_seed(0)
    w = torch.randn(6, 96) * 0.05
    w[1, :32] = 0                                     # d == 0
    w[2, :32] = torch.arange(32) / 8.0 - 2            # many exact .5 products
    w[3, 32:64] = 1.0                                 # constant block
    w[3, 64:] = torch.linspace(-1, 1, 32)
    w[4, 3] = 0.7
    w[4, 9] = -0.7                                    # |max| tie: first one wins
    w[5] *= 1000                                      # large values
    return w


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_rtn_blocks_are_bit_exact_with_ggml_reference(qtype):
    w = _weights()
    ours = gb.QUANTIZERS[qtype](w)
    assert ours.shape == (6, 3 * gb.BLOCK_BYTES[qtype]) and ours.dtype == np.uint8
    for r in range(w.shape[0]):
        assert ours[r].tobytes() == SLOW[qtype](w[r].numpy()), f"row {r}"


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_rtn_blocks_match_the_gguf_package(qtype):
    import gguf

    w = torch.randn(32, 256) * 0.1
    ref = gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, qtype.upper()))
    ours = gb.QUANTIZERS[qtype](w)
    np.testing.assert_array_equal(ours, ref)
    back = gb.dequantize(ours, qtype, 256)
    step = {"q8_0": 1 / 127, "q4_0": 1 / 8, "q4_1": 1 / 15}[qtype]
    assert (back - w).abs().max() <= w.abs().max() * step + 1e-6


def test_bf16_and_f16_round_to_nearest_even():
    import gguf

    w = torch.randn(4, 64)
    np.testing.assert_array_equal(
        gb.to_bf16_bytes(w), gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.BF16))
    np.testing.assert_array_equal(gb.to_f16(w), w.numpy().astype(np.float16))


def test_packers_lay_out_given_codes_exactly():
    torch.manual_seed(1)
    q = torch.randint(0, 16, (4, 64))
    d = torch.rand(4, 2) + 0.1
    m = -torch.rand(4, 2)
    d16 = d.half().float()
    m16 = m.half().float()
    w0 = gb.dequantize(gb.pack_q4_0(q, d), "q4_0", 64).reshape(4, 2, 32)
    torch.testing.assert_close(w0, (q.reshape(4, 2, 32) - 8) * d16[..., None], rtol=0, atol=0)
    w1 = gb.dequantize(gb.pack_q4_1(q, d, m), "q4_1", 64).reshape(4, 2, 32)
    torch.testing.assert_close(w1, q.reshape(4, 2, 32) * d16[..., None] + m16[..., None],
                               rtol=0, atol=0)
    q8 = torch.randint(-128, 128, (4, 64))
    w8 = gb.dequantize(gb.pack_q8_0(q8, d), "q8_0", 64).reshape(4, 2, 32)
    torch.testing.assert_close(w8, q8.reshape(4, 2, 32) * d16[..., None], rtol=0, atol=0)
    # nibble layout: byte j holds weights j (low) and j + 16 (high)
    packed = gb.pack_q4_0(q[:1, :32], d[:1, :1])
    assert packed[0, 2] == int(q[0, 0]) | (int(q[0, 16]) << 4)


def test_blocks_refuse_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        gb.quantize_q4_0(torch.zeros(2, 40))


def test_rope_permutation_moves_half_pairs_to_interleaved_pairs():
    heads, hd = 3, 8
    w = torch.arange(heads * hd * 2, dtype=torch.float32).reshape(heads * hd, 2)
    p = permute_rope_rows(w, heads)
    for h in range(heads):
        for i in range(hd // 2):
            assert torch.equal(p[h * hd + 2 * i], w[h * hd + i])
            assert torch.equal(p[h * hd + 2 * i + 1], w[h * hd + hd // 2 + i])
