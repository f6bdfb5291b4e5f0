"""The index: one SQLite database with sqlite-vec, and a BM25 index beside it.

Two stores implement :class:`Store`: the embedded :class:`SqliteStore` (this module, the
default) and, for ``slm rag index --store postgresql://...``, a PostgreSQL server with
pgvector (:mod:`slmkit.rag.pgstore`), where ``INDEX/`` holds ``store.json`` and the BM25
cache instead of ``rag.sqlite``. The rest of slmkit sees only the interface.

An index is a directory::

    INDEX/
      rag.sqlite     files, chunks and their text, settings, and the vectors
                     (a sqlite-vec ``vec0`` table, cosine distance)
      bm25/          bm25s' sparse score matrix over the same chunks (numpy arrays,
                     loaded without pickle) and ``ids.json``, its row -> chunk id map

Why SQLite + sqlite-vec: a real embedded database (transactions, so an interrupted update
leaves the previous index intact), one file, text and vectors side by side, and an exact
k-nearest-neighbour scan measured at about 4 ms for 10 000 x 384 vectors on this
project's 2-core machines (bench/rag.py), far under the 50 ms budget. The Python build
here has no ``enable_load_extension`` in the standard ``sqlite3`` module, so the database
is opened through apsw, which bundles SQLite with extension loading.

BM25 cannot be updated in place, so it is rebuilt from the chunk texts after each update
(seconds for 10k chunks). Its directory records the database's generation number; a
stale one (an update interrupted between the two) is rebuilt when the index is opened.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from slmkit.errors import ConfigError, DataError

DB_NAME = "rag.sqlite"
BM25_DIR = "bm25"
FORMAT = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, display TEXT NOT NULL,
                    size INTEGER, mtime_ns INTEGER, sha256 TEXT, chunks INTEGER);
CREATE TABLE chunks (id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id),
                     ordinal INTEGER, heading TEXT, start_line INTEGER, end_line INTEGER,
                     page INTEGER, text TEXT NOT NULL);
CREATE INDEX chunks_file ON chunks(file_id);
"""


#: In an index whose chunks live in a PostgreSQL server: where (see :mod:`slmkit.rag.pgstore`).
MANIFEST = "store.json"


def is_index(path: Path) -> bool:
    return (path / DB_NAME).is_file() or (path / MANIFEST).is_file()


def connect(db_path: Path):
    """An apsw connection with sqlite-vec loaded."""
    import apsw
    import sqlite_vec

    db = apsw.Connection(str(db_path))
    db.enable_load_extension(True)
    db.load_extension(sqlite_vec.loadable_path())
    db.enable_load_extension(False)
    return db


