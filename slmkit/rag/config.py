"""Options of ``slm rag index | query | ask | eval``: one pydantic config per verb.

Light to import (pydantic only): the CLI builds its flags from these classes. Shared
blocks have one owner: :class:`SearchOptions` (how chunks are retrieved) is part of
``query``, ``ask`` and ``eval``; :class:`AnswerOptions` (how the model answers) of ``ask``
and ``eval``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slmkit.step import StepConfig, cli, refuse_unused

#: The built-in answering model.
DEFAULT_MODEL = "builtin:smollm2-135m"
Mode = Literal["hybrid", "bm25", "dense"]


def _embedder(v: str) -> str:
    from slmkit.rag.embed import check_embedder_name

    return check_embedder_name(v)


class IndexConfig(StepConfig):
    """Options of ``slm rag index``."""

    docs: list[str] = Field(description="Files, folders or globs to index: text, Markdown, "
                            "HTML, reStructuredText, Python, PDF.",
                            json_schema_extra=cli(argument=True))
    out: str = Field(description="The index directory (updated in place when it exists: only "
                     "added, edited and deleted files are processed).",
                     json_schema_extra=cli(short="-o"))
    overwrite: bool = Field(default=False, description="Rebuild the index from scratch (also "
                            "replaces a directory that is not an index).")
    chunk_chars: int = Field(default=1000, ge=100, le=20000, description="Chunk size cap in "
                             "characters (chunks follow headings, paragraphs, functions).")
    overlap: int = Field(default=150, ge=0, description="Characters of whole lines or "
                         "paragraphs repeated at the start of the next chunk.")
    embedder: str = Field(default="minilm", description="Embedding model: 'minilm' "
                          "(all-MiniLM-L6-v2, offline) or 'lm:MODEL' (a causal LM's pooled "
                          "hidden states).")
    batch_size: int = Field(default=32, ge=1, le=1024, description="Chunks per embedding "
                            "batch.")
    store: str | None = Field(default=None, description="Keep the chunks and vectors in "
                              "this PostgreSQL server with pgvector instead of the embedded "
                              "SQLite store: postgresql://USER[:PASSWORD]@HOST:PORT/DB (the "
                              "password is never written; later runs read PGPASSWORD or "
                              "~/.pgpass). Every verb that takes INDEX then reads from it.")

    @field_validator("store")
    @classmethod
    def _check_store(cls, v: str | None) -> str | None:
        from slmkit.rag.pgstore import check_url

        return None if v is None else check_url(v)

    @field_validator("embedder")
    @classmethod
    def _check_embedder(cls, v: str) -> str:
        return _embedder(v)

    @field_validator("docs")
    @classmethod
    def _some_docs(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one file or folder to index")
        return v

    @model_validator(mode="after")
    def _overlap_below_cap(self):
        if self.overlap >= self.chunk_chars:
            raise ValueError(f"--overlap {self.overlap} must be smaller than --chunk-chars "
                             f"{self.chunk_chars}")
        return self


class SearchOptions(BaseModel):
    """How chunks are retrieved: BM25, dense vectors, or both fused."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(description="An index made by `slm rag index`.",
                       json_schema_extra=cli(argument=True))
    k: int = Field(default=5, ge=1, le=100, description="Chunks to return.",
                   json_schema_extra=cli(short="-k"))
    mode: Mode = Field(default="hybrid", description="hybrid (BM25 + dense, fused), bm25 or "
                       "dense.")
    fusion: Literal["convex", "rrf"] = Field(default="convex", description="How hybrid fuses "
                                             "the two lists: convex (--alpha x normalised BM25 "
                                             "+ the rest x normalised cosine) or rrf "
                                             "(reciprocal rank, --rrf-k).")
    alpha: float = Field(default=0.8, ge=0, le=1, description="Convex fusion's weight on BM25 "
                         "(0.8 was best on the built-in set, held out; lower it for questions "
                         "that paraphrase the documents).")
    candidates: int = Field(default=50, ge=1, le=1000, description="Candidates each "
                            "retriever passes to the fusion.")
    rrf_k: int = Field(default=60, ge=1, description="Reciprocal rank fusion constant "
                       "(Cormack et al. 2009), for --fusion rrf.")
    threads: int | None = Field(default=None, ge=1, description="CPU threads (default: "
                                "torch's, one per physical core).")


