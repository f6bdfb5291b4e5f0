"""``slm rag eval``: how well an index retrieves and how well the model answers from it.

Retrieval, for each mode (BM25, dense, hybrid), over the answerable questions: recall@5,
nDCG@10 and MRR against the gold sources (:mod:`slmkit.rag.metrics`), and the query
latency p50/p95 (the query's embedding included for dense and hybrid).

Answers (``--answers``, the default), with the answering model, greedy:

* with RAG (retrieved sources in the prompt) and without (the bare question): exact match,
  gold-contained and ROUGE-L F1 against the gold answer;
* the share of answered questions whose citations include a gold source chunk;
* the abstention rate on out-of-corpus questions (should be high) and on answerable ones
  (should be low);
* end-to-end answer latency p50/p95.

Without an INDEX the built-in stdlib set runs (:mod:`slmkit.rag.evalset`), on an index
kept in ``~/.cache/slmkit/rag`` and brought up to date like any other.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from slmkit.rag import metrics as M
from slmkit.rag.config import EvalConfig, IndexConfig
from slmkit.rag.evalset import Question, builtin_questions, corpus_files, load_questions
from slmkit.step import StepResult, Table


def builtin_index_dir() -> Path:
    v = sys.version_info
    return Path.home() / ".cache" / "slmkit" / "rag" / f"stdlib-py{v.major}.{v.minor}"


def n_relevant(store, q: Question) -> int:
    """Chunks in the index that hold a gold source (the ideal ranking's length)."""
    n = 0
    for g in q.sources:
        rows = store.chunk_spans()
        n += sum(g.matches(p, d, a, b) for a, b, p, d in rows)
    return n


def relevance(hits, q: Question) -> list[bool]:
    return [any(g.matches(h.path, h.display, h.chunk.start_line, h.chunk.end_line)
                for g in q.sources) for h in hits]


def evaluate_retrieval(retriever, questions: list[Question], modes: list[str], k: int,
                       search: dict) -> dict[str, dict]:
    """``mode -> {recall@5, ndcg@10, mrr, p50_ms, p95_ms, questions}``."""
    judged = [q for q in questions if q.answerable and q.sources]
    out = {m: {"recall@5": [], "ndcg@10": [], "mrr": [], "ms": []} for m in modes}
    for q in judged:
        ideal = n_relevant(retriever.store, q)
        t0 = time.perf_counter()
        vec = retriever.embed_query(q.question)
        embed_s = time.perf_counter() - t0
        for mode in modes:
            t = time.perf_counter()
            hits = retriever.search(q.question, **{**search, "k": max(k, 10), "mode": mode},
                                    query_vector=vec)
            seconds = time.perf_counter() - t + (embed_s if mode != "bm25" else 0.0)
            rel = relevance(hits, q)
            row = out[mode]
            row["recall@5"].append(M.recall_at(rel, 5))
            row["ndcg@10"].append(M.ndcg_at(rel, 10, ideal))
            row["mrr"].append(M.reciprocal_rank(rel))
            row["ms"].append(seconds * 1000)
    return {m: {"recall@5": _mean(r["recall@5"]), "ndcg@10": _mean(r["ndcg@10"]),
                "mrr": _mean(r["mrr"]), "p50_ms": M.percentile(r["ms"], 50),
                "p95_ms": M.percentile(r["ms"], 95), "questions": len(judged)}
            for m, r in out.items()}


def evaluate_answers(answerer, questions: list[Question], progress=None) -> tuple[dict, list]:
    """Answer every question with and without retrieval; the summary and one record per
    question."""
    records, agg = [], {k: [] for k in ("em", "contains", "rouge_l", "em_norag",
                                        "contains_norag", "rouge_l_norag", "cited_gold",
                                        "abstain_out", "abstain_in", "latency_s")}
    for q in questions:
        t = time.perf_counter()
        a = answerer.ask(q.question)
        agg["latency_s"].append(time.perf_counter() - t)
        rec = {**a.to_dict(), "gold": q.answer}
        if q.answerable:
            bare = answerer.ask_without_retrieval(q.question)
            reply = "" if a.abstained else a.text
            for suffix, text in (("", reply), ("_norag", bare)):
                agg["em" + suffix].append(M.exact_match(text, q.answer))
                agg["contains" + suffix].append(M.contains(text, q.answer))
                agg["rouge_l" + suffix].append(M.rouge_l(text, q.answer))
            agg["abstain_in"].append(float(a.abstained))
            rec["answer_without_rag"] = bare
            if not a.abstained and q.sources:
                gold = any(g.matches(_abs(c, a), c.path, c.start_line, c.end_line)
                           for c in a.citations for g in q.sources)
                agg["cited_gold"].append(float(gold))
                rec["cited_gold"] = gold
        else:
            agg["abstain_out"].append(float(a.abstained))
        records.append(rec)
        if progress is not None:
            progress(1)
    lat = agg.pop("latency_s")
    summary = {k: _mean(v) for k, v in agg.items()}
    summary.update(answerable=sum(q.answerable for q in questions),
                   out_of_corpus=sum(not q.answerable for q in questions),
                   answered_with_citations=len(agg["cited_gold"]),
                   latency_p50_s=M.percentile(lat, 50), latency_p95_s=M.percentile(lat, 95))
    return summary, records


def _abs(citation, answer) -> str:
    """The absolute path of a citation's chunk (from the sources given to the model)."""
    return answer.sources[citation.n - 1].path


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def run_eval(cfg: EvalConfig) -> StepResult:
    """Evaluate retrieval and answers (see the module docstring)."""
    from slmkit.console import progress
    from slmkit.data.corpus import stdlib_root
    from slmkit.rag.index import run_index
    from slmkit.rag.retrieve import Retriever

    if cfg.out:
        from slmkit.models.io import discard_out_dir, prepare_out_dir

        discard_out_dir(prepare_out_dir(cfg.out, cfg.overwrite)[1])
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if cfg.answers:
        from slmkit.models.io import check_loadable

        check_loadable(cfg.model)                  # a bad --model is refused before any work
    if cfg.index is None:
        root = stdlib_root()
        index_dir = builtin_index_dir()
        run_index(IndexConfig(docs=corpus_files(root), out=str(index_dir)))
        n = cfg.limit or 80
        questions = builtin_questions(root, answerable=max(1, n * 3 // 4),
                                      held_out=max(1, n - n * 3 // 4) if n > 1 else 0)
        source = "built-in (stdlib docstrings)"
    else:
        index_dir = Path(cfg.index)
        questions = load_questions(cfg.questions)[:cfg.limit]
        source = cfg.questions
    search = {"candidates": cfg.candidates, "rrf_k": cfg.rrf_k, "fusion": cfg.fusion,
              "alpha": cfg.alpha}
    retriever = Retriever.open(index_dir)
    t0 = time.perf_counter()
    try:
        retrieval = evaluate_retrieval(retriever, questions, cfg.modes, cfg.k, search)
        answers, records = None, []
        if cfg.answers:
            from slmkit.rag.answerer import Answerer

            answerer = Answerer(retriever, cfg.model, context_chunks=cfg.context_chunks,
                                max_tokens=cfg.max_tokens, min_score=cfg.min_score,
                                dtype=cfg.dtype, search={**search, "k": cfg.k,
                                                         "mode": cfg.mode})
            try:
                with progress("answering", total=len(questions)) as advance:
                    answers, records = evaluate_answers(answerer, questions, advance)
            finally:
                answerer.close()
    finally:
        retriever.close()
    seconds = time.perf_counter() - t0
    return _result(cfg, str(index_dir), source, questions, retrieval, answers, records,
                   seconds)


def _result(cfg, index_dir, source, questions, retrieval, answers, records,
            seconds) -> StepResult:
    tables = [Table("retrieval", [
        (m, _num(r["recall@5"]), _num(r["ndcg@10"]), _num(r["mrr"]), f"{r['p50_ms']:.1f}",
         f"{r['p95_ms']:.1f}") for m, r in retrieval.items()],
        header=("mode", "recall@5", "nDCG@10", "MRR", "p50 ms", "p95 ms"))]
    figures = {f"{m}_{k}": v for m, r in retrieval.items() for k, v in r.items()
               if k != "questions"}
    if answers is not None:
        tables.append(Table(f"answers ({cfg.model})", [
            ("with RAG", _pct(answers["em"]), _pct(answers["contains"]),
             _num(answers["rouge_l"])),
            ("without RAG", _pct(answers["em_norag"]), _pct(answers["contains_norag"]),
             _num(answers["rouge_l_norag"]))],
            header=("", "exact match", "contains gold", "ROUGE-L")))
        figures.update({f"answer_{k}": v for k, v in answers.items()})
    rows = [("index", index_dir), ("questions", f"{len(questions)} from {source} "
             f"({sum(q.answerable for q in questions)} answerable)")]
    if answers is not None:
        rows += [("citations on a gold source", f"{_pct(answers['cited_gold'])} of "
                  f"{answers['answered_with_citations']} answered"),
                 ("abstained, out of corpus", _pct(answers["abstain_out"])),
                 ("abstained, answerable", _pct(answers["abstain_in"])),
                 ("answer latency p50 / p95", f"{answers['latency_p50_s']:.2f} / "
                  f"{answers['latency_p95_s']:.2f} s")]
    rows.append(("time", f"{seconds:.0f} s"))
    data = {"index": index_dir, "questions": source, "retrieval": retrieval,
            "answers": answers, "settings": cfg.model_dump(mode="json")}
    if cfg.out:
        _write(cfg, data, records)
        rows.append(("wrote", cfg.out))
    return StepResult("rag eval", out=cfg.out, figures=figures, tables=tables, rows=rows,
                      data=data)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _write(cfg, data: dict, records: list) -> None:
    from slmkit.models.io import atomic_dir

    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        with open(tmp / "answers.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