class Store:
    """Files, chunks and vectors of one index: the interface both stores implement.

    :meth:`open` and :meth:`create` pick the implementation: :class:`SqliteStore` (the
    embedded default, ``INDEX/rag.sqlite``) or, for an index made with ``--store
    postgresql://...``, :class:`slmkit.rag.pgstore.PostgresStore` (a PostgreSQL server with
    pgvector). Both give chunks the same ids (one more than the largest id in use), so
    the same corpus retrieves the same chunk ids in the same order from either.
    """

    root: Path
    meta: dict

    @classmethod
    def create(cls, root: Path, settings: dict, dim: int, url: str | None = None) -> Store:
        root.mkdir(parents=True, exist_ok=True)
        rows = {"format": FORMAT, "dim": dim, "generation": 0, **settings}
        if url:
            from slmkit.rag.pgstore import PostgresStore

            return PostgresStore.create(root, rows, dim, url)
        return SqliteStore.create(root, rows, dim)

    @classmethod
    def open(cls, root: str | Path, url: str | None = None) -> Store:
        """The index at ``root``; ``url`` (``--store`` given again to an update) must be
        the server the index lives in."""
        root = Path(root).expanduser()
        if not is_index(root):
            raise DataError(f"'{root}' is not a slmkit RAG index; build one with `slm rag "
                            f"index DOCS... --out {root}`.")
        if (root / MANIFEST).is_file():
            from slmkit.rag.pgstore import PostgresStore

            store = PostgresStore.open(root, url)
        elif url:
            from slmkit.rag.pgstore import redact

            raise ConfigError(f"The index '{root}' keeps its chunks in the embedded store; "
                              f"pass --overwrite to rebuild it in {redact(url)}, or drop "
                              "--store.")
        else:
            store = SqliteStore(root, connect(root / DB_NAME))
        if store.setting("format") != FORMAT:
            raise DataError(f"'{root}' was written by another slmkit version (index format "
                            f"{store.setting('format')}); rebuild it with `slm rag "
                            "index ... --overwrite`.")
        return store

    def setting(self, key: str):
        value = self.meta.get(key)
        return json.loads(value) if value is not None else None

    #: Where the chunks live, for messages (a server URL without its password).
    location = "embedded (SQLite + sqlite-vec)"
    #: The server URL the index was made with (None for the embedded store).
    url: str | None = None

    # Each implementation provides the methods below.
    def set_setting(self, key: str, value) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def transaction(self):
        raise NotImplementedError

    def drop(self) -> None:
        """Remove what the index holds outside its directory (nothing, when embedded)."""

    def tune(self) -> str | None:
        """After an index run: adapt the store to its size; a note saying what changed."""
        return None

    def files(self) -> dict[str, tuple]:
        raise NotImplementedError

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        raise NotImplementedError

    def add_file(self, path, display, size, mtime_ns, sha256, chunks, vectors) -> None:
        raise NotImplementedError

    def remove_file(self, file_id: int) -> None:
        raise NotImplementedError

    def count(self) -> tuple[int, int]:
        raise NotImplementedError

    def chunk_rows(self, ids: list[int]) -> dict[int, dict]:
        raise NotImplementedError

    def chunk_spans(self) -> list[tuple]:
        raise NotImplementedError

    def all_texts(self) -> tuple[list[int], list[str]]:
        raise NotImplementedError

    def dense(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        raise NotImplementedError

    def vector(self, chunk_id: int) -> np.ndarray:
        raise NotImplementedError



class SqliteStore(Store):
    """Files, chunks and vectors in ``INDEX/rag.sqlite`` (see the module docstring)."""

    def __init__(self, root: Path, db):
        self.root = Path(root)
        self.db = db
        self.meta = dict(db.execute("SELECT key, value FROM meta").fetchall())

    @classmethod
    def create(cls, root: Path, rows: dict, dim: int) -> SqliteStore:
        db = connect(root / DB_NAME)
        with db:
            db.execute(_SCHEMA)
            db.execute(f"CREATE VIRTUAL TABLE vectors USING vec0(id INTEGER PRIMARY KEY, "
                       f"embedding float[{int(dim)}] distance_metric=cosine)")
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [(k, json.dumps(v)) for k, v in rows.items()])
        return cls(root, db)

    def set_setting(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        self.meta[key] = json.dumps(value)

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        """A context manager: one transaction (rolled back on an exception)."""
        return self.db

    # ------------------------------------------------------------------ files and chunks

    def files(self) -> dict[str, tuple]:
        """``path -> (id, size, mtime_ns, sha256)`` of every indexed file."""
        return {p: (i, s, m, h) for i, p, s, m, h in self.db.execute(
            "SELECT id, path, size, mtime_ns, sha256 FROM files")}

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?",
                        (size, mtime_ns, file_id))

    def add_file(self, path: str, display: str, size: int, mtime_ns: int, sha256: str,
                 chunks: list, vectors: np.ndarray) -> None:
        """Insert one file with its chunks (``Chunk`` objects) and their vectors."""
        self.db.execute("INSERT INTO files (path, display, size, mtime_ns, sha256, chunks) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (path, display, size, mtime_ns, sha256, len(chunks)))
        file_id = self.db.last_insert_rowid()
        for n, (c, v) in enumerate(zip(chunks, vectors)):
            self.db.execute("INSERT INTO chunks (file_id, ordinal, heading, start_line, "
                            "end_line, page, text) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (file_id, n, c.heading, c.start_line, c.end_line, c.page, c.text))
            self.db.execute("INSERT INTO vectors (id, embedding) VALUES (?, ?)",
                            (self.db.last_insert_rowid(), np.ascontiguousarray(
                                v, dtype=np.float32).tobytes()))

    def remove_file(self, file_id: int) -> None:
        ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE file_id = ?",
                                             (file_id,))]
        self.db.executemany("DELETE FROM vectors WHERE id = ?", [(i,) for i in ids])
        self.db.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def count(self) -> tuple[int, int]:
        """``(files, chunks)``."""
        return (self.db.execute("SELECT count(*) FROM files").fetchone()[0],
                self.db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def chunk_rows(self, ids: list[int]) -> dict[int, dict]:
        """``chunk id -> {path, display, heading, start_line, end_line, page, text}``."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            "SELECT c.id, f.path, f.display, c.heading, c.start_line, c.end_line, c.page, "
            f"c.text FROM chunks c JOIN files f ON f.id = c.file_id WHERE c.id IN ({marks})",
            [int(i) for i in ids])
        keys = ("path", "display", "heading", "start_line", "end_line", "page", "text")
        return {r[0]: dict(zip(keys, r[1:])) for r in rows}

    def chunk_spans(self) -> list[tuple]:
        """``(start_line, end_line, path, display)`` of every chunk."""
        return list(self.db.execute("SELECT c.start_line, c.end_line, f.path, f.display "
                                    "FROM chunks c JOIN files f ON f.id = c.file_id"))

    def all_texts(self) -> tuple[list[int], list[str]]:
        rows = self.db.execute("SELECT c.id, f.display, c.heading, c.text FROM chunks c "
                               "JOIN files f ON f.id = c.file_id ORDER BY c.id").fetchall()
        return [r[0] for r in rows], [search_text(r[1], r[2], r[3]) for r in rows]

    # ------------------------------------------------------------------ search

    def dense(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest chunks to a unit query vector: ``(chunk id, cosine)``."""
        if k <= 0:
            return []
        rows = self.db.execute("SELECT id, distance FROM vectors WHERE embedding MATCH ? "
                               "AND k = ? ORDER BY distance",
                               (np.ascontiguousarray(query, dtype=np.float32).tobytes(), k))
        return [(int(i), 1.0 - float(d)) for i, d in rows]

    def vector(self, chunk_id: int) -> np.ndarray:
        """The stored vector of one chunk."""
        row = self.db.execute("SELECT embedding FROM vectors WHERE id = ?",
                              (int(chunk_id),)).fetchone()
        return np.frombuffer(row[0], dtype=np.float32)


def search_text(display: str, heading: str, text: str) -> str:
    """What BM25 and the embedder see of a chunk: where it is, its heading, its text."""
    return f"{display}\n{heading}\n{text}" if heading else f"{display}\n{text}"


# --------------------------------------------------------------------------- BM25

_WORD = re.compile(r"[A-Za-z0-9_]+")
_CAMEL = re.compile(r"[a-z]+|[A-Z][a-z]*|[0-9]+")


def bm25_tokens(text: str, stemmer=None) -> list[str]:
    """Lower-cased words of two or more characters, stop words dropped; an identifier
    (``load_extension``, ``JSONDecoder``) also yields its parts, so ``load extension``
    finds it; words are stemmed (Snowball English) when PyStemmer is installed."""
    from bm25s.stopwords import STOPWORDS_EN

    out = []
    for word in _WORD.findall(text):
        low = word.lower()
        parts = [p.lower() for p in _CAMEL.findall(word.replace("_", " "))] \
            if ("_" in word.strip("_") or not (word.islower() or word.isupper())) else []
        for w in [low.strip("_"), *parts]:
            if len(w) >= 2 and w not in STOPWORDS_EN:
                out.append(w)
    return stemmer.stemWords(out) if stemmer is not None and out else out


def _stemmer():
    try:
        import Stemmer
    except ImportError:
        return None
    return Stemmer.Stemmer("english")


class Lexical:
    """BM25 over the chunks (Robertson & Zaragoza 2009; bm25s' Lucene variant, k1=1.5,
    b=0.75)."""

    def __init__(self, bm25, ids: list[int]):
        self.bm25, self.ids, self.stemmer = bm25, np.asarray(ids, dtype=np.int64), _stemmer()

    @classmethod
    def build(cls, store: Store, generation: int) -> Lexical:
        """Index every chunk of ``store`` and save it as ``INDEX/bm25`` (via a temp dir)."""
        import bm25s

        ids, texts = store.all_texts()
        stemmer = _stemmer()
        bm25 = bm25s.BM25()
        if ids:
            bm25.index([bm25_tokens(t, stemmer) or ["\x00"] for t in texts],
                       show_progress=False)
        tmp, final = store.root / (BM25_DIR + ".tmp"), store.root / BM25_DIR
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if ids:
            bm25.save(str(tmp))
        (tmp / "ids.json").write_text(json.dumps({"generation": generation, "ids": ids}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return cls(bm25 if ids else None, ids)

    @classmethod
    def load(cls, store: Store) -> Lexical:
        """The saved BM25 index, rebuilt first when it is missing or stale."""
        import bm25s

        path = store.root / BM25_DIR
        generation = store.setting("generation")
        try:
            saved = json.loads((path / "ids.json").read_text())
        except (OSError, ValueError):
            saved = None
        if not saved or saved.get("generation") != generation:
            return cls.build(store, generation)
        ids = saved["ids"]
        return cls(bm25s.BM25.load(str(path), allow_pickle=False) if ids else None, ids)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best chunks by BM25 score (only those sharing a term with the query)."""
        tokens = bm25_tokens(query, self.stemmer)
        if self.bm25 is None or not tokens or k <= 0:
            return []
        vocab = self.bm25.vocab_dict
        tokens = [t for t in tokens if t in vocab]
        if not tokens:
            return []
        scores = self.bm25.get_scores(tokens)                      # [n_chunks]
        k = min(k, int((scores > 0).sum()))
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self.ids[i]), float(scores[i])) for i in top]