def _check_fusion(cfg) -> None:
    """Refuse the other fusion's option and fusion options without hybrid retrieval."""
    modes = getattr(cfg, "modes", None) or [cfg.mode]
    if "hybrid" not in modes:
        refuse_unused(cfg, {"fusion", "alpha", "rrf_k", "candidates"},
                      "bm25 or dense retrieval (they set how hybrid fuses)")
    elif cfg.fusion == "rrf":
        refuse_unused(cfg, {"alpha"}, "--fusion rrf (it weighs ranks, not scores)")
    else:
        refuse_unused(cfg, {"rrf_k"}, "--fusion convex (add --fusion rrf)")


class QueryConfig(SearchOptions):
    """Options of ``slm rag query``."""

    query: str = Field(description="What to search for.", json_schema_extra=cli(argument=True))

    @model_validator(mode="after")
    def _fusion_options(self):
        _check_fusion(self)
        return self


class AnswerOptions(BaseModel):
    """How the model answers from the retrieved chunks."""

    model: str = Field(default=DEFAULT_MODEL, description="The answering model (dir, hub id, "
                       ".gguf or builtin name).", json_schema_extra=cli(short="-m"))
    context_chunks: int = Field(default=1, ge=1, le=20, description="Retrieved chunks put "
                                "in the prompt as numbered sources (the built-in 135M model "
                                "answers best from one; larger models use more).")
    max_tokens: int = Field(default=64, ge=1, le=2048, description="Answer tokens at most.",
                            json_schema_extra=cli(short="-n"))
    min_score: float = Field(default=0.5, ge=-1, le=1, description="Abstain (\"I don't "
                             "know\") when the best source's cosine similarity to the question "
                             "is below this (dense score of the embedding model).")
    dtype: Literal["fp32", "bf16"] = Field(default="fp32", description="fp32 or bf16.")


class AskConfig(AnswerOptions, SearchOptions):
    """Options of ``slm rag ask``."""

    question: str = Field(description="The question.", json_schema_extra=cli(argument=True))
    k: int = Field(default=3, ge=1, le=100, description="Chunks to retrieve (the first "
                   "--context-chunks go in the prompt).", json_schema_extra=cli(short="-k"))

    @model_validator(mode="after")
    def _fusion_options(self):
        _check_fusion(self)
        return self


class EvalConfig(AnswerOptions, SearchOptions):
    """Options of ``slm rag eval``."""

    index: str | None = Field(default=None, description="Index to evaluate (omit for the "
                              "built-in stdlib set, indexed into the cache).",
                              json_schema_extra=cli(argument=True))
    questions: str | None = Field(default=None, description="JSONL of questions: question, "
                                  "answer (null: not in the documents), sources "
                                  "(['path' or 'path:START-END', ...]).")
    limit: int | None = Field(default=None, ge=1, description="Evaluate at most this many "
                              "questions (the first ones).")
    answers: bool = Field(default=True, description="Also answer with the model, with and "
                          "without retrieval (slow: one generation per question each).")
    k: int = Field(default=10, ge=1, le=100, description="Chunks retrieved per question "
                   "(recall@5 and nDCG@10 need 10).", json_schema_extra=cli(short="-k"))
    modes: list[Mode] = Field(default_factory=lambda: ["bm25", "dense", "hybrid"],
                              description="Retrieval modes to compare (repeatable).")
    out: str | None = Field(default=None, description="Write results.json and answers.jsonl "
                            "into this directory.", json_schema_extra=cli(short="-o"))
    overwrite: bool = Field(default=False, description="Replace --out if it exists.")

    @model_validator(mode="after")
    def _questions_need_index(self):
        _check_fusion(self)
        if self.index and not self.questions:
            raise ValueError("an INDEX needs --questions FILE (the built-in set runs on its "
                             "own index; omit INDEX to use it)")
        if self.questions and not self.index:
            raise ValueError("--questions needs the INDEX they are about")
        if not self.answers:
            refuse_unused(self, set(AnswerOptions.model_fields) | {"mode"},
                          "--no-answers (they set how the model answers)")
        return self


