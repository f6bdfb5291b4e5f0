"""Corpus layer: input kinds, splits, bad inputs (slmkit.data.corpus / split)."""

from __future__ import annotations

import json

import pytest

from slmkit.data import corpus as corpus_mod
from slmkit.data.corpus import CorpusStats, Document, iter_documents
from slmkit.data.split import is_val
from slmkit.errors import ConfigError, DataError


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_stdlib_ids_skip_tests_and_include_topics():
    ids = [d.id for d in iter_documents("stdlib")]
    assert "stdlib:json/decoder.py" in ids
    assert not any("/test/" in i or i.startswith("stdlib:test/") for i in ids)
    assert not any("site-packages" in i for i in ids)
    assert any(i.startswith("stdlib:pydoc_topics/") for i in ids)
    assert len(ids) == len(set(ids)), "document ids must be unique"


def test_split_is_disjoint_complete_and_deterministic():
    all_ids = [d.id for d in iter_documents("stdlib", split="all")]
    train = [d.id for d in iter_documents("stdlib", split="train", val_fraction=0.1)]
    val = [d.id for d in iter_documents("stdlib", split="val", val_fraction=0.1)]
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(all_ids)
    assert 0.05 < len(val) / len(all_ids) < 0.15
    assert val == [d.id for d in iter_documents("stdlib", split="val", val_fraction=0.1)]
    assert all(is_val(i, 0.1) for i in val) and not any(is_val(i, 0.1) for i in train)


def test_is_val_fraction_edges():
    ids = [f"doc{i}" for i in range(2000)]
    assert not any(is_val(i, 0.0) for i in ids)
    frac = sum(is_val(i, 0.3) for i in ids) / len(ids)
    assert 0.25 < frac < 0.35
    with pytest.raises(ConfigError):
        list(iter_documents("stdlib", val_fraction=1.5))


def test_jsonl_shapes(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"text": "plain text"},
        {"prompt": "Q: 2+2?\n", "completion": "A: 4"},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
    ])
    docs = list(iter_documents(str(path)))
    assert [d.id for d in docs] == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:3"]
    assert docs[0] == Document("d.jsonl:1", "plain text")
    assert docs[1].text == "Q: 2+2?\nA: 4" and docs[1].prompt == "Q: 2+2?\n"
    assert docs[2].messages[1]["content"] == "hello"
    assert docs[2].text == ("<|im_start|>user\nhi<|im_end|>\n"
                            "<|im_start|>assistant\nhello<|im_end|>\n")


