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
