"""Retrieval: BM25, dense vectors, and both fused by reciprocal rank.

Hybrid retrieval takes the ``candidates`` best chunks of each retriever and scores every
chunk by reciprocal rank fusion (Cormack, Clarke & Buettcher 2009, SIGIR),
``sum over retrievers of 1 / (rrf_k + rank)`` with 1-based ranks, which needs no score
calibration between BM25's unbounded scores and cosines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slmkit.rag.chunk import Chunk
from slmkit.rag.store import Lexical, Store


@dataclass
class Hit:
    """One retrieved chunk.

    Attributes:
        chunk_id: its id in the index.
        score: the score it was ranked by (RRF for hybrid, BM25 or cosine otherwise).
        dense: its cosine similarity to the query, when the dense retriever saw it.
        bm25: its BM25 score, when BM25 saw it.
        path, display: the file (absolute, and as shown in citations).
        chunk: heading, line range, page and text.
    """

    chunk_id: int
    score: float
    path: str
    display: str
    chunk: Chunk
    dense: float | None = None
    bm25: float | None = None

    @property
    def location(self) -> str:
        return self.chunk.location(self.display)

    def to_dict(self) -> dict:
        c = self.chunk
        return {"id": self.chunk_id, "score": round(self.score, 6), "path": self.display,
                "heading": c.heading, "start_line": c.start_line, "end_line": c.end_line,
                "page": c.page, "location": self.location, "text": c.text,
                "dense": None if self.dense is None else round(self.dense, 6),
                "bm25": None if self.bm25 is None else round(self.bm25, 6)}


def rrf(rankings: list[list[int]], rrf_k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of several ranked id lists, best first (ties: first seen)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking, 1):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


@dataclass
class Retriever:
    """An open index that answers queries (see :meth:`search`).

    Use :meth:`open`; the embedding model is loaded on the first dense query.
    """

    store: Store
    lexical: Lexical
    embedder: object = None
    timings: dict = field(default_factory=dict)

    @classmethod
    def open(cls, index: str | Path, embedder=None) -> Retriever:
        store = Store.open(index)
        return cls(store, Lexical.load(store), embedder)

    @property
    def embedder_name(self) -> str:
        return self.store.setting("embedder")

    def embed_query(self, query: str) -> np.ndarray:
        """The query's unit vector, computed on one thread: a query of a few dozen tokens
        gains nothing from a second thread and waits at every op's barrier for it (on a
        busy 2-core machine, 100 ms p50 on one thread against 642 ms on two)."""
        import torch

        if self.embedder is None:
            from slmkit.rag.embed import Embedder

            self.embedder = Embedder(self.embedder_name)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.embedder.encode([query])[0]
        finally:
            torch.set_num_threads(threads)

    def search(self, query: str, k: int = 5, mode: str = "hybrid", candidates: int = 50,
               rrf_k: int = 60, query_vector: np.ndarray | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``query``.

        Args:
            mode: ``"hybrid"``, ``"bm25"`` or ``"dense"``.
            candidates: how deep each retriever goes before fusion (at least ``k``).
            query_vector: the query's embedding, when the caller has it already.
        """
        depth = max(candidates, k) if mode == "hybrid" else k
        lexical = dense = []
        t0 = time.perf_counter()
        if mode in ("hybrid", "bm25"):
            lexical = self.lexical.search(query, depth)
        t1 = time.perf_counter()
        if mode in ("hybrid", "dense"):
            vec = self.embed_query(query) if query_vector is None else query_vector
            t2 = time.perf_counter()
            dense = self.store.dense(vec, depth)
        else:
            t2 = t1
        t3 = time.perf_counter()
        self.timings = {"bm25_s": t1 - t0, "embed_s": t2 - t1, "vector_s": t3 - t2}
        if mode == "bm25":
            ranked = lexical[:k]
        elif mode == "dense":
            ranked = dense[:k]
        else:
            ranked = rrf([[i for i, _ in lexical], [i for i, _ in dense]], rrf_k)[:k]
        bm25_of, dense_of = dict(lexical), dict(dense)
        rows = self.store.chunk_rows([i for i, _ in ranked])
        hits = []
        for cid, score in ranked:
            r = rows[cid]
            chunk = Chunk(r["text"], r["heading"], r["start_line"], r["end_line"], r["page"])
            hits.append(Hit(cid, float(score), r["path"], r["display"], chunk,
                            dense=dense_of.get(cid), bm25=bm25_of.get(cid)))
        return hits

    def dense_score(self, hit: Hit, query_vector: np.ndarray) -> float:
        """The cosine of a hit's stored vector with the query (for hits BM25 alone found)."""
        row = self.store.db.execute("SELECT embedding FROM vectors WHERE id = ?",
                                    (hit.chunk_id,)).fetchone()
        return float(np.frombuffer(row[0], dtype=np.float32) @ query_vector)

    def close(self) -> None:
        self.store.close()
