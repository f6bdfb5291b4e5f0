"""The native decode step (``slmkit/engine/native``) against slow references and the torch path."""

from __future__ import annotations

import pytest
import torch

from slmkit.engine import native
from slmkit.engine.runner import FastRunner
from slmkit.nn.packing import quantize_rtn
from slmkit.nn.quant_linear import QuantLinear
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.skipif(native.load_library() is None,
                                reason=f"native step unavailable: {native.unavailable_reason()}")


def _needs_vnni():
    if not native.load_library().slm_has_vnni():
        pytest.skip("no AVX-512 VNNI: quantized layers keep the torch path")


def _reference_w8a8(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The integer math the kernels implement, slowly, in float64: x rounded to int8 with
    one scale (absmax / 127) per block of 32 columns for int4 layers and per window of 256
    columns for int8 layers, times the dequantized weight."""
    B, k = x.shape
    span = 256 if layer.bits == 8 else 32
    xq = torch.empty(B, k, dtype=torch.float64)
    for c0 in range(0, k, span):
        xb = x[:, c0:c0 + span].double()
        amax = xb.abs().amax(-1, keepdim=True)
        q = torch.where(amax > 0, torch.round(xb * (127 / amax.float()).double()),
                        torch.zeros_like(xb))
        xq[:, c0:c0 + span] = q.clamp(-127, 127) * amax / 127
    y = xq @ layer.dequantize_weight().double().T
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("bits,group,sym,k", [
    (8, -1, True, 576), (8, 64, False, 192), (8, 32, True, 96),
    (4, 32, True, 576),    # two 256-column windows and a 64-column tail
    (4, 64, False, 1536), (4, 128, True, 256), (4, -1, True, 256), (4, 32, False, 64),
])
def test_quantized_kernels_match_the_integer_reference(bits, group, sym, k):
    _needs_vnni()
    torch.manual_seed(0)
    n = 40
    codes, scale, zero = quantize_rtn(torch.randn(n, k), bits, group, sym)
    layer = QuantLinear.from_codes(codes, scale, zero, bits, group, sym, bias=torch.randn(n))
    x = torch.randn(9, k)   # tiles of 8 and 1 activation rows
    x[:, 5] *= 30       # an outlier channel: its block gets a coarser grid, as in llama.cpp
    x[1, :32] = 0       # an all-zero block (scale 0)
    y = native.linear(layer, x)
    ref = _reference_w8a8(layer, x)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max())
    dense = x @ layer.dequantize_weight().T + layer.bias
    assert (y - dense).norm() / dense.norm() < 0.03   # activation rounding only


@pytest.mark.parametrize("bits", [8, 4])
def test_awq_input_scale_kept_inside_the_layer_is_applied(bits):
    """A QuantLinear computing (x / s) W^T (AWQ's scale when no op could absorb it) runs
    natively: the activations are divided by s before they are rounded."""
    _needs_vnni()
    torch.manual_seed(0)
    k = 256
    s = torch.rand(k) * 3 + 0.25
    codes, scale, zero = quantize_rtn(torch.randn(24, k), bits, 32, True)
    layer = QuantLinear.from_codes(codes, scale, zero, bits, 32, True, input_scale=s)
    x = torch.randn(5, k)
    ref = _reference_w8a8(layer, x * (1.0 / s))
    y = native.linear(layer, x)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max())
    assert (y - layer(x)).norm() / layer(x).norm() < 0.03   # the torch path: bf16 activations


def test_fp32_kernel_matches_linear_with_odd_widths():
    torch.manual_seed(0)
    for k in (7, 64, 577):
        lin = torch.nn.Linear(k, 19)
        x = torch.randn(4, k)
        assert torch.allclose(native.linear(lin, x), lin(x), atol=1e-5)


def _decode_both(model, n_slots=3, rows=((0, 12), (2, 5))):
    """Logits of 6 decode steps through the native and the torch runner, same inputs."""
    fast, slow = FastRunner(model, n_slots, 64), FastRunner(model, n_slots, 64, native=False)
    assert fast.native is not None, fast.native_reason
    assert slow.native is None
    out = []
    for runner in (fast, slow):
        g = torch.Generator().manual_seed(1)
        for slot, n in rows:  # prefill (torch in both) of different lengths
            runner.forward(torch.randint(0, 500, (1, n), generator=g), [slot], [0])
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        tok = torch.randint(0, 500, (len(rows), 1), generator=g)
        slots, starts = [s for s, _ in rows], [n + step for _, n in rows]
        out.append((fast.forward(tok, slots, starts), slow.forward(tok, slots, starts)))
    return out


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("qwen2", {}),
                                         ("mistral", {"sliding_window": 8})])
def test_native_step_equals_torch_path(tokenizer, arch, extra):
    model = build_tiny_model(arch, tokenizer, seed=5, **extra)
    for a, b in _decode_both(model):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("qwen2", {}),
                                         ("mistral", {"sliding_window": 8})])
def test_native_prefill_equals_torch_path(tokenizer, arch, extra):
    """Prompt chunks (rows of one slot at consecutive positions, longer than the sliding
    window) through the compiled step give the torch path's last-row logits and cache."""
    model = build_tiny_model(arch, tokenizer, seed=5, **extra)
    fast, slow = FastRunner(model, 2, 64), FastRunner(model, 2, 64, native=False)
    assert not fast.native.prefills        # fp32 chunks default to torch's GEMM (faster)
    fast.native.prefills = True            # the compiled prefill itself is under test here
    calls = []
    real = fast.native.prefill
    fast.native.prefill = lambda *a: calls.append(1) or real(*a)
    prompt = torch.randint(0, 500, (1, 21), generator=torch.Generator().manual_seed(4))
    for lo, hi in ((0, 13), (13, 21)):     # two chunks, the second continuing the first
        a = fast.forward(prompt[:, lo:hi], [1], [lo])
        b = slow.forward(prompt[:, lo:hi], [1], [lo])
        assert a.shape == b.shape == (1, model.config.vocab_size)
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert len(calls) == 2                 # both chunks went through the compiled step
    assert int(fast.cache.lengths[1]) == int(slow.cache.lengths[1]) == 21
    for i in range(model.config.num_hidden_layers):
        assert torch.allclose(fast.cache.k[i][1, :, :21], slow.cache.k[i][1, :, :21], atol=1e-5)
    tok = torch.tensor([[5]])
    assert torch.allclose(fast.forward(tok, [1], [21]), slow.forward(tok, [1], [21]), atol=1e-4)


def test_quantized_model_close_to_torch_path(tokenizer):
    _needs_vnni()
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions

    model = build_tiny_model("llama", tokenizer, seed=5)
    quantize_model(model, tokenizer, QuantizeOptions(method="rtn", bits=4, group_size=32,
                                                    quantize_embeddings=True, ignore=[]))
    assert type(model.lm_head).__name__ == "QuantLinear"
    # an AWQ scale kept inside o_proj (GQA: v_proj cannot absorb it)
    o = model.model.layers[0].self_attn.o_proj
    s = torch.rand(o.in_features, generator=torch.Generator().manual_seed(3)) + 0.5
    codes, scale, zero = quantize_rtn(o.dequantize_weight() * s, 4, 32, True)
    model.model.layers[0].self_attn.o_proj = QuantLinear.from_codes(codes, scale, zero, 4, 32,
                                                                    True, input_scale=s)
    assert FastRunner(model, 1, 8).native.prefills   # quantized: chunks go native too
    for a, b in _decode_both(model):   # torch path: bf16 activations; native: int8 blocks
        assert (a - b).norm() / b.norm() < 0.05


@pytest.mark.parametrize("quant", [None, (8, -1, True), (8, 32, False), (4, 32, True),
                                   (4, 64, False)])
def test_row_result_does_not_depend_on_the_batch(tokenizer, quant):
    """9 rows run as tiles of 8 + 1 (and attention by KV group); each row alone takes tiles
    of 1 (and attention by head): the results must be bit-identical."""
    model = build_tiny_model("llama", tokenizer, seed=5)
    if quant is not None:
        _needs_vnni()
        from slmkit.compress.quantize.api import quantize_model
        from slmkit.compress.quantize.config import QuantizeOptions

        bits, group, sym = quant
        quantize_model(model, tokenizer, QuantizeOptions(method="rtn", bits=bits, group_size=group,
                                                        sym=sym, quantize_embeddings=True,
                                                        ignore=[]))
    n = 9
    runner = FastRunner(model, n, 64)
    assert runner.native is not None, runner.native_reason
    prompts = [torch.arange(3 + i, 13 + 2 * i)[None] for i in range(n)]
    for slot, p in enumerate(prompts):
        runner.forward(p, [slot], [0])
    lens = [p.shape[1] for p in prompts]
    tok = torch.arange(7, 7 + n)[:, None]
    batched = runner.forward(tok, list(range(n)), lens)
    for slot in range(n):  # the same step again, one row at a time, over the same cache
        alone = runner.forward(tok[slot:slot + 1], [slot], [lens[slot]])
        assert torch.equal(alone[0], batched[slot])


def test_unsupported_layers_keep_the_torch_path(tokenizer):
    model = build_tiny_model("llama", tokenizer, seed=5)

    class Wrapped(torch.nn.Linear):  # stands in for a LoRA wrapper or a low-rank layer
        pass

    old = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = Wrapped(old.in_features, old.out_features, bias=False)
    runner = FastRunner(model, 1, 32)
    assert runner.native is None and "Wrapped" in runner.native_reason
    bf16 = FastRunner(build_tiny_model("llama", tokenizer).to(torch.bfloat16), 1, 32)
    assert bf16.native is None and "fp32" in bf16.native_reason


def test_build_cache_is_keyed_and_drops_stale_builds(tmp_path, monkeypatch):
    stale = tmp_path / "native" / "slmdecode-0000000000000000.so"
    stale.parent.mkdir()
    stale.write_bytes(b"old build")
    monkeypatch.setenv("SLMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_LIB", {})          # a fresh process, as far as loading goes
    lib = native.load_library()
    assert lib is not None and not stale.exists()
    assert [p.name for p in (tmp_path / "native").glob("*.so")] == [f"{lib._name.rsplit('/', 1)[-1]}"]


def test_argmax_rows_matches_torch_including_ties_and_tails():
    torch.manual_seed(0)
    x = torch.randn(5, 1000)
    x[1, 3] = x[1, 999] = 50.0           # tie: the first index wins, as in torch
    x[2, 999] = 60.0                     # maximum in the scalar tail
    x[3] = float("-inf")                 # nothing but -inf
    x[4, :20] = 7.0                      # ties inside the first vector
    assert native.argmax_rows(x) == x.argmax(-1).tolist()
    short = torch.randn(3, 7)            # narrower than one vector
    assert native.argmax_rows(short) == short.argmax(-1).tolist()


def test_vnni_ceiling_bench_builds_against_the_engine_source(tmp_path):
    """bench/vnni_ceiling.c includes decode.c whole and calls its int4 tile: it must keep
    compiling as decode.c changes, and print a rate for each of its four measurements."""
    _needs_vnni()
    import subprocess

    from bench.vnni_ceiling import NAMES, build

    exe = tmp_path / "vnni_ceiling"
    why = build(exe)
    assert why is None, why
    out = subprocess.run([str(exe), "20000"], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1"}, timeout=60)
    rates = dict(line.split() for line in out.stdout.splitlines())
    assert list(rates) == list(NAMES)
    assert all(float(r) > 0 for r in rates.values())


@pytest.mark.parametrize("V,token,masked", [(49152, 7, 0), (49152, 3, 48000), (1000, 999, 0),
                                            (33, 0, 31), (33, 5, 32)])
def test_confidence_matches_the_torch_formulas(V, token, masked):
    """One native pass gives the token's log-probability, the entropy and the best other
    logit that log_softmax / xlogy / topk give in float64 (masked -inf logits count 0;
    every rival masked: no other logit)."""
    from slmkit.engine.sampling import RequestSampler, SamplingParams

    g = torch.Generator().manual_seed(V + token)
    x = torch.randn(V, generator=g) * 4
    others = torch.tensor([i for i in range(V) if i != token])
    x[others[torch.randperm(len(others), generator=g)[:masked]]] = float("-inf")
    lp = torch.log_softmax(x.double(), -1)
    entropy = float(-torch.special.xlogy(lp.exp(), lp.exp()).sum())
    other = float(x[others].max())
    got = native.confidence(x, token)
    assert got[0] == pytest.approx(float(lp[token]), abs=1e-5)
    assert got[1] == pytest.approx(entropy, abs=1e-5)
    assert got[2] == other
    # the sampler records the same figures with the library on and off
    choices = []
    for on in (True, False):
        native.set_enabled(on)
        try:
            s = RequestSampler(SamplingParams(temperature=0, confidence=True), [])
            choices.append(s.choose(x.clone(), token=token))
        finally:
            native.set_enabled(True)
    a, b = choices
    assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    assert a.entropy == pytest.approx(b.entropy, abs=1e-5)
    assert (a.margin is None) == (b.margin is None) == (masked == V - 1)
    if a.margin is not None:
        assert a.margin == pytest.approx(b.margin, abs=1e-5)
