"""The server store: an index's chunks and vectors in PostgreSQL with pgvector.

``slm rag index DOCS --out INDEX --store postgresql://USER@HOST:PORT/DB`` keeps the files,
chunks, settings and vectors in the server, in a schema of their own (``slm_<12 hex>``,
so one database holds many indexes), and writes only ``INDEX/store.json`` (the URL without
its password, and the schema) plus the BM25 matrix, a cache rebuilt from the server's chunk
texts whenever the server's generation number moves on. Every verb that takes INDEX (``slm
rag query | ask | eval``, ``slm serve --rag``) then reads from the server.

Tables mirror the embedded store's (:class:`slmkit.rag.store.SqliteStore`), with the vector
a pgvector ``vector(dim)`` column of ``chunks``. Search is exact (cosine distance ``<=>``,
a scan) until the index holds :data:`HNSW_FROM` chunks: exact like sqlite-vec, so both
stores return the same chunks in the same order (the test checks ids and order). From
there on ``slm rag index`` adds an HNSW index (cosine, pgvector's defaults m=16,
ef_construction=64) and says so, and queries use it with ``hnsw.ef_search`` at least 100
and twice the depth asked for. Why there (bench/rag_pgvector.py: clustered synthetic 384-d
vectors, 50 rows asked for, index and scan interleaved, on a loaded 2-core box): at 10k
rows the exact scan takes 6.7-7.0 ms p50 and HNSW 1.9-2.1 ms finding 0.815 of the exact
top 50; at 50k the scan takes 54.6 ms p50, over the 50 ms retrieval budget, and HNSW 5.6
ms. HNSW's recall on these synthetic vectors (0.49 of the top 50 at 50k) is a pessimistic
floor, as they have no low-dimensional structure (real embeddings usually fare better;
not measured here), but the index stays approximate, which is why it waits until the scan
is too slow. Ids are assigned as SQLite assigns them (one more than the largest in use),
so both stores number the same corpus alike.

Passwords: the URL's password is used for the connection and never written or printed
(messages show ``***``). Later runs take it from libpq's ``PGPASSWORD`` or ``~/.pgpass``,
or from ``--store`` given again to ``slm rag index``.
"""

from __future__ import annotations

import json
import secrets
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from slmkit.errors import ConfigError, DataError
from slmkit.rag.store import MANIFEST, Store, search_text

SCHEMES = ("postgresql", "postgres")
#: Chunks from which the server store adds an HNSW index (below it, exact search).
HNSW_FROM = 50_000


def _netloc(url: str, password: str | None) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    if password is not None and parts.password is not None:
        user += ":" + password
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host += f":{parts.port}"
    return f"{user}@{host}" if user else host


def redact(url: str) -> str:
    """The URL with its password shown as ``***`` (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=_netloc(url, "***")))


def strip_password(url: str) -> str:
    """The URL without its password (what ``store.json`` keeps)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=_netloc(url, None)))


