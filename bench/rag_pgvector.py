"""The PostgreSQL store's vector search: exact scan vs an HNSW index, at ``--chunks`` rows.

Why ``slm rag index --store postgresql://...`` searches exactly (slmkit/rag/pgstore.py):
this fills a scratch schema with ``--chunks`` unit vectors of 384 dimensions (MiniLM's),
clustered like embeddings are (200 centres plus noise; synthetic, so that 10k rows take
seconds to make instead of an hour of embedding on 2 cores), builds pgvector's HNSW index
(cosine, defaults m=16, ef_construction=64), and runs ``--queries`` nearby queries, each
in turn through the index (``hnsw.ef_search`` 100, what the store sets for hybrid's 50
candidates) and as an exact scan (index scans off), with the store's own SQL. It reports
p50/p95 latency of each and the HNSW results' recall of the exact top 10 and top 50.
The scratch schema is dropped at the end.

Needs a server with pgvector that the user may create schemas in::

    .venv/bin/python bench/rag_pgvector.py --url postgresql://USER@127.0.0.1:5432/DB
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="postgresql://USER@HOST:PORT/DB")
    ap.add_argument("--chunks", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--depth", type=int, default=50, help="rows asked for (hybrid's "
                    "candidates)")
    args = ap.parse_args()

    from slmkit.rag.pgstore import _connect, _vec, redact

    conn = _connect(args.url)
    rng = np.random.default_rng(0)
    n, d = args.chunks, 384
    centres = rng.standard_normal((200, d))
    x = centres[rng.integers(0, 200, n)] + 0.7 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[rng.integers(0, n, args.queries)] + 0.3 * rng.standard_normal((args.queries, d))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    sql = "SELECT id FROM slm_bench.chunks ORDER BY embedding <=> %s::vector LIMIT %s"

    conn.execute("DROP SCHEMA IF EXISTS slm_bench CASCADE")
    conn.execute("CREATE SCHEMA slm_bench")
    try:
        conn.execute(f"CREATE TABLE slm_bench.chunks (id bigint PRIMARY KEY, "
                     f"embedding vector({d}) NOT NULL)")
        t = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY slm_bench.chunks (id, embedding) FROM "
                                            "STDIN") as copy:
            for i, v in enumerate(x):
                copy.write_row((i + 1, _vec(v)))
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        conn.execute("CREATE INDEX ON slm_bench.chunks USING hnsw (embedding "
                     "vector_cosine_ops)")
        hnsw_s = time.perf_counter() - t
        conn.execute("ANALYZE slm_bench.chunks")
        conn.execute(f"SET hnsw.ef_search = {max(100, 2 * args.depth)}")
        plan = " ".join(r[0] for r in conn.execute("EXPLAIN " + sql, (_vec(q[0]), args.depth)))
        assert "Index Scan" in plan, plan

        def timed(v):
            t = time.perf_counter()
            ids = [r[0] for r in conn.execute(sql, (_vec(v), args.depth))]
            return ids, (time.perf_counter() - t) * 1000

        approx, exact = [], []
        for v in q:                       # interleaved, so machine load hits both alike
            conn.execute("SET enable_indexscan = on")
            approx.append(timed(v))
            conn.execute("SET enable_indexscan = off")
            exact.append(timed(v))
    finally:
        conn.execute("DROP SCHEMA IF EXISTS slm_bench CASCADE")
        conn.close()

    truth = [(np.argsort(-(x @ v), kind="stable")[:args.depth] + 1).tolist() for v in q]
    assert all(e[0] == t for e, t in zip(exact, truth)), "the exact scan is not exact"
    r10 = np.mean([len(set(a[:10]) & set(t[:10])) / 10 for (a, _), t in zip(approx, truth)])
    rk = np.mean([len(set(a) & set(t)) / len(t) for (a, _), t in zip(approx, truth)])
    p = lambda rows, pct: np.percentile([ms for _, ms in rows], pct)  # noqa: E731
    print(f"server {redact(args.url)}: {n} vectors x {d}, {args.queries} queries, "
          f"top {args.depth}; load {load_s:.1f} s, HNSW build {hnsw_s:.1f} s")
    print(f"{'search':<22}{'p50 ms':>8}{'p95 ms':>8}{'recall@10':>11}"
          f"{f'recall@{args.depth}':>11}")
    print(f"{'exact scan':<22}{p(exact, 50):8.1f}{p(exact, 95):8.1f}{1.0:11.3f}{1.0:11.3f}")
    print(f"{'HNSW ef_search ' + str(max(100, 2 * args.depth)):<22}{p(approx, 50):8.1f}"
          f"{p(approx, 95):8.1f}{r10:11.3f}{rk:11.3f}")


if __name__ == "__main__":
    main()