class RagServeOptions(BaseModel):
    """The RAG block of ``slm serve`` (``ServeConfig`` inherits it): chat completions answered
    from an index, with their sources (:mod:`slmkit.serve.rag`). Defaults are those of
    ``slm rag ask``; a request may pick its own with ``"rag": {...}``."""

    rag: str | None = Field(None, description="Ground every chat completion in this index "
                            "(from `slm rag index`): the last user message is answered from "
                            "retrieved chunks, and the response carries the sources "
                            "(message.annotations and the slm_rag field).")
    rag_mode: Mode = Field(SearchOptions.model_fields["mode"].default,
                           description="Retrieval for --rag: hybrid, bm25 or dense.")
    rag_k: int = Field(AskConfig.model_fields["k"].default, ge=1, le=100,
                       description="Chunks retrieved per request for --rag (listed in slm_rag; "
                       "the first --rag-context-chunks go in the prompt).")
    rag_context_chunks: int = Field(AnswerOptions.model_fields["context_chunks"].default,
                                    ge=1, le=20, description="Retrieved chunks put in the "
                                    "prompt as numbered sources for --rag.")
    rag_min_score: float = Field(AnswerOptions.model_fields["min_score"].default, ge=-1, le=1,
                                 description="--rag abstains (\"I don't know\", no generation) "
                                 "when the best source's cosine to the question is below this.")

    @field_validator("rag")
    @classmethod
    def _is_index(cls, v: str | None) -> str | None:
        from pathlib import Path

        from slmkit.rag.store import is_index

        if v is not None and not is_index(Path(v).expanduser()):
            raise ValueError(f"--rag '{v}' is not a slmkit RAG index; build one with `slm rag "
                             f"index DOCS... --out {v}`")
        return v

    @model_validator(mode="after")
    def _rag_flags_need_rag(self):
        # compared with the defaults, not model_fields_set: ServeCommand passes every field
        given = [f for f in ("rag_mode", "rag_k", "rag_context_chunks", "rag_min_score")
                 if getattr(self, f) != type(self).model_fields[f].default]
        if given and not self.rag:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"{flags} {'needs' if len(given) == 1 else 'need'} --rag INDEX; "
                             "add it or drop them")
        if self.rag and self.rag_context_chunks > self.rag_k:
            raise ValueError(f"--rag-context-chunks {self.rag_context_chunks} is more than "
                             f"--rag-k {self.rag_k} retrieves; raise --rag-k")
        return self


#: ``slm rag VERB``: (config, "module:run function", help). The CLI registers these.
RAG_VERBS = {
    "index": (IndexConfig, "slmkit.rag.index:run_index", "Index documents (text, Markdown, "
              "HTML, reST, Python, PDF) for retrieval; re-run to update what changed."),
    "query": (QueryConfig, "slmkit.rag.api:run_query", "Retrieve the chunks that best match "
              "a query (BM25, dense or hybrid)."),
    "ask": (AskConfig, "slmkit.rag.api:run_ask", "Answer a question from an index with "
            "cited sources, or say it does not know."),
    "eval": (EvalConfig, "slmkit.rag.evaluate:run_eval", "Measure retrieval (recall@5, "
             "nDCG@10, MRR) and answers (with vs without RAG, citations, abstention)."),
}
