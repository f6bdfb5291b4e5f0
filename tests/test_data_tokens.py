"""Token cache (slmkit.data.tokens): content, eos separators, reuse, invalidation."""

from __future__ import annotations

import numpy as np
import pytest

from slmkit.data import tokens as tokens_mod
from slmkit.data.corpus import iter_documents
from slmkit.data.tokens import token_stream
from slmkit.errors import DataError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(30):
        (d / f"doc{i:02d}.txt").write_text(f"Document {i}: naïve café ✓ {'word ' * i}\n",
                                           encoding="utf-8")
    return d


def test_tokens_decode_back_to_documents(cache, corpus_dir, tokenizer):
    arr = token_stream(str(corpus_dir), tokenizer, split="train", val_fraction=0.2)
    assert isinstance(arr, np.memmap) and arr.ndim == 1 and arr.dtype == np.uint16
    eos = tokenizer.eos_token_id
    bounds = np.flatnonzero(arr == eos)
    texts = [d.text for d in iter_documents(str(corpus_dir), "train", 0.2)]
    assert len(bounds) == len(texts) == arr.meta["documents"]
    pieces = np.split(np.asarray(arr), bounds + 1)[:-1]
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == texts
    assert arr.meta["bytes"] == sum(len(t.encode()) for t in texts)


def test_second_run_reuses_cache_and_changes_invalidate(cache, corpus_dir, tokenizer,
                                                        monkeypatch):
    first = token_stream(str(corpus_dir), tokenizer, split="val", val_fraction=0.2)
    calls = []
    real_build = tokens_mod._build
    monkeypatch.setattr(tokens_mod, "_build", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    again = token_stream(str(corpus_dir), tokenizer, split="val", val_fraction=0.2)
    assert calls == [] and again.meta["path"] == first.meta["path"]
    np.testing.assert_array_equal(first, again)
    (corpus_dir / "doc00.txt").write_text("changed content\n")
    changed = token_stream(str(corpus_dir), tokenizer, split="val", val_fraction=0.2)
    assert calls == [1] and changed.meta["key"] != first.meta["key"]


def test_train_and_val_streams_are_disjoint_documents(cache, corpus_dir, tokenizer):
    train = token_stream(str(corpus_dir), tokenizer, split="train", val_fraction=0.3)
    val = token_stream(str(corpus_dir), tokenizer, split="val", val_fraction=0.3)
    assert train.meta["documents"] + val.meta["documents"] == 30
    assert val.meta["documents"] > 0


def test_empty_split_is_a_clear_error(cache, corpus_dir, tokenizer):
    with pytest.raises(DataError, match="'val' split .* has no documents"):
        token_stream(str(corpus_dir), tokenizer, split="val", val_fraction=0.0)
