"""Fusing memory-mapped weights does not keep two resident copies, and never loses data."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from slmkit.models.memory import release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


def _mapped(tmp_path, n=4 << 20):
    """A float32 tensor memory-mapped copy-on-write from a file, like safetensors weights."""
    path = tmp_path / "w.bin"
    data = np.random.default_rng(0).standard_normal(n // 4).astype(np.float32)
    data.tofile(path)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c")), data


def test_clean_file_pages_are_released_and_read_back_unchanged(tmp_path):
    t, data = _mapped(tmp_path)
    assert float(t.sum()) == pytest.approx(float(data.sum()), rel=1e-4)  # fault every page in
    before = _rss_file_kb()
    released = release_file_pages([t])
    assert released >= t.numel() * 4 - 2 * 4096
    assert _rss_file_kb() < before - 3000                # ~4 MB left the resident set
    assert np.array_equal(t.numpy(), data)              # and comes back from the file


def test_written_and_anonymous_tensors_are_never_released(tmp_path):
    t, data = _mapped(tmp_path)
    t[12345] = 42.0                                      # one copy-on-write page
    assert release_file_pages([t]) == 0
    assert float(t[12345]) == 42.0 and np.array_equal(t.numpy()[:12345], data[:12345])
    anon = torch.randn(1 << 20)
    copy = anon.clone()
    assert release_file_pages([anon]) == 0
    assert torch.equal(anon, copy)


def test_engine_on_a_loaded_model_matches_transformers(llama_dir):
    from slmkit.engine import stream_tokens
    from slmkit.models import load_model

    model, _ = load_model(llama_dir)
    prompt = list(range(5, 17))
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             min_new_tokens=8)[0, len(prompt):].tolist()
    assert list(stream_tokens(model, prompt, 8)) == ref   # fused, file pages released
    with torch.inference_mode():                          # the model itself still works
        again = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                               min_new_tokens=8)[0, len(prompt):].tolist()
    assert again == ref


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0]


def _thp_backs_madvised_faults() -> bool:
    """THP on, and page faults in MADV_HUGEPAGE regions compact memory for a huge page
    (defrag always / madvise / defer+madvise); elsewhere getting one is luck."""
    try:
        defrag = open("/sys/kernel/mm/transparent_hugepage/defrag").read()
    except OSError:
        return False
    mode = defrag.split("[")[1].split("]")[0]
    return _thp_mode() != "never" and mode in ("always", "madvise", "defer+madvise")


def _anon_huge_kb(ptr: int) -> int:
    """AnonHugePages of the mapping holding address ``ptr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def test_huge_page_buffer_is_aligned_writable_and_outlives_its_views():
    from slmkit.models.memory import HUGE_PAGE, huge_page_empty

    n = 5 * HUGE_PAGE + 12345
    buf = huge_page_empty(n)
    assert buf.dtype == torch.uint8 and buf.numel() == n
    assert buf.data_ptr() % HUGE_PAGE == 0
    assert buf.untyped_storage().nbytes() == n   # no slack in what torch.save would write
    buf.view(-1)[:] = 7
    if _thp_backs_madvised_faults():   # the kernel backs the whole 2 MB stretches with huge pages
        assert _anon_huge_kb(buf.data_ptr()) >= 5 * HUGE_PAGE // 1024
    tail = buf[-100:].clone()
    view = buf[-100:]
    del buf
    assert torch.equal(view, tail)        # the mapping lives while a view does
    small = huge_page_empty(1000)         # under 2 MB: a plain tensor
    assert small.numel() == 1000


