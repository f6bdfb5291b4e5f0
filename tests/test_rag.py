"""slm rag: parsing, chunking, the store, incremental indexing and retrieval.

The embedding model is the real all-MiniLM-L6-v2 (installed package, no network); the
index is the real SQLite + sqlite-vec database and bm25s index. One small corpus is
indexed once per module.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from slmkit.errors import ConfigError, DataError, OutputError
from slmkit.rag.chunk import chunk_section
from slmkit.rag.config import IndexConfig
from slmkit.rag.index import run_index
from slmkit.rag.metrics import contains, exact_match, ndcg_at, reciprocal_rank, rouge_l
from slmkit.rag.parse import Section, read_sections
from slmkit.rag.retrieve import Retriever, rrf
from slmkit.rag.store import Store, bm25_tokens

DOCS = {
    "guide.md": "# Setup\n\nInstall the zebra feeder with pip.\n\n```\n# not a heading\n```\n\n"
                "## Cleaning\n\nRinse the feeder bowl with warm water every Tuesday.\n",
    "notes.rst": "Weather\n=======\n\nThe lighthouse keeper logs fog at dawn.\n\nTides\n-----\n\n"
                 "Spring tides follow the full moon.\n",
    "page.html": "<html><head><title>x</title><script>var hidden = 1;</script></head><body>"
                 "<h1>Telescope</h1>\n<p>Polish the mirror with a soft cloth.</p>\n"
                 "<h2>Mount</h2>\n<p>Balance the mount before tracking comets.</p></body></html>",
    "tools.py": '"""Kitchen helpers."""\n\nimport math\n\n\ndef boil_pasta(minutes):\n'
                '    """Boil pasta in salted water for the given minutes."""\n'
                '    return minutes * 60\n\n\nclass Oven:\n    """A small oven."""\n\n'
                '    def preheat(self, degrees):\n        """Preheat the oven."""\n'
                '        return degrees\n',
    "plain.txt": "Beekeepers smoke the hive gently before opening it.\n",
}


def write_pdf(path: Path, pages: list[str]) -> None:
    """A minimal valid PDF with one line of Helvetica text per page (correct xref)."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None,
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        content = len(objs)
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                    f"/Resources << /Font << /F1 3 0 R >> >> /Contents {content} 0 R >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"\
        .encode()
    path.write_bytes(bytes(out))


