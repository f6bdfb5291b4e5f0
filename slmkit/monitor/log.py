"""The local request log: one SQLite file, written off the request path, bounded in size and age.

One row per finished generation: time, model, endpoint, token counts, latency, the
confidence figures and the flag, the prompt's length and language, and an embedding of
the prompt (float32 bytes; for drift). Prompt and answer *text* are stored only when the
operator opts in (``store_text``; ``slm serve --log-prompts``): privacy by default.

Rows are queued by the server and written by one background thread in batches (WAL
journal, so ``slm monitor`` can read the file while the server writes it). Retention runs
after each batch: rows older than ``max_days`` go, then the oldest tenth of the rows goes
until the file is under ``max_mb`` (``auto_vacuum=INCREMENTAL`` hands the freed pages back
to the file system).

Live drift (``drift_every``): the thread keeps the log's first ``drift_reference``
requests as the reference and the last ``drift_window`` as the recent window, and every
``drift_every`` new requests calls ``on_drift`` with :func:`slmkit.monitor.drift.compare`
of the two (the server turns that into ``slm_drift_*`` gauges).
"""

from __future__ import annotations

import logging
import math
import queue
from collections import deque
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from slmkit.errors import ConfigError

log = logging.getLogger("slmkit.monitor")

#: Columns of the ``requests`` table besides ``id`` (the SQL types).
COLUMNS = {
    "ts": "REAL", "request_id": "TEXT", "model": "TEXT", "endpoint": "TEXT",
    "finish_reason": "TEXT", "prompt_tokens": "INTEGER", "completion_tokens": "INTEGER",
    "latency_ms": "REAL", "ttft_ms": "REAL", "mean_logprob": "REAL", "min_logprob": "REAL",
    "mean_entropy": "REAL", "risk": "REAL", "flagged": "INTEGER", "prompt_chars": "INTEGER",
    "language": "TEXT", "canary": "INTEGER", "embedder": "TEXT", "embedding": "BLOB",
    "prompt": "TEXT", "answer": "TEXT"}
SCHEMA_VERSION = 1


def connect(path: str | Path, create: bool = False) -> sqlite3.Connection:
    """Open a request log (``create``: make it, with the schema, when it does not exist).

    Raises:
        ConfigError: the file is missing (and not ``create``), cannot be opened, or is not
            a request log.
    """
    path = Path(path)
    if not create and not path.is_file():
        raise ConfigError(f"The request log {path} does not exist; point to the file that "
                          "`slm serve --request-log` writes.")
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        if create:
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file
            db.execute("PRAGMA journal_mode=WAL")
            cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, {cols})")
            db.execute("CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts)")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.commit()
        found = {r[1] for r in db.execute("PRAGMA table_info(requests)")}
    except sqlite3.Error as e:
        raise ConfigError(f"Cannot open the request log {path} ({e}); pass a writable "
                          "SQLite file path.") from None
    missing = set(COLUMNS) - found
    if missing:
        db.close()
        raise ConfigError(f"{path} is not an slmkit request log (no requests table with "
                          f"{', '.join(sorted(missing))}); pass the file `slm serve "
                          "--request-log` writes.")
    return db


def answer_row(model: str, endpoint: str | None, completion, finish_reason: str | None,
               confidence: dict | None, request_id: str | None = None,
               canary: bool = False) -> dict:
    """A request-log row (:data:`COLUMNS`) for one finished generation: its counts, times
    and the confidence figures and flag of its ``confidence`` field."""
    c = completion
    return {"ts": time.time(), "request_id": request_id, "model": model, "endpoint": endpoint,
            "finish_reason": finish_reason, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "latency_ms": None if c.duration_s is None else c.duration_s * 1000,
            "ttft_ms": None if c.ttft_s is None else c.ttft_s * 1000, "canary": canary,
            **({k: confidence.get(k) for k in ("mean_logprob", "min_logprob", "mean_entropy",
                                               "risk", "flagged")} if confidence else {})}


def read_rows(path: str | Path, since: float | None = None,
              include_canary: bool = False) -> list[dict]:
    """Every logged request in time order (embeddings as float32 arrays)."""
    db = connect(path)
    try:
        db.row_factory = sqlite3.Row
        where = ["1=1"]
        if since is not None:
            where.append(f"ts >= {float(since)}")
        if not include_canary:
            where.append("COALESCE(canary, 0) = 0")
        rows = [dict(r) for r in db.execute(
            f"SELECT * FROM requests WHERE {' AND '.join(where)} ORDER BY ts, id")]
    finally:
        db.close()
    for r in rows:
        blob = r.get("embedding")
        r["embedding"] = np.frombuffer(blob, dtype=np.float32) if blob else None
    return rows


