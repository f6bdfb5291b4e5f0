"""KV cache storage dtypes (fp32 / fp16 / int8) and attention across head shapes, native and torch."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from slmkit.engine import Engine, SamplingParams, native
from slmkit.engine.cache import FP16_MAX, KVCache, quantize_rows
from slmkit.engine.runner import FastRunner, kv_cache_dtype
from slmkit.errors import ConfigError
from tests.conftest import build_tiny_model

needs_native = pytest.mark.skipif(native.load_library() is None,
                                  reason=f"native step unavailable: {native.unavailable_reason()}")


def _quantize(model, tokenizer, bits=4, group=32, sym=True):
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions

    quantize_model(model, tokenizer, QuantizeOptions(method="rtn", bits=bits, group_size=group,
                                                    sym=sym, quantize_embeddings=True,
                                                    embedding_bits=bits, ignore=[]))
    return model


def test_auto_cache_dtype_follows_the_model(tokenizer):
    dense = build_tiny_model("llama", tokenizer)
    assert kv_cache_dtype(dense) == torch.float32       # greedy equality with transformers
    assert kv_cache_dtype(dense, "fp16") == torch.float16
    assert kv_cache_dtype(build_tiny_model("llama", tokenizer).to(torch.bfloat16)) \
        == torch.bfloat16
    quant = _quantize(build_tiny_model("llama", tokenizer), tokenizer)
    assert kv_cache_dtype(quant) == torch.float16       # already rounded far more than fp16
    assert FastRunner(quant, 2, 32).cache.k[0].dtype == torch.float16
    fp32 = FastRunner(quant, 2, 32, kv_cache="fp32")
    assert fp32.cache.k[0].dtype == torch.float32
    assert FastRunner(quant, 2, 32).cache.nbytes * 2 == fp32.cache.nbytes
    i8 = FastRunner(quant, 2, 32, kv_cache="int8").cache     # never automatic
    assert i8.k[0].dtype == torch.int8 and i8.ks[0].shape == i8.k[0].shape[:3]
    rows = sum(t.numel() for t in i8.ks + i8.vs)               # one float32 scale per row
    assert i8.nbytes == fp32.cache.nbytes // 4 + 4 * rows
    with pytest.raises(ConfigError, match="KV cache dtype 'fp8'; use auto, .*int8"):
        Engine(dense, tokenizer, kv_cache="fp8", background=False)
    with pytest.raises(ConfigError, match="KV cache dtype 'fp8'"):   # the generic path too
        Engine(build_tiny_model("gpt2", tokenizer), tokenizer, kv_cache="fp8",
               background=False)


def test_fp16_cache_saturates_instead_of_overflowing():
    cache = KVCache(1, 1, 1, 4, 2, dtype=torch.float16)
    big = torch.tensor([[[[1e6, -1e6]]]])
    cache.write(0, torch.tensor([0]), torch.tensor([0]), big, big / 1e7)
    assert cache.k[0][0, 0, 0].tolist() == [FP16_MAX, -FP16_MAX]
    assert torch.allclose(cache.v[0][0, 0, 0].float(), torch.tensor([0.1, -0.1]), rtol=1e-3)


def test_int8_rows_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 40, generator=g) * torch.tensor([1e-3, 1.0, 50.0])[None, :, None, None]
    x[0, 0, 0] = 0.0                                             # an all-zero row
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and scale.shape == x.shape[:3]
    assert codes.abs().max() == 127 and codes.amin() >= -127
    assert torch.equal(codes[0, 0, 0], torch.zeros(40, dtype=torch.int8)) and scale[0, 0, 0] == 0
    err = (codes.float() * scale[..., None] - x).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-12).all()   # round to nearest
    # each row's largest value lands on the end of the grid (the zero row stays zero)
    top = codes.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(top.abs(), torch.where(scale > 0, 127, 0).to(torch.int8))
    cache = KVCache(1, 2, 3, 8, 40, dtype=torch.int8)
    cache.write(0, torch.tensor([1, 0]), torch.tensor([2, 0]), x, -x)
    k, v = cache.read(0, torch.tensor([0, 1]), 7, 0)
    assert torch.equal(k[1, :, 2:7], codes[0].float() * scale[0][..., None])
    assert torch.equal(v[0, :, 0:5], -(codes[1].float() * scale[1][..., None]))


def _steps(runner, n_rows=3, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    vocab = runner.model.config.vocab_size
    lens = [5 + 4 * i for i in range(n_rows)]
    for slot, n in enumerate(lens):
        runner.forward(torch.randint(0, vocab, (1, n), generator=g), [slot], [0])
    out = []
    for s in range(steps):
        tok = torch.randint(0, vocab, (n_rows, 1), generator=g)
        out.append(runner.forward(tok, list(range(n_rows)), [n + s for n in lens]))
    return torch.stack(out)


# head dim 64 runs query heads 3 at a time (4 per KV head here: 3 + 1), 32 and 48 one at a
# time in registers, 40 through the portable loop
HEADS = [dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1),
         dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
         dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2),
         dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=2),
         dict(hidden_size=80, num_attention_heads=2, num_key_value_heads=1)]


@needs_native
@pytest.mark.parametrize("kv", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"d{h['hidden_size'] // h['num_attention_heads']}"
                         f"-g{h['num_attention_heads'] // h['num_key_value_heads']}")
def test_native_attention_equals_torch_path(tokenizer, heads, kv):
    model = build_tiny_model("llama", tokenizer, seed=3, **heads)
    fast = FastRunner(model, 3, 48, kv_cache=kv)
    slow = FastRunner(model, 3, 48, kv_cache=kv, native=False)
    assert fast.native is not None, fast.native_reason
    a, b = _steps(fast), _steps(slow)
    if kv != "int8":
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        for i in range(model.config.num_hidden_layers):   # the same values were cached
            assert torch.allclose(fast.cache.k[i].float(), slow.cache.k[i].float(), atol=1e-3)
        return
    # int8: both paths round with the same arithmetic, but a key the two paths compute a
    # few ulps apart can round to neighbouring codes, which then moves later values a little
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
    for i in range(model.config.num_hidden_layers):
        for c, cs in ((fast.cache.k[i], slow.cache.k[i]), (fast.cache.v[i], slow.cache.v[i])):
            step = (c.int() - cs.int()).abs()
            assert step.max() <= 1 and (step == 0).float().mean() > 0.99
        assert torch.allclose(fast.cache.ks[i], slow.cache.ks[i], rtol=1e-4, atol=0)


@needs_native
@pytest.mark.parametrize("kv,bound", [("fp16", 1e-3), ("int8", 2e-2)])
def test_narrow_cache_stays_close_to_fp32(tokenizer, kv, bound):
    model = build_tiny_model("llama", tokenizer, seed=3, **HEADS[0])
    a = _steps(FastRunner(model, 3, 48, kv_cache=kv))
    b = _steps(FastRunner(model, 3, 48, kv_cache="fp32"))
    assert (a - b).norm() / b.norm() < bound


@needs_native
def test_native_fp16_store_saturates_like_the_torch_path(tokenizer):
    model = build_tiny_model("llama", tokenizer, seed=3)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1e7)   # keys far past 65504
    fast = FastRunner(model, 3, 48, kv_cache="fp16")
    slow = FastRunner(model, 3, 48, kv_cache="fp16", native=False)
    a, b = _steps(fast), _steps(slow)
    k = fast.cache.k[0][:3, :, :10]
    assert torch.isfinite(k).all() and k.abs().max() == FP16_MAX
    assert torch.equal(fast.cache.k[0], slow.cache.k[0])
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4), (a - b).abs().max()


@needs_native
@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_batched_greedy_equals_single_with_a_narrow_cache(tokenizer, kv):
    model = build_tiny_model("llama", tokenizer, seed=3, **HEADS[0])
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with Engine(model, None, max_batch=3, kv_cache=kv, background=False) as engine:
        handles = [engine.submit(p, params) for p in prompts]
        batched = [h.result().token_ids for h in handles]
    with Engine(model, None, max_batch=1, kv_cache=kv, background=False) as engine:
        alone = [engine.generate(p, params).token_ids for p in prompts]
    assert batched == alone


@needs_native
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("quant", [None, (8, -1, True), (4, 32, True), (4, 64, False)])
def test_portable_build_computes_the_same_step(tokenizer, tmp_path, quant):
    """decode.c built for a plain x86-64 CPU (no AVX-512, no F16C: the scalar loops and the
    software fp16 rounding) gives the decode step of the build for this CPU."""
    if "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU's build is the portable one already")
    so = tmp_path / "portable.so"
    res = subprocess.run(["cc", "-O2", "-march=x86-64", "-fopenmp", "-shared", "-fPIC", "-o",
                          str(so), str(native.SOURCE), "-lm"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    portable = ctypes.CDLL(str(so))
    portable.slm_decode.argtypes = native.load_library().slm_decode.argtypes
    portable.slm_prefill.argtypes = native.load_library().slm_prefill.argtypes
    assert portable.slm_has_vnni() == 0
    model = build_tiny_model("llama", tokenizer, seed=3, **HEADS[0])
    if quant is not None:
        _quantize(model, tokenizer, *quant)
    for kv in ("fp32", "fp16", "int8"):
        ours = FastRunner(model, 3, 48, kv_cache=kv)
        other = FastRunner(model, 3, 48, kv_cache=kv)
        assert ours.native is not None and other.native is not None
        other.native.lib = portable   # same weights and panels; it reads the row-major codes
        a, b = _steps(ours), _steps(other)
        if quant is None:
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (kv, (a - b).abs().max())
        else:
            # the int8 activation rounding turns last-bit differences of the float sums
            # (another order; asymmetric zero points applied in another form) into whole
            # grid steps now and then
            assert (a - b).norm() / b.norm() < (2e-3 if quant[2] else 3e-2), kv