def test_quantized_panels_share_one_huge_page_buffer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.engine import native
    from slmkit.engine.runner import make_runner
    from slmkit.models.memory import huge_pages_available, in_huge_pages
    from slmkit.nn.quant_linear import QuantLinear

    if native.load_library() is None or not native.load_library().slm_has_vnni():
        pytest.skip(f"no native integer kernels here: {native.unavailable_reason()}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1024,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=512)).eval()
    quantize_model(model, None, QuantizeOptions(method="rtn", bits=8, group_size=-1,
                                                quantize_embeddings=False))
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        ref = model(prompt).logits[0, -1]
    runner = make_runner(model, 1, 32)
    assert runner.native is not None, runner.native_reason
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    codes = [m._cache["native_panels"][0] for m in quant]
    storages = {c.untyped_storage().data_ptr() for c in codes}
    assert len(storages) == 1                        # one buffer for all layers (~4.7 MB)
    if huge_pages_available():
        assert in_huge_pages(codes[0])
    logits = runner.forward(prompt, [0], [0])[0]
    torch.testing.assert_close(logits, ref, atol=0.03, rtol=0)   # int8 activations: ~0.013


def test_moving_mapped_weights_to_huge_pages_keeps_data_and_one_resident_copy(tmp_path):
    from slmkit.models.memory import huge_pages_available, in_huge_pages, move_to_huge_pages

    if not huge_pages_available():
        pytest.skip("no transparent huge pages here")
    t, data = _mapped(tmp_path, n=8 << 20)
    big = torch.nn.Parameter(t.view(-1, 1024), requires_grad=False)
    small = torch.nn.Parameter(torch.arange(1000, dtype=torch.float32).view(10, 100))
    ref_small = small.detach().clone()
    assert float(t.sum()) == pytest.approx(float(data.sum()), rel=1e-4)  # fault every page in
    before = _rss_file_kb()
    assert move_to_huge_pages([big, small], chunk=1 << 20)
    assert in_huge_pages(big) and in_huge_pages(small) and not in_huge_pages(t)
    assert big.shape == (t.numel() // 1024, 1024) and big.dtype == torch.float32
    assert np.array_equal(big.detach().reshape(-1).numpy(), data)
    assert torch.equal(small.detach(), ref_small) and small.requires_grad
    assert _rss_file_kb() < before - 7000            # the file's pages left, chunk by chunk


def _tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
               tie_word_embeddings=True)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def test_a_refused_native_step_builds_and_moves_nothing():
    from slmkit.compress.quantize.api import quantize_model
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.nn.packing import quantize_rtn
    from slmkit.engine.runner import make_runner
    from slmkit.nn.quant_linear import QuantLinear

    model = _tiny_llama(hidden_size=512, intermediate_size=1024)
    quantize_model(model, None, QuantizeOptions(method="rtn", bits=8, group_size=-1,
                                                quantize_embeddings=False))
    mlp = model.model.layers[1].mlp                  # one 3-bit layer: no native kernel
    codes, scale, zero = quantize_rtn(mlp.down_proj.dense_weight(), 3, 32, False)
    mlp.down_proj = QuantLinear.from_codes(codes, scale, zero, 3, 32, False)
    where = model.lm_head.weight.data_ptr()
    runner = make_runner(model, 1, 32)
    assert runner.native is None and "3-bit" in runner.native_reason
    assert not any("native_panels" in m._cache for m in model.modules()
                   if isinstance(m, QuantLinear))
    assert model.lm_head.weight.data_ptr() == where


def test_a_runner_made_in_inference_mode_leaves_the_weights_trainable():
    from slmkit.engine.runner import make_runner

    model = _tiny_llama()
    with torch.inference_mode():
        runner = make_runner(model, 1, 32)
        runner.forward(torch.tensor([[1, 2, 3]]), [0], [0])
    assert not any(p.is_inference() for p in model.parameters())
    loss = model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()                                    # would raise on inference tensors
    assert model.lm_head.weight.grad is not None


def test_native_step_moves_dense_weights_and_still_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmkit.engine import native, stream_tokens
    from slmkit.engine.runner import make_runner
    from slmkit.models.memory import HUGE_PAGE

    if native.load_library() is None:
        pytest.skip(f"no native step here: {native.unavailable_reason()}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=4096,
                                         tie_word_embeddings=True)).eval()
    prompt = list(range(5, 17))
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             min_new_tokens=8)[0, len(prompt):].tolist()
    head, where = model.lm_head.weight.detach().clone(), model.lm_head.weight.data_ptr()
    runner = make_runner(model, 1, 64)
    assert runner.native is not None, runner.native_reason
    w = model.lm_head.weight
    assert w.data_ptr() != where and torch.equal(w, head)           # moved, same values
    if _thp_backs_madvised_faults():
        assert _anon_huge_kb(w.data_ptr()) >= HUGE_PAGE // 1024
    assert model.model.embed_tokens.weight.data_ptr() == w.data_ptr()  # still tied
    assert list(stream_tokens(model, prompt, 8)) == ref
    with torch.inference_mode():                        # and the model itself still works
        again = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                               min_new_tokens=8)[0, len(prompt):].tolist()
    assert again == ref
