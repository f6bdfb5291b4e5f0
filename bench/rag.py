"""RAG side by side: retrievers, embedders, answers with vs without retrieval, and speed.

Everything runs on the built-in question set (stdlib docstrings, ``slmkit.rag.evalset``)
and real models, offline:

1. **Retrieval** on the built-in index (29 stdlib modules): recall@5, nDCG@10 and MRR for
   BM25, dense (all-MiniLM-L6-v2) and hybrid (the default fusion); then every fusion
   function over the same candidates (``--fusion``: RRF at several k, weighted RRF, convex
   combinations), with the weight picked by 2-fold cross-validation; the abstention
   decision alone (``--abstention``: the retrieval score against ``--min-score`` on every
   answerable and out-of-corpus question, no generation); optionally the hybrid top 10
   reranked by the built-in LM's query likelihood (``--rerank-lm N``, slow).
2. **Embedders**: MiniLM against the built-in SmolLM2-135M's own mean-pooled hidden
   states, each indexing the same ``--embed-files`` modules, on those modules' questions
   (dense and hybrid). The build rate (chunks/s) of each is measured here, on a fresh
   index.
3. **Answers** with ``builtin:smollm2-135m`` on ``--answers`` questions (3/4 answerable,
   1/4 out of corpus, or ``--out-of-corpus`` of those): exact match, gold-contained and
   ROUGE-L with and without retrieval, citations on the gold source, abstention rates,
   answer latency p50/p95.
4. **Scale**: the built-in index's chunks and vectors copied until the store holds
   ``--scale`` chunks (10 000; copies of real rows, so the scan costs what 10k distinct
   chunks cost), then BM25, vector search and hybrid timed over ``--queries`` questions
   (p50/p95; the query embedding is timed on its own, through ONNX Runtime as searches
   run it and, in turn on the same query, through transformers).

Run under the team lock::

    flock /tmp/slmkit-bench.lock .venv/bin/python bench/rag.py

Writes ``bench/results/rag.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def retrieval_table(title: str, results: dict) -> None:
    from slmkit.console import print_table

    print_table(title, [(m, f"{r['recall@5']:.3f}", f"{r['ndcg@10']:.3f}", f"{r['mrr']:.3f}",
                         f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}")
                        for m, r in results.items()],
                header=("mode", "recall@5", "nDCG@10", "MRR", "p50 ms", "p95 ms"))


def embedders(root: Path, files: list[str], questions, work: Path, threads: int) -> dict:
    """Index the same files with each embedder; dense and hybrid quality; build rate."""
    from slmkit.rag.config import IndexConfig
    from slmkit.rag.evaluate import evaluate_retrieval
    from slmkit.rag.index import run_index
    from slmkit.rag.retrieve import Retriever

    out = {}
    for name in ("minilm", "lm:builtin:smollm2-135m"):
        index = work / name.replace(":", "_")
        t = time.perf_counter()
        built = run_index(IndexConfig(docs=files, out=str(index), embedder=name,
                                      threads=threads, overwrite=True))
        seconds = time.perf_counter() - t
        retriever = Retriever.open(index)
        res = evaluate_retrieval(retriever, questions, ["dense", "hybrid"], 10, {})
        retriever.close()
        out[name] = {"chunks": built.figures["chunks"], "build_s": seconds,
                     "chunks_per_s": built.figures["chunks"] / seconds, **res}
    return out


def scale(index: Path, target: int, questions, work: Path) -> dict:
    """Copy the index's rows until it holds ``target`` chunks; time the retrievers."""
    import numpy as np

    from slmkit.rag.metrics import percentile
    from slmkit.rag.retrieve import Retriever
    from slmkit.rag.store import Lexical, Store

    big = work / "scale"
    shutil.copytree(index, big)
    store = Store.open(big)
    n = store.count()[1]
    rows = store.db.execute("SELECT c.file_id, c.ordinal, c.heading, c.start_line, "
                            "c.end_line, c.page, c.text, v.embedding FROM chunks c JOIN "
                            "vectors v ON v.id = c.id ORDER BY c.id").fetchall()
    with store.db:
        while n < target:
            for r in rows[:target - n]:
                store.db.execute("INSERT INTO chunks (file_id, ordinal, heading, start_line, "
                                 "end_line, page, text) VALUES (?, ?, ?, ?, ?, ?, ?)", r[:7])
                store.db.execute("INSERT INTO vectors (id, embedding) VALUES (?, ?)",
                                 (store.db.last_insert_rowid(), r[7]))
            n = store.count()[1]
        store.set_setting("generation", store.setting("generation") + 1)
    t = time.perf_counter()
    Lexical.build(store, store.setting("generation"))
    bm25_build_s = time.perf_counter() - t
    store.close()
    retriever = Retriever.open(big)
    times = {"embed_query": [], "embed_query_torch": [], "bm25": [], "dense_search": [],
             "hybrid": []}
    for q in questions:
        t = time.perf_counter()
        vec = retriever.embed_query(q.question)                # ONNX Runtime when installed
        times["embed_query"].append(time.perf_counter() - t)
        t = time.perf_counter()                                # the same on transformers
        retriever.embedder.encode_query(q.question, onnx=False)
        times["embed_query_torch"].append(time.perf_counter() - t)
        for mode, key in (("bm25", "bm25"), ("dense", "dense_search"), ("hybrid", "hybrid")):
            t = time.perf_counter()
            retriever.search(q.question, k=10, mode=mode, query_vector=vec)
            times[key].append(time.perf_counter() - t)
    retriever.close()
    out = {"chunks": n, "bm25_build_s": bm25_build_s, "queries": len(questions)}
    for key, values in times.items():
        ms = [v * 1000 for v in values]
        out[key] = {"p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
                    "mean_ms": float(np.mean(ms))}
    e = times["embed_query"]
    out["hybrid_with_embedding"] = {
        "p50_ms": percentile([(a + b) * 1000 for a, b in zip(e, times["hybrid"])], 50),
        "p95_ms": percentile([(a + b) * 1000 for a, b in zip(e, times["hybrid"])], 95)}
    return out


