"""Pure engine math against slow references; streaming text at UTF-8 and stop boundaries."""

from __future__ import annotations

import math

import pytest
import torch

from slmkit.engine import ops
from slmkit.engine.cache import KVCache
from slmkit.engine.text import IncrementalDetokenizer, StopStringFilter


def test_attention_mask_matches_a_loop():
    starts = torch.tensor([0, 3, 5])
    for window in (None, 3):
        mask = ops.attention_mask(starts, new_tokens=2, key_len=7, window=window)
        assert mask.shape == (3, 1, 2, 7)
        for b, s in enumerate(starts.tolist()):
            for t in range(2):
                p = s + t
                for j in range(7):
                    want = j <= p and (window is None or j > p - window)
                    assert bool(mask[b, 0, t, j]) == want


def test_attention_with_gqa_matches_explicit_softmax():
    torch.manual_seed(0)
    B, H, Hkv, T, L, D = 2, 4, 2, 3, 6, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    mask = ops.attention_mask(torch.tensor([3, 1]), T, L)
    out = ops.attention(q, k, v, mask, D ** -0.5)
    k_rep = k.repeat_interleave(H // Hkv, dim=1)               # [B, H, L, D]
    v_rep = v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k_rep.transpose(-1, -2) * D ** -0.5           # [B, H, T, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, dim=-1) @ v_rep
    assert torch.allclose(out, ref, atol=1e-5)


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    D, T = 8, 5
    x = torch.randn(1, 2, T, D)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T).float()[:, None] * inv[None]         # [T, D/2]
    emb = torch.cat([ang, ang], dim=-1)                          # [T, D]
    out = ops.apply_rope(x, emb.cos()[None, None], emb.sin()[None, None])
    # reference: pair dim i with i + D/2 and rotate it as a complex number
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(ang), ang)
    assert torch.allclose(out, torch.cat([z.real, z.imag], dim=-1), atol=1e-5)


def test_repetition_penalty_like_ctrl():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = ops.apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # input untouched


def _kept(logits):
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_top_p_min_p_against_sorted_loops():
    torch.manual_seed(1)
    logits = torch.randn(50)
    probs = torch.softmax(logits, -1)
    order = sorted(range(50), key=lambda i: -float(probs[i]))
    assert _kept(ops.filter_top_k(logits, 7)) == set(order[:7])
    for p in (0.05, 0.5, 0.9):
        keep, mass = [], 0.0
        for i in order:
            if mass >= p:
                break
            keep.append(i)
            mass += float(probs[i])
        assert _kept(ops.filter_top_p(logits, p)) == set(keep)
    top = float(probs.max())
    assert _kept(ops.filter_min_p(logits, 0.3)) == {i for i in range(50) if probs[i] >= 0.3 * top}
    assert _kept(ops.filter_top_k(logits, 0)) == set(range(50))


def test_top_logprobs_sorted():
    logp = torch.log_softmax(torch.tensor([0.1, 3.0, 2.0, -1.0]), -1)
    top = ops.top_logprobs(logp, 2)
    assert [i for i, _ in top] == [1, 2]
    assert math.isclose(sum(math.exp(v) for v in logp.tolist()), 1.0, rel_tol=1e-6)


def test_kv_cache_write_and_read_scattered_slots():
    cache = KVCache(n_layers=1, n_slots=4, n_kv_heads=2, max_seq_len=8, head_dim=3)
    k = torch.randn(2, 2, 1, 3)
    cache.write(0, torch.tensor([3, 1]), torch.tensor([5, 2]), k, -k)
    assert torch.equal(cache.k[0][3, :, 5], k[0, :, 0]) and torch.equal(cache.v[0][1, :, 2], -k[1, :, 0])
    keys, _ = cache.read(0, torch.tensor([3, 1]), 6, first_slot=None)
    assert keys.shape == (2, 2, 6, 3) and torch.equal(keys[1, :, 2], k[1, :, 0])
    view, _ = cache.read(0, torch.tensor([1, 2]), 6, first_slot=1)
    assert view.data_ptr() == cache.k[0][1].data_ptr()  # contiguous slots: no copy


@pytest.mark.parametrize("text", ["naïve café ✓ 日本語 🐍🚀 done", "ascii only", "€€€ 🐍"])
def test_streaming_deltas_are_whole_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # with a 512-token vocabulary the emoji are split across several byte tokens
    assert len(ids) > len(text) // 2
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)  # some tokens were partial characters


def test_stop_filter_holds_back_partial_matches():
    f = StopStringFilter(["END", "\n\n"])
    out = [f.push(t) for t in ["abc E", "N", "x\n", "yz E", "ND tail"]]
    assert out == [("abc ", False), ("", False), ("ENx", False), ("\nyz ", False), ("", True)]
    assert f.flush() == ""
    g = StopStringFilter(["END"])
    assert g.push("xx EN") == ("xx ", False) and g.flush() == "EN"
    assert StopStringFilter([]).push("EN") == ("EN", False)


def test_rolled_rope_is_bit_identical():
    torch.manual_seed(2)
    x, ang = torch.randn(2, 3, 4, 16), torch.randn(2, 1, 4, 16)
    ref = ops.apply_rope(x, ang.cos(), ang.sin())
    assert torch.equal(ops.apply_rope_rolled(x, ang.cos(), ops.signed_sin(ang.sin())), ref)


def test_fusion_shares_memory_and_keeps_outputs(tokenizer, tmp_path):
    from slmkit.engine.fuse import fused_mlp, fused_qkv
    from tests.conftest import build_tiny_model

    model = build_tiny_model("qwen2", tokenizer)  # q/k/v with biases
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        want = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp(x))
        qkv, run_mlp = fused_qkv(attn), fused_mlp(mlp)
        got = (*qkv(x), run_mlp(x))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)
    fused_weight = attn._slmkit_qkv[0]
    # the module weights are now views into the fused matrix: no extra memory
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused_weight.untyped_storage().data_ptr()
    model.save_pretrained(tmp_path / "m")  # and the model still saves

    class Wrapped(torch.nn.Linear):  # stands in for QuantLinear / LoRA: never fused
        pass

    other = build_tiny_model("llama", tokenizer).model.layers[0].self_attn
    other.k_proj = Wrapped(64, 32, bias=False)
    assert fused_qkv(other) is None