class RequestLog:
    """Queue rows from the server; one thread embeds the prompts, writes and prunes.

    Args:
        path: the SQLite file (created when missing).
        embed: ``texts -> float32 [n, dim]`` prompt embeddings, or None for no embeddings;
            ``embedder`` names it in each row.
        store_text: keep prompt and answer text in the rows (operator opt-in).
        max_mb, max_days: retention bounds.
        batch_s: longest time a row waits in the queue.
        drift_reference, drift_window, drift_every, on_drift: live drift (module doc);
            ``drift_every=0`` turns it off.
    """

    def __init__(self, path: str | Path, embed: Callable[[list[str]], np.ndarray] | None = None,
                 embedder: str = "", store_text: bool = False, max_mb: float = 256.0,
                 max_days: float = 30.0, batch_s: float = 0.5, drift_reference: int = 200,
                 drift_window: int = 100, drift_every: int = 50,
                 on_drift: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self.db = connect(self.path, create=True)
        self.embed, self.embedder = embed, embedder
        self.store_text = store_text
        self.max_bytes, self.max_days = int(max_mb * (1 << 20)), max_days
        self.batch_s = batch_s
        self.written = 0
        self.drift_reference, self.drift_every = drift_reference, drift_every
        self.on_drift = on_drift
        self.last_drift: dict | None = None
        self._ref: list[dict] = []
        self._recent: deque[dict] = deque(maxlen=drift_window)
        self._since_check = 0
        if drift_every:  # continue the reference of an earlier run with the same embedder
            old = [r for r in read_rows(self.path) if r["embedder"] in (None, "", embedder)]
            self._ref = [_light(r) for r in old[:drift_reference]]
            self._recent.extend(_light(r) for r in old[drift_reference:])
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="slmkit-request-log",
                                        daemon=True)
        self._thread.start()

    def record(self, row: dict, prompt: str | None = None, answer: str | None = None) -> None:
        """Queue one request (``row``: :data:`COLUMNS` values; the texts feed the embedding,
        length and language, and are stored only with ``store_text``)."""
        self._queue.put((row, prompt, answer))

    def flush(self, timeout: float = 30.0) -> None:
        """Block until everything queued so far is written."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)
        self.db.close()

    # ------------------------------------------------------------------ the writer thread

    def _loop(self) -> None:
        from slmkit.monitor.text import language

        stop = False
        while not stop:
            items = [self._queue.get()]
            deadline = time.monotonic() + self.batch_s
            while items[-1] is not None and not isinstance(items[-1], threading.Event):
                try:
                    items.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            waiters = [i for i in items if isinstance(i, threading.Event)]
            stop = any(i is None for i in items)
            rows = [i for i in items if isinstance(i, tuple)]
            try:
                if rows:
                    self._write(rows, language)
            except Exception as e:  # a full disk must not take the server down
                log.warning(f"request log {self.path}: {len(rows)} rows not written ({e})")
            for w in waiters:
                w.set()

    def _write(self, rows: list[tuple], language) -> None:
        texts = [p or "" for _, p, _ in rows]
        vectors = None
        if self.embed is not None and any(texts):
            vectors = self.embed(texts)
        values = []
        for i, (row, prompt, answer) in enumerate(rows):
            row = dict(row)
            if prompt is not None:
                row.setdefault("prompt_chars", len(prompt))
                row.setdefault("language", language(prompt))
            if vectors is not None and prompt:
                row["embedding"] = np.asarray(vectors[i], dtype=np.float32).tobytes()
                row["embedder"] = self.embedder
            if self.store_text:
                row["prompt"], row["answer"] = prompt, answer
            else:
                row["prompt"] = row["answer"] = None
            values.append(tuple(_sql(row.get(k)) for k in COLUMNS))
            if not row.get("canary"):
                self._track(row)
        cols = ", ".join(COLUMNS)
        marks = ", ".join("?" * len(COLUMNS))
        with self.db:
            self.db.executemany(f"INSERT INTO requests ({cols}) VALUES ({marks})", values)
        self.written += len(values)
        self._retain()
        try:
            self._check_drift()
        except Exception as e:  # never lose rows over a statistics failure
            log.warning(f"request log {self.path}: drift check failed ({e})")

    def _check_drift(self) -> None:
        if self.drift_every and self._since_check >= self.drift_every \
                and len(self._ref) >= min(self.drift_reference, 5) \
                and len(self._recent) == self._recent.maxlen:
            from slmkit.monitor.drift import compare

            self._since_check = 0
            self.last_drift = compare(self._ref, list(self._recent))
            if self.on_drift is not None:
                self.on_drift(self.last_drift)

    def _track(self, row: dict) -> None:
        light = _light({**row, "embedding": np.frombuffer(row["embedding"], np.float32)
                        if row.get("embedding") else None})
        if len(self._ref) < self.drift_reference:
            self._ref.append(light)
        else:
            self._recent.append(light)
            self._since_check += 1

    def _retain(self) -> None:
        """Drop rows past ``max_days``, then the oldest tenth until under ``max_mb``."""
        with self.db:
            self.db.execute("DELETE FROM requests WHERE ts < ?",
                            (time.time() - self.max_days * 86400,))
        for _ in range(40):
            pages, size = (self.db.execute(f"PRAGMA {p}").fetchone()[0]
                           for p in ("page_count", "page_size"))
            if pages * size <= self.max_bytes:
                break
            n = self.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
            if n == 0:
                break
            with self.db:
                self.db.execute("DELETE FROM requests WHERE id IN (SELECT id FROM requests "
                                "ORDER BY ts, id LIMIT ?)", (max(1, math.ceil(n / 10)),))
            # each step of this pragma frees one page; only executescript (sqlite3_exec)
            # runs it to the end
            self.db.executescript("PRAGMA incremental_vacuum;")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _light(row: dict) -> dict:
    """What drift needs of a row."""
    return {k: row.get(k) for k in ("embedding", "prompt_chars", "language", "mean_logprob",
                                    "flagged")}


def _sql(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