def fusion_sweep(retriever, questions, depth: int = 50) -> dict:
    """Fusion functions over the same BM25 and dense candidate lists (``depth`` each), on
    the bench's questions: reciprocal rank fusion (Cormack et al. 2009) with several k,
    weighted RRF, and the convex combination of min-max normalised scores that Bruch et al.
    (2023, "An Analysis of Fusion Functions for Hybrid Retrieval") found better than RRF
    when its weight is tuned. The weight is picked by 2-fold cross-validation (even / odd
    questions) so the held-out figure is not tuned on itself."""
    from slmkit.rag import metrics as M
    from slmkit.rag.evaluate import n_relevant
    from slmkit.rag.retrieve import convex, rrf

    rows = []
    for q in questions:
        vec = retriever.embed_query(q.question)
        lexical = retriever.lexical.search(q.question, depth)
        dense = retriever.store.dense(vec, depth)
        ids = {i for i, _ in lexical} | {i for i, _ in dense}
        chunk = retriever.store.chunk_rows(sorted(ids))
        rel = {i: any(g.matches(chunk[i]["path"], chunk[i]["display"], chunk[i]["start_line"],
                                chunk[i]["end_line"]) for g in q.sources) for i in ids}
        rows.append((lexical, dense, rel, n_relevant(retriever.store, q)))

    def fused(name, lexical, dense):
        kind, _, arg = name.partition(":")
        if kind == "bm25":
            return [i for i, _ in lexical]
        if kind == "dense":
            return [i for i, _ in dense]
        if kind == "rrf":
            return [i for i, _ in rrf([[i for i, _ in lexical], [i for i, _ in dense]],
                                      int(arg))]
        if kind == "wrrf":                      # BM25 weighted w, dense 1, k = 60
            w, score = float(arg), {}
            for r, (i, _) in enumerate(lexical, 1):
                score[i] = score.get(i, 0.0) + w / (60 + r)
            for r, (i, _) in enumerate(dense, 1):
                score[i] = score.get(i, 0.0) + 1 / (60 + r)
            return sorted(score, key=lambda i: -score[i])
        return [i for i, _ in convex(lexical, dense, float(arg))]   # what --fusion convex runs

    names = ["bm25", "dense"] + [f"rrf:{k}" for k in (1, 10, 30, 60, 100)] + \
        [f"wrrf:{w}" for w in (1.5, 2, 3, 4)] + \
        [f"convex:{a}" for a in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    per = {n: [] for n in names}
    for lexical, dense, rel, ideal in rows:
        for n in names:
            ranked = [rel[i] for i in fused(n, lexical, dense)[:10]]
            per[n].append((M.ndcg_at(ranked, 10, ideal), M.recall_at(ranked, 5),
                           M.reciprocal_rank(ranked)))

    def mean(n, idx, which=None):
        vals = [v[idx] for j, v in enumerate(per[n]) if which is None or j % 2 == which]
        return sum(vals) / len(vals)

    def versus_bm25(n):                         # questions better / worse than BM25 alone
        pairs = list(zip(per[n], per["bm25"]))
        return (sum(a[0] > b[0] + 1e-9 for a, b in pairs),
                sum(a[0] < b[0] - 1e-9 for a, b in pairs))

    out = {"questions": len(rows), "depth": depth,
           "all": {n: {"ndcg@10": mean(n, 0), "recall@5": mean(n, 1), "mrr": mean(n, 2),
                       "better_worse_than_bm25": versus_bm25(n)} for n in names}}
    for family in ("rrf", "wrrf", "convex"):
        members = [n for n in names if n.startswith(family + ":")]
        held, picks = [], []
        for fold in (0, 1):                     # tune on one half, score the other
            best = max(members, key=lambda n: mean(n, 0, fold))
            picks.append(best)
            held.append(mean(best, 0, 1 - fold))
        out[f"cv_{family}"] = {"picked": picks, "held_out_ndcg@10": sum(held) / 2}
    out["cv_bm25"] = {"held_out_ndcg@10": (mean("bm25", 0, 0) + mean("bm25", 0, 1)) / 2}
    return out


def abstention(retriever, questions, thresholds=(0.4, 0.45, 0.5, 0.55, 0.6)) -> dict:
    """The abstention decision alone (no generation) on every built-in question: the best
    prompt source's cosine from :func:`slmkit.rag.answerer.ground` (what ``slm rag ask``
    and ``slm serve --rag`` compare with ``--min-score``), the share abstained at each
    threshold on out-of-corpus and on answerable questions, and the score's AUROC."""
    from slmkit.rag.answerer import ground

    best = {True: [], False: []}
    for q in questions:
        g = ground(retriever, q.question, {"k": 3}, 1, 0.0)
        best[q.answerable].append(g.best)
    inside, outside = best[True], best[False]
    pairs = [(a > b) + 0.5 * (a == b) for a in inside for b in outside]
    return {"answerable": len(inside), "out_of_corpus": len(outside),
            "auroc": sum(pairs) / len(pairs) if pairs else None,
            "rates": {str(t): {"out_of_corpus": sum(b < t for b in outside) / len(outside),
                               "answerable": sum(b < t for b in inside) / len(inside)}
                      for t in thresholds}}


def lm_rerank(retriever, questions, model_ref: str = "builtin:smollm2-135m",
              depth: int = 10) -> dict:
    """The hybrid top ``depth`` reranked by an installed causal LM (no cross-encoder can be
    had offline here): UPR's query likelihood (Sachan et al. 2022, "Improving Passage
    Retrieval with Zero-Shot Question Generation"), the mean log-probability of the
    question's tokens after the passage and a request to write a question about it. One
    forward per candidate, so its cost is the point of measuring it."""
    import numpy as np
    import torch

    from slmkit.models import load_model
    from slmkit.rag import metrics as M
    from slmkit.rag.evaluate import n_relevant, relevance

    model, tok = load_model(model_ref)
    model.eval()

    def likelihood(passage: str, question: str) -> float:
        head = tok(f"Passage: {passage}\nPlease write a question based on this passage.\n"
                   "Question:", add_special_tokens=False)["input_ids"][-300:]
        tail = tok(" " + question, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([head + tail])).logits[0, len(head) - 1:-1]
        logp = torch.log_softmax(logits.float(), -1)                    # [len(tail), vocab]
        return float(logp.gather(1, torch.tensor(tail)[:, None]).mean())

    base, reranked, seconds = [], [], []
    for q in questions:
        hits = retriever.search(q.question, k=depth)
        ideal = n_relevant(retriever.store, q)
        base.append(M.ndcg_at(relevance(hits, q), 10, ideal))
        t = time.perf_counter()
        scores = [likelihood(h.chunk.text, q.question) for h in hits]
        seconds.append(time.perf_counter() - t)
        order = sorted(range(len(hits)), key=lambda i: -scores[i])
        reranked.append(M.ndcg_at(relevance([hits[i] for i in order], q), 10, ideal))
    return {"model": model_ref, "depth": depth, "questions": len(questions),
            "hybrid_ndcg@10": float(np.mean(base)), "reranked_ndcg@10": float(np.mean(reranked)),
            "better": sum(a > b + 1e-9 for a, b in zip(reranked, base)),
            "worse": sum(a < b - 1e-9 for a, b in zip(reranked, base)),
            "rerank_s_p50": M.percentile(seconds, 50), "rerank_s_p95": M.percentile(seconds, 95)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-of-corpus", type=int, default=None, help="out-of-corpus "
                    "questions among the answered ones (default: a quarter of --answers; "
                    "all 119 measure abstention on the whole held-out set)")
    ap.add_argument("--answers", type=int, default=40, help="questions answered by the "
                    "model (0: skip)")
    ap.add_argument("--embed-files", type=int, default=6, help="modules indexed by both "
                    "embedders (0: skip)")
    ap.add_argument("--scale", type=int, default=10000, help="chunks in the latency store "
                    "(0: skip)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--abstention", action=argparse.BooleanOptionalAction, default=True,
                    help="abstention rates by the retrieval score on every question")
    ap.add_argument("--rerank-lm", type=int, default=0, help="rerank the hybrid top 10 of "
                    "this many questions with the built-in LM's query likelihood (slow: one "
                    "forward per candidate; 0: skip)")
    ap.add_argument("--fusion", action=argparse.BooleanOptionalAction, default=True,
                    help="sweep fusion functions over the same candidates")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rag.json")
    args = ap.parse_args(argv)

    import torch

    from slmkit.console import print_table
    from slmkit.data.corpus import stdlib_root
    from slmkit.rag.answerer import Answerer
    from slmkit.rag.config import IndexConfig
    from slmkit.rag.evalset import builtin_questions, corpus_files
    from slmkit.rag.evaluate import builtin_index_dir, evaluate_answers, evaluate_retrieval
    from slmkit.rag.index import run_index
    from slmkit.rag.retrieve import Retriever

    torch.set_num_threads(args.threads)
    root = stdlib_root()
    result: dict = {"threads": args.threads}
    index = builtin_index_dir()
    built = run_index(IndexConfig(docs=corpus_files(root), out=str(index)))
    result["index"] = {"path": str(index), **built.figures}
    questions = builtin_questions(root, answerable=10**6, held_out=10**6)
    answerable = [q for q in questions if q.answerable]

    retriever = Retriever.open(index)
    result["retrieval"] = evaluate_retrieval(retriever, answerable, ["bm25", "dense",
                                                                     "hybrid"], 10, {})
    retrieval_table(f"retrieval, {len(answerable)} questions, {built.figures['chunks']} "
                    "chunks", result["retrieval"])
    if args.fusion:
        f = result["fusion"] = fusion_sweep(retriever, answerable)
        print_table(f"fusion functions, {f['questions']} questions, top {f['depth']} of each",
                    [(n, f"{r['ndcg@10']:.3f}", f"{r['recall@5']:.3f}", f"{r['mrr']:.3f}",
                      "{} / {}".format(*r["better_worse_than_bm25"]))
                     for n, r in f["all"].items()], header=("fusion", "nDCG@10", "recall@5",
                                                             "MRR", "vs BM25 +/-"))
        print_table("2-fold cross-validated nDCG@10 (weight picked on the other half)", [
            (k[3:], ", ".join(v.get("picked", [])), f"{v['held_out_ndcg@10']:.3f}")
            for k, v in f.items() if k.startswith("cv_")], header=("family", "picked",
                                                                     "held-out nDCG@10"))
    if args.abstention:
        questions = builtin_questions(root, answerable=10**6, held_out=10**6)
        a = result["abstention"] = abstention(retriever, questions)
        print_table(f"abstention by the retrieval score alone, {a['answerable']} answerable + "
                    f"{a['out_of_corpus']} out-of-corpus questions (AUROC {a['auroc']:.3f})",
                    [(t, f"{r['out_of_corpus']:.1%}", f"{r['answerable']:.1%}")
                     for t, r in a["rates"].items()],
                    header=("--min-score", "abstained, out of corpus", "abstained, answerable"))
    if args.rerank_lm:
        from slmkit.rag.evalset import _thin

        r = result["rerank_lm"] = lm_rerank(retriever, _thin(answerable, args.rerank_lm))
        print_table(f"hybrid + {r['model']} query-likelihood rerank of the top {r['depth']}, "
                    f"{r['questions']} questions", [
                        ("nDCG@10 hybrid / reranked", f"{r['hybrid_ndcg@10']:.3f} / "
                         f"{r['reranked_ndcg@10']:.3f}"),
                        ("questions better / worse", f"{r['better']} / {r['worse']}"),
                        ("rerank time per query p50 / p95", f"{r['rerank_s_p50']:.1f} / "
                         f"{r['rerank_s_p95']:.1f} s")])
    retriever.close()

    with tempfile.TemporaryDirectory(prefix="slmkit-bench-rag-") as tmp:
        work = Path(tmp)
        if args.embed_files:
            files = corpus_files(root)[:args.embed_files]
            subset = [q for q in answerable if any(q.sources[0].path == str(Path(f).resolve())
                                                   for f in files)]
            result["embedders"] = embedders(root, files, subset, work, args.threads)
            print_table(f"embedders, {len(files)} modules, {len(subset)} questions", [
                (name, r["chunks"], f"{r['chunks_per_s']:.1f}", f"{r['dense']['ndcg@10']:.3f}",
                 f"{r['hybrid']['ndcg@10']:.3f}", f"{r['dense']['recall@5']:.3f}")
                for name, r in result["embedders"].items()],
                header=("embedder", "chunks", "build chunks/s", "dense nDCG@10",
                        "hybrid nDCG@10", "dense recall@5"))
        if args.scale:
            result["scale"] = scale(index, args.scale, answerable[:args.queries], work)
            s = result["scale"]
            print_table(f"latency at {s['chunks']} chunks, {s['queries']} queries", [
                (k, f"{s[k]['p50_ms']:.2f}", f"{s[k]['p95_ms']:.2f}")
                for k in ("embed_query", "embed_query_torch", "bm25", "dense_search", "hybrid",
                          "hybrid_with_embedding")], header=("step", "p50 ms", "p95 ms"))

    if args.answers:
        n = args.answers
        held = n - n * 3 // 4 if args.out_of_corpus is None else args.out_of_corpus
        asked = builtin_questions(root, answerable=n * 3 // 4, held_out=held)
        retriever = Retriever.open(index)
        answerer = Answerer(retriever, "builtin:smollm2-135m")
        t = time.perf_counter()
        summary, records = evaluate_answers(answerer, asked)
        answerer.close()
        retriever.close()
        summary["seconds"] = time.perf_counter() - t
        result["answers"] = summary
        result["answer_records"] = records
        print_table(f"answers, builtin:smollm2-135m, {summary['answerable']} answerable + "
                    f"{summary['out_of_corpus']} out of corpus", [
                        ("exact match", f"{summary['em']:.1%}", f"{summary['em_norag']:.1%}"),
                        ("contains gold", f"{summary['contains']:.1%}",
                         f"{summary['contains_norag']:.1%}"),
                        ("ROUGE-L", f"{summary['rouge_l']:.3f}",
                         f"{summary['rouge_l_norag']:.3f}")],
                    header=("", "with RAG", "without RAG"))
        print_table("answers, grounding", [
            ("citations on the gold source", f"{summary['cited_gold']:.1%} of "
             f"{summary['answered_with_citations']}"),
            ("abstained, out of corpus", f"{summary['abstain_out']:.1%}"),
            ("abstained, answerable", f"{summary['abstain_in']:.1%}"),
            ("answer latency p50 / p95", f"{summary['latency_p50_s']:.2f} / "
             f"{summary['latency_p95_s']:.2f} s")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