def make_docs(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (root / name).write_text(text)
    write_pdf(root / "manual.pdf", ["Page one covers the violin bow rosin.",
                                    "Page two explains how to tune the cello strings."])
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")      # not a document: skipped
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(docs dir, index dir) built once."""
    root = tmp_path_factory.mktemp("rag")
    docs = make_docs(root / "docs")
    index = root / "index"
    result = run_index(IndexConfig(docs=[str(docs)], out=str(index), threads=1))
    assert result.figures["added"] == 6 and result.figures["chunks"] > 7
    return docs, index


# --------------------------------------------------------------------------- parsing

def test_sections_follow_each_format(tmp_path):
    docs = make_docs(tmp_path)
    md = read_sections(docs / "guide.md", 1000)
    assert [s.heading for s in md] == ["Setup", "Setup > Cleaning"]
    assert "# not a heading" in md[0].text                      # code fence, not a heading
    assert (md[1].start_line, md[1].end_line) == (9, 12)
    rst = read_sections(docs / "notes.rst", 1000)
    assert [s.heading for s in rst] == ["Weather", "Weather > Tides"]
    html = read_sections(docs / "page.html", 1000)
    assert [s.heading for s in html] == ["Telescope", "Telescope > Mount"]
    assert all("hidden" not in s.text for s in html)
    py = read_sections(docs / "tools.py", 1000)
    assert [s.heading for s in py] == ["tools", "tools.boil_pasta", "tools.Oven"]
    assert py[1].text.startswith("def boil_pasta") and py[1].start_line == 6
    small_cap = read_sections(docs / "tools.py", 40)             # the class is cut by method
    assert "tools.Oven.preheat" in [s.heading for s in small_cap]
    pdf = read_sections(docs / "manual.pdf", 1000)
    assert [(s.page, s.heading) for s in pdf] == [(1, "page 1"), (2, "page 2")]
    assert "cello" in pdf[1].text


def test_broken_pdf_and_binary_are_refused_with_the_file_named(tmp_path):
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(DataError, match="bad.pdf"):
        read_sections(bad, 1000)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"abc\0def")
    with pytest.raises(DataError, match="binary"):
        read_sections(binary, 1000)


def test_chunks_respect_the_cap_keep_line_ranges_and_overlap():
    lines = [f"line {i} " + "word " * 12 for i in range(1, 61)]
    text = "\n".join(lines[:30]) + "\n\n" + "\n".join(lines[30:])
    section = Section(text, "H", 10, 10 + text.count("\n"))
    chunks = chunk_section(section, cap=400, overlap=120)
    assert len(chunks) > 4
    file_lines = [""] * 9 + text.split("\n")                     # line 10 is the first
    for c in chunks:
        assert len(c.text) <= 400
        assert c.text == "\n".join(file_lines[c.start_line - 1:c.end_line]).strip("\n") \
            or c.text in "\n".join(file_lines[c.start_line - 1:c.end_line])
    for a, b in zip(chunks, chunks[1:]):
        assert b.start_line <= a.end_line or b.start_line == a.end_line + 1
    assert any(b.start_line <= a.end_line for a, b in zip(chunks, chunks[1:]))   # overlap
    huge = Section("x" * 2500, "", 1, 1)
    assert [len(c.text) for c in chunk_section(huge, 1000, 0)] == [1000, 1000, 500]


def test_bm25_tokens_split_identifiers():
    toks = bm25_tokens("def load_extension(JSONDecoder)")
    assert {"load_extension", "load", "extension", "jsondecoder", "decoder"} <= set(toks)


def test_convex_fusion_keeps_score_margins():
    from slmkit.rag.retrieve import convex, minmax

    assert minmax([(1, 9.0), (2, 3.0), (3, 1.0)]) == {1: 1.0, 2: 0.25, 3: 0.0}
    assert minmax([(4, 0.5)]) == {4: 1.0}
    lexical = [(1, 12.0), (2, 3.0), (3, 2.9)]        # BM25 sure of 1
    dense = [(3, 0.61), (2, 0.60), (1, 0.40)]        # dense barely prefers 3
    assert [i for i, _ in convex(lexical, dense, 0.8)] == [1, 3, 2]
    ranks = dict(rrf([[1, 2, 3], [3, 2, 1]], rrf_k=60))       # ranks alone: 1 and 3 tie
    assert ranks[1] == pytest.approx(ranks[3])
    assert [i for i, _ in convex(lexical, dense, 0.0)] == [3, 2, 1]   # alpha 0: dense only
    fused = dict(convex(lexical, [(5, 0.9)], 0.8))   # one list lacks a chunk: 0 from it
    assert fused[5] == pytest.approx(0.2) and fused[1] == pytest.approx(0.8)
    assert convex([], [], 0.5) == []


def test_fusion_options_refused_where_unused():
    from slmkit.rag.config import AskConfig, EvalConfig, QueryConfig

    with pytest.raises(ValueError, match="--alpha does not apply to --fusion rrf"):
        QueryConfig(index="i", query="q", fusion="rrf", alpha=0.5)
    with pytest.raises(ValueError, match="--rrf-k does not apply to --fusion convex"):
        AskConfig(index="i", question="q", rrf_k=10)
    with pytest.raises(ValueError, match="--alpha does not apply to bm25 or dense"):
        QueryConfig(index="i", query="q", mode="bm25", alpha=0.5)
    with pytest.raises(ValueError, match="--fusion does not apply"):
        EvalConfig(modes=["bm25", "dense"], fusion="rrf", answers=False)
    assert QueryConfig(index="i", query="q", fusion="rrf", rrf_k=10).rrf_k == 10


# --------------------------------------------------------------------------- metrics

def test_metrics_on_hand_made_cases():
    assert rrf([[1, 2, 3], [3, 1]], rrf_k=60)[0][0] == 1
    assert rrf([[1, 2], [2, 3]], rrf_k=1)[0][0] == 2
    assert ndcg_at([False, True], 10, 1) == pytest.approx(1 / __import__("math").log2(3))
    assert ndcg_at([True, True], 10, 2) == 1.0
    assert reciprocal_rank([False, False, True]) == pytest.approx(1 / 3)
    assert exact_match("The `b64encode`.", "b64encode") == 1.0
    assert contains("It is b64encode [1].", "b64encode") == 1.0
    assert contains("standard_b64encode", "b64encode") == 0.0
    assert rouge_l("x b c d", "b d") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))


# --------------------------------------------------------------------------- index + retrieval

@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
@pytest.mark.parametrize("query, expect", [
    ("how often should the feeder bowl be rinsed", "guide.md"),
    ("tuning cello strings", "manual.pdf"),
    ("boil pasta in salted water", "tools.py"),
])
def test_every_mode_finds_the_right_file(corpus, mode, query, expect):
    retriever = Retriever.open(corpus[1])
    try:
        hits = retriever.search(query, k=3, mode=mode)
    finally:
        retriever.close()
    assert hits and hits[0].display.endswith(expect), [h.location for h in hits]


def test_hits_carry_their_location(corpus):
    retriever = Retriever.open(corpus[1])
    hits = retriever.search("Rinse the feeder bowl with warm water", k=1, mode="bm25")
    pdf = retriever.search("cello strings", k=1, mode="bm25")
    retriever.close()
    assert hits[0].location.endswith("guide.md:9-12 (Setup > Cleaning)")
    assert pdf[0].location.endswith("manual.pdf p.2")


def test_rerun_updates_only_what_changed(tmp_path):
    docs = make_docs(tmp_path / "docs")
    index = tmp_path / "index"
    cfg = IndexConfig(docs=[str(docs)], out=str(index), threads=1)
    run_index(cfg)
    (docs / "plain.txt").write_text("Beekeepers now wear gloves near the hive.\n")   # edited
    (docs / "notes.rst").unlink()                                                   # deleted
    (docs / "new.md").write_text("# Kites\n\nFly kites when the wind is steady.\n")   # added
    os.utime(docs / "guide.md")                             # touched, same content
    again = run_index(cfg)
    f = again.figures
    assert (f["added"], f["edited"], f["deleted"], f["unchanged"]) == (1, 1, 1, 4)
    assert f["new_chunks"] == 2
    assert run_index(cfg).figures["new_chunks"] == 0
    retriever = Retriever.open(index)
    assert retriever.search("kites wind", k=1)[0].display.endswith("new.md")
    assert not any(h.display.endswith("notes.rst")
                   for h in retriever.search("lighthouse fog dawn", k=10))
    files, chunks = retriever.store.count()
    retriever.close()
    assert files == 6


def test_an_interrupted_update_leaves_the_index_as_it_was(tmp_path, monkeypatch):
    from slmkit.rag import embed

    docs = make_docs(tmp_path / "docs")
    index = tmp_path / "index"
    cfg = IndexConfig(docs=[str(docs)], out=str(index), threads=1)
    before = run_index(cfg).figures["chunks"]
    (docs / "guide.md").unlink()
    (docs / "more.txt").write_text("Owls hunt at night.\n")

    def broken(self, texts, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed.Embedder, "encode", broken)
    with pytest.raises(KeyboardInterrupt):
        run_index(cfg)
    store = Store.open(index)
    assert store.count() == (6, before)
    store.close()
    retriever = Retriever.open(index)                    # BM25 still matches the database
    assert retriever.search("feeder bowl", k=1, mode="bm25")[0].display.endswith("guide.md")
    retriever.close()


def test_a_stale_bm25_index_is_rebuilt_on_open(corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus[1], copy)
    shutil.rmtree(copy / "bm25")
    retriever = Retriever.open(copy)
    assert retriever.search("lighthouse fog", k=1, mode="bm25")[0].display.endswith(
        "notes.rst")
    retriever.close()
    assert (copy / "bm25" / "ids.json").is_file()


def test_bad_inputs_name_the_input_and_leave_nothing(tmp_path, corpus):
    with pytest.raises(DataError, match="does not exist"):
        run_index(IndexConfig(docs=[str(tmp_path / "nope")], out=str(tmp_path / "i1")))
    (tmp_path / "a.csv").write_text("x,y\n")
    with pytest.raises(DataError, match="a.csv"):
        run_index(IndexConfig(docs=[str(tmp_path / "a.csv")], out=str(tmp_path / "i2")))
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="not a slmkit RAG index"):
        run_index(IndexConfig(docs=[str(corpus[0])], out=str(tmp_path / "taken")))
    with pytest.raises(ConfigError, match="--chunk-chars 1000"):
        run_index(IndexConfig(docs=[str(corpus[0])], out=str(corpus[1]), chunk_chars=500))
    with pytest.raises(DataError, match="not a slmkit RAG index"):
        Retriever.open(tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "taken"]


def test_an_unreadable_file_in_a_folder_is_skipped_and_reported(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ok.md").write_text("# Owls\n\nOwls hunt at night.\n")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 truncated")
    result = run_index(IndexConfig(docs=[str(docs)], out=str(tmp_path / "index"), threads=1))
    assert (result.figures["files"], result.figures["skipped"]) == (1, 1)
    assert any("broken.pdf" in note and "not a readable PDF" in note for note in result.notes)


def test_query_embedding_through_onnx_runtime_matches_transformers():
    """Queries run MiniLM through ONNX Runtime (exported once, verified); the vectors are
    the ones transformers gives, so queries still match the chunks embedded by torch."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from slmkit.rag.embed import Embedder, _minilm_onnx

    embedder = Embedder("minilm")
    assert _minilm_onnx() is not None
    for text in ("Which function does this: Encode a byte string using Base 85.", "hi",
                 "word " * 400):                      # over the 256-piece cap: truncated alike
        a, b = embedder.encode_query(text), embedder.encode_query(text, onnx=False)
        assert a.shape == (384,) and a.dtype == np.float32
        assert float(a @ b) > 0.99999 and abs(float(np.linalg.norm(a)) - 1) < 1e-5
