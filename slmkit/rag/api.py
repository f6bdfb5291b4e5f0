"""``slm rag query`` and ``slm rag ask``, and the Python functions behind them.

Python users can call :func:`index`, :func:`search` and :func:`answer` (or build the
configs and call :func:`run_query` / :func:`run_ask`, exactly what the CLI does). For many
questions, keep a :class:`~slmkit.rag.retrieve.Retriever` or
:class:`~slmkit.rag.answerer.Answerer` open instead.
"""

from __future__ import annotations

from slmkit.rag.config import AskConfig, IndexConfig, QueryConfig
from slmkit.step import StepResult, Table


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _search_kwargs(cfg) -> dict:
    return {"k": cfg.k, "mode": cfg.mode, "candidates": cfg.candidates, "rrf_k": cfg.rrf_k,
            "fusion": cfg.fusion, "alpha": cfg.alpha}


def _snippet(text: str, width: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def run_query(cfg: QueryConfig) -> StepResult:
    """Retrieve the best chunks for a query (no model)."""
    from slmkit.rag.retrieve import Retriever

    _threads(cfg.threads)
    retriever = Retriever.open(cfg.index)
    try:
        hits = retriever.search(cfg.query, **_search_kwargs(cfg))
    finally:
        retriever.close()
    table = Table(f"slm rag query ({cfg.mode})", [
        (str(i), f"{h.score:.4f}", h.location, _snippet(h.chunk.text))
        for i, h in enumerate(hits, 1)], header=("#", "score", "source", "text"))
    notes = [] if hits else ["no chunk matched the query"]
    return StepResult("rag query", figures={"hits": len(hits)}, tables=[table], notes=notes,
                      data={"query": cfg.query, "mode": cfg.mode,
                            "hits": [h.to_dict() for h in hits]})


def run_ask(cfg: AskConfig) -> StepResult:
    """Answer a question from the index with cited sources, or say "I don't know"."""
    a = _answer(cfg)
    cited = {c.n: c for c in a.citations}
    sources = Table("sources", [
        (f"[{i}]", h.location, f"{h.dense:.2f}" if h.dense is not None else "",
         ("cited" + (" (attributed)" if cited[i].attributed else "")) if i in cited else "")
        for i, h in enumerate(a.sources, 1)], header=("n", "source", "similarity", ""))
    rows = [("answer", a.text)]
    if a.abstained:
        rows.append(("abstained", a.reason))
    elif a.groundedness is not None:
        rows.append(("groundedness", f"{a.groundedness:.2f} (share of the answer's content "
                     "words found in the sources)"))
    rows += [("retrieval", f"{a.timings['retrieve_s'] * 1000:.0f} ms ({cfg.mode})"),
             ("generation", f"{a.timings['generate_s']:.1f} s, {a.tokens} tokens")]
    return StepResult("rag ask", figures={"abstained": a.abstained,
                                          "citations": len(a.citations)},
                      tables=[sources], rows=rows, data=a.to_dict())


def index(docs: list[str], out: str, **options) -> StepResult:
    """Build or update an index (``options``: fields of :class:`IndexConfig`)."""
    from slmkit.rag.index import run_index

    return run_index(IndexConfig(docs=list(docs), out=out, **options))


def search(index_dir: str, query: str, **options) -> list:
    """The best chunks for ``query`` as :class:`~slmkit.rag.retrieve.Hit` objects
    (``options``: k, mode, candidates, fusion, alpha, rrf_k)."""
    from slmkit.rag.retrieve import Retriever

    retriever = Retriever.open(index_dir)
    try:
        return retriever.search(query, **options)
    finally:
        retriever.close()


def answer(index_dir: str, question: str, **options):
    """One :class:`~slmkit.rag.answerer.Answer` (``options``: fields of :class:`AskConfig`)."""
    from slmkit.errors import validated

    return _answer(validated(AskConfig, index=index_dir, question=question, **options))


def _answer(cfg: AskConfig):
    from slmkit.models.io import check_loadable
    from slmkit.rag.answerer import Answerer
    from slmkit.rag.retrieve import Retriever

    _threads(cfg.threads)
    check_loadable(cfg.model)                      # a bad --model is refused before any work
    retriever = Retriever.open(cfg.index)
    try:
        answerer = Answerer(retriever, cfg.model, context_chunks=cfg.context_chunks,
                            max_tokens=cfg.max_tokens, min_score=cfg.min_score,
                            dtype=cfg.dtype, search=_search_kwargs(cfg))
        try:
            return answerer.ask(cfg.question)
        finally:
            answerer.close()
    finally:
        retriever.close()