def check_url(url: str) -> str:
    """A ``postgresql://`` URL, or a ValueError naming the form expected."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError as e:
        raise ValueError(f"--store '{redact(url)}' is not a valid URL ({e})") from None
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"--store '{redact(url)}' is not a PostgreSQL URL; give "
                         "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (a server with "
                         "pgvector), or omit --store for the embedded store")
    return url


def _connect(url: str):
    try:
        import psycopg
    except ImportError:
        raise ConfigError("--store postgresql://... needs psycopg; install it with `pip "
                          "install 'slmkit[pgvector]'`.") from None
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        reason = " ".join(str(e).split())
        raise DataError(f"Cannot connect to the vector database server {redact(url)} "
                        f"({reason}); start the server or fix --store "
                        "(postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE).") from None
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as e:
        available = conn.execute("SELECT 1 FROM pg_available_extensions "
                                 "WHERE name = 'vector'").fetchone()
        conn.close()
        fix = ("ask its administrator to run CREATE EXTENSION vector in that database"
               if available else "install pgvector on the server (Debian: apt-get install "
               "postgresql-NN-pgvector) and run CREATE EXTENSION vector")
        raise DataError(f"The server {redact(url)} has no pgvector extension "
                        f"({' '.join(str(e).split())}); {fix}.") from None
    return conn


def check_server(url: str) -> None:
    """Connect to ``url`` and check pgvector (the DataError of :func:`_connect` if not)."""
    _connect(url).close()


def _vec(v) -> str:
    return "[" + ",".join(map(str, np.asarray(v, dtype=np.float32).tolist())) + "]"


def read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


class PostgresStore(Store):
    """Files, chunks and vectors of an index in a PostgreSQL schema (module docstring)."""

    def __init__(self, root: Path, conn, url: str, schema: str):
        self.root, self.conn, self.url, self.schema = Path(root), conn, url, schema
        self._ef = None
        self.meta = dict(self._q("SELECT key, value FROM {s}.meta").fetchall())
        self.hnsw = self._has_hnsw()

    @property
    def location(self) -> str:
        search = "HNSW" if self.hnsw else "exact"
        return f"{redact(self.url)} (schema {self.schema}, pgvector, {search} search)"

    def _q(self, sql: str, params=()):
        return self.conn.execute(sql.replace("{s}", self.schema), params)

    @classmethod
    def create(cls, root: Path, rows: dict, dim: int, url: str) -> PostgresStore:
        conn = _connect(url)
        schema = "slm_" + secrets.token_hex(6)
        with conn.transaction():
            for sql in (
                "CREATE SCHEMA {s}",
                "CREATE TABLE {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
                "CREATE TABLE {s}.files (id bigint PRIMARY KEY, path text UNIQUE NOT NULL, "
                "display text NOT NULL, size bigint, mtime_ns bigint, sha256 text, "
                "chunks integer)",
                "CREATE TABLE {s}.chunks (id bigint PRIMARY KEY, file_id bigint NOT NULL "
                "REFERENCES {s}.files(id), ordinal integer, heading text, start_line integer, "
                "end_line integer, page integer, text text NOT NULL, "
                f"embedding vector({int(dim)}) NOT NULL)",
                "CREATE INDEX ON {s}.chunks (file_id)",
            ):
                conn.execute(sql.replace("{s}", schema))
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {schema}.meta VALUES (%s, %s)",
                                [(k, json.dumps(v)) for k, v in rows.items()])
        (Path(root) / MANIFEST).write_text(json.dumps(
            {"kind": "postgresql", "url": strip_password(url), "schema": schema}, indent=1))
        return cls(root, conn, url, schema)

    @classmethod
    def open(cls, root: Path, url: str | None = None) -> PostgresStore:
        manifest = read_manifest(root)
        if not manifest or manifest.get("kind") != "postgresql":
            raise DataError(f"'{root}/{MANIFEST}' is unreadable; rebuild the index with `slm "
                            "rag index ... --overwrite`.")
        if url and strip_password(url) != manifest["url"]:
            raise ConfigError(f"The index '{root}' lives in {manifest['url']}, not "
                              f"{redact(url)}; pass --overwrite to rebuild it there, or drop "
                              "--store.")
        url = url or manifest["url"]
        conn = _connect(url)
        found = conn.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = %s "
                             "AND table_name = 'meta'", (manifest["schema"],)).fetchone()
        if not found:
            conn.close()
            raise DataError(f"The index '{root}' has no schema {manifest['schema']} in "
                            f"{redact(url)} any more; rebuild it with `slm rag index ... "
                            "--overwrite`.")
        return cls(root, conn, url, manifest["schema"])

    def set_setting(self, key: str, value) -> None:
        self._q("INSERT INTO {s}.meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
                "SET value = excluded.value", (key, json.dumps(value)))
        self.meta[key] = json.dumps(value)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self):
        with self.conn.transaction():
            yield self

    def drop(self) -> None:
        self._q("DROP SCHEMA IF EXISTS {s} CASCADE")

    def _has_hnsw(self) -> bool:
        sql = ("SELECT 1 FROM pg_indexes WHERE schemaname = %s AND tablename = 'chunks' "
               "AND indexdef ILIKE '%%using hnsw%%'")
        return self.conn.execute(sql, (self.schema,)).fetchone() is not None

    def tune(self) -> str | None:
        """Add the HNSW index once the index holds :data:`HNSW_FROM` chunks."""
        if self.hnsw or self.count()[1] < HNSW_FROM:
            return None
        self._q("CREATE INDEX ON {s}.chunks USING hnsw (embedding vector_cosine_ops)")
        self.hnsw = True
        return (f"{HNSW_FROM} chunks or more: vector search now uses an HNSW index "
                "(approximate) instead of an exact scan")

    # ------------------------------------------------------------------ files and chunks

    def files(self) -> dict[str, tuple]:
        return {p: (i, s, m, h) for i, p, s, m, h in self._q(
            "SELECT id, path, size, mtime_ns, sha256 FROM {s}.files")}

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        self._q("UPDATE {s}.files SET size = %s, mtime_ns = %s WHERE id = %s",
                (size, mtime_ns, file_id))

    def add_file(self, path: str, display: str, size: int, mtime_ns: int, sha256: str,
                 chunks: list, vectors: np.ndarray) -> None:
        file_id = self._q("SELECT coalesce(max(id), 0) + 1 FROM {s}.files").fetchone()[0]
        self._q("INSERT INTO {s}.files (id, path, display, size, mtime_ns, sha256, chunks) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (file_id, path, display, size, mtime_ns, sha256, len(chunks)))
        first = self._q("SELECT coalesce(max(id), 0) + 1 FROM {s}.chunks").fetchone()[0]
        with self.conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {self.schema}.chunks (id, file_id, ordinal, heading, start_line, "
                "end_line, page, text, embedding) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                "%s::vector)",
                [(first + n, file_id, n, c.heading, c.start_line, c.end_line, c.page, c.text,
                  _vec(v)) for n, (c, v) in enumerate(zip(chunks, vectors))])

    def remove_file(self, file_id: int) -> None:
        self._q("DELETE FROM {s}.chunks WHERE file_id = %s", (file_id,))
        self._q("DELETE FROM {s}.files WHERE id = %s", (file_id,))

    def count(self) -> tuple[int, int]:
        return (self._q("SELECT count(*) FROM {s}.files").fetchone()[0],
                self._q("SELECT count(*) FROM {s}.chunks").fetchone()[0])

    def chunk_rows(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        rows = self._q("SELECT c.id, f.path, f.display, c.heading, c.start_line, c.end_line, "
                       "c.page, c.text FROM {s}.chunks c JOIN {s}.files f ON f.id = c.file_id "
                       "WHERE c.id = ANY(%s)", ([int(i) for i in ids],))
        keys = ("path", "display", "heading", "start_line", "end_line", "page", "text")
        return {r[0]: dict(zip(keys, r[1:])) for r in rows}

    def chunk_spans(self) -> list[tuple]:
        return self._q("SELECT c.start_line, c.end_line, f.path, f.display FROM {s}.chunks c "
                       "JOIN {s}.files f ON f.id = c.file_id").fetchall()

    def all_texts(self) -> tuple[list[int], list[str]]:
        rows = self._q("SELECT c.id, f.display, c.heading, c.text FROM {s}.chunks c "
                       "JOIN {s}.files f ON f.id = c.file_id ORDER BY c.id").fetchall()
        return [r[0] for r in rows], [search_text(r[1], r[2], r[3]) for r in rows]

    # ------------------------------------------------------------------ search

    def dense(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        ef = min(1000, max(100, 2 * k))          # used only once there is an HNSW index
        if ef != self._ef:
            self.conn.execute(f"SET hnsw.ef_search = {ef}")
            self._ef = ef
        rows = self._q("SELECT id, embedding <=> %s::vector AS d FROM {s}.chunks "
                       "ORDER BY d LIMIT %s", (_vec(query), int(k)))
        return [(int(i), 1.0 - float(d)) for i, d in rows]

    def vector(self, chunk_id: int) -> np.ndarray:
        row = self._q("SELECT embedding::text FROM {s}.chunks WHERE id = %s",
                      (int(chunk_id),)).fetchone()
        return np.asarray(json.loads(row[0]), dtype=np.float32)


def drop_index(root: Path) -> None:
    """Drop the schema of the server index at ``root`` (before ``--overwrite`` replaces it),
    when the server can be reached and the schema is there."""
    manifest = read_manifest(root)
    if not manifest:
        return
    try:
        store = PostgresStore.open(root)
    except (DataError, ConfigError):
        return
    store.drop()
    store.close()