@pytest.mark.parametrize("line, fragment", [
    ('{"text": "ok"', "line 2 is not valid JSON"),
    ('{"title": "x"}', "line 2 has none of the fields"),
    ('[1, 2]', "line 2 is a JSON list"),
    ('{"messages": [{"role": "user"}]}', "malformed 'messages'"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        list(iter_documents(str(path)))
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_directory_glob_binary_and_replacement(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# beta\n", encoding="utf-8")
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\x00\x01" * 100)
    # One bad byte in a long UTF-8 file: decoded with a replacement character and counted.
    (tmp_path / "c.txt").write_bytes(b"x" * 500 + b"\xff" + b"y" * 500)
    (tmp_path / ".hidden").write_text("never read")
    stats = CorpusStats()
    docs = list(iter_documents(str(tmp_path), stats=stats))
    assert [d.id for d in docs] == ["a.txt", "c.txt", "sub/b.md"]   # relative to the dir
    assert stats.skipped_binary == 1 and stats.replaced_files == 1 and stats.replaced_chars == 1
    assert "\ufffd" in docs[1].text
    rows = dict(stats.summary_rows())
    assert "skipped (binary)" in rows and "non-UTF-8 (replaced)" in rows
    globbed = [d.id for d in iter_documents(str(tmp_path / "**" / "*.md"))]
    assert globbed == [str(tmp_path / "sub" / "b.md")]


def test_mostly_non_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème brûlée déjà vu ".encode("latin-1") * 20)
    with pytest.raises(DataError, match="not UTF-8 text"):
        list(iter_documents(str(path)))


@pytest.mark.parametrize("make, fragment", [
    (lambda p: str(p / "nothing-*.txt"), "matches no files"),
    (lambda p: str(p / "missing.txt"), "does not exist"),
    (lambda p: (p / "empty.txt").write_text("") and None or str(p / "empty.txt"),
     "has no documents"),
    (lambda p: (p / "e").mkdir() or str(p / "e"), "has no documents"),
])
def test_bad_specs(tmp_path, make, fragment):
    with pytest.raises(DataError, match=fragment):
        list(iter_documents(make(tmp_path)))


def test_large_file_streams_in_line_aligned_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 1000)
    lines = [f"line {i:05d} " + "z" * 40 + "\n" for i in range(200)]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines), encoding="utf-8")
    docs = list(iter_documents(str(path)))
    assert len(docs) > 5
    assert [d.id for d in docs] == [f"big.txt#{i}" for i in range(len(docs))]
    assert "".join(d.text for d in docs) == "".join(lines)
    assert all(d.text.endswith("\n") for d in docs)


def test_list_spec_concatenates(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("one")
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": "two"}])
    assert [d.text for d in iter_documents([str(a), str(b)])] == ["one", "two"]


def test_a_copied_corpus_splits_the_same(tmp_path):
    import shutil

    src = tmp_path / "a" / "corpus"
    (src / "sub").mkdir(parents=True)
    for i in range(40):
        (src / ("sub" if i % 3 else ".") / f"doc{i}.txt").write_text(f"text {i}\n")
    copy = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(src, copy)
    for split in ("train", "val"):
        here = [(d.id, d.text) for d in iter_documents(str(src), split=split, val_fraction=0.3)]
        there = [(d.id, d.text) for d in iter_documents(str(copy), split=split,
                                                         val_fraction=0.3)]
        assert here == there and here


def test_stdlib_prose_is_docstring_prose_split_with_its_source(tmp_path, monkeypatch):
    """The prose corpus holds the docstrings of the same files as ``stdlib``, under the
    same ids, so a file's prose and code land in the same split (no leak between a code
    calibration set and a prose evaluation, or the other way round)."""
    from slmkit.data.corpus import docstring_prose

    src = ('"""Parse the configuration file and return a mapping of every section."""\n'
           'def f(x):\n    """Add one.\n\n    This function returns its argument plus one, '
           'as the tests expect.\n\n    >>> f(1)\n    2\n    """\n    return x + 1\n')
    prose = docstring_prose(src)
    assert "Parse the configuration file" in prose and "plus one, as the tests" in prose
    assert "Add one." not in prose and ">>>" not in prose and "return x + 1" not in prose
    assert docstring_prose("def broken(:\n") == ""
    for i in range(40):
        (tmp_path / f"mod{i}.py").write_text(src if i % 4 else "x = 1\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text(src)
    monkeypatch.setattr(corpus_mod, "stdlib_root", lambda: tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "pydoc_data.topics", None)
    code = {d.id for d in iter_documents("stdlib")}
    docs = list(iter_documents("stdlib-prose"))
    ids = [d.id for d in docs]
    assert len(ids) == 30 and set(ids) < code and "stdlib:test/t.py" not in ids
    assert all(d.text == prose for d in docs)
    # the split is a function of the id alone, so equal ids mean equal splits
    assert {is_val(i, 0.05) for i in ids} == {True, False}
    # the extracted prose is cached, and a changed file is read again
    assert list(iter_documents("stdlib-prose")) == docs
    (tmp_path / "mod1.py").write_text('"""A brand new module docstring with more than eight '
                                      'words in it."""\n')
    again = {d.id: d.text for d in iter_documents("stdlib-prose")}
    assert again["stdlib:mod1.py"].startswith("A brand new module") and len(again) == 30
