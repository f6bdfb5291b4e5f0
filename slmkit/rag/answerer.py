"""Answering from retrieved chunks, with citations, or saying "I don't know".

:class:`Answerer` retrieves the best chunks for a question, puts the first
``context_chunks`` of them into the chat prompt as numbered sources, and lets the model
answer through slmkit's engine (:class:`~slmkit.engine.chat.ChatSession`, greedy).

* **Abstention.** When the best source's cosine similarity to the question (the embedding
  model's, computed for every source) is below ``min_score``, no source is likely to hold
  the answer and the model is not asked: the reply is "I don't know". A model reply that
  itself says it does not know counts the same. A 135M model cannot be trusted to notice a
  missing answer on its own; the retrieval score can (bench/rag.py measures both sides:
  abstentions on out-of-corpus questions and on answerable ones).
* **Citations.** Markers ``[n]`` in the reply that name a source in the prompt are kept.
  When the reply cites nothing, the source that shares the most words with the reply is
  cited and the citation is marked ``attributed`` (the model did not write it). Each
  citation maps ``[n]`` to the file, line range and heading (or PDF page) of its chunk.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from slmkit.rag.retrieve import Hit, Retriever
from slmkit.rag.store import bm25_tokens

#: The prompt's wording was chosen on the built-in model: asked to say "I don't know" when
#: the sources lack the answer, SmolLM2-135M also said it for answers it had (abstention is
#: decided by the retrieval score instead); told to "use only the numbered sources", it
#: answered a one-line source with an unrelated word.
SYSTEM = "You are a helpful assistant that answers from the given documents."
SYSTEM_NO_SOURCES = "Answer the question briefly."
DONT_KNOW = "I don't know: the indexed documents do not contain the answer."
_ABSTAIN = re.compile(r"\b(i don'?t know|i do not know|cannot answer|can'?t answer|"
                      r"do(es)? not (contain|mention|provide|say)|no information)\b", re.I)
_MARK = re.compile(r"\[(\d{1,2})\]")


@dataclass
class Citation:
    """``[n]`` -> where its chunk is."""

    n: int
    location: str
    path: str
    start_line: int
    end_line: int
    heading: str
    page: int
    attributed: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Answer:
    """A reply with its sources.

    Attributes:
        text: the reply (with ``[n]`` markers).
        citations: the sources the reply cites.
        abstained: the reply says the documents do not hold the answer.
        reason: why it abstained (``"best source 0.31 < min-score 0.5"``, ``"model"``).
        sources: every chunk given to the model, in prompt order (``[1]`` first).
        hits: everything retrieved.
        timings: ``retrieve_s``, ``generate_s``; ``tokens``: generated tokens.
        groundedness: share of the reply's content words found in the sources
            (:func:`groundedness`; None when abstained).
    """

    question: str
    text: str
    citations: list[Citation] = field(default_factory=list)
    abstained: bool = False
    reason: str = ""
    sources: list[Hit] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    tokens: int = 0
    groundedness: float | None = None

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "abstained": self.abstained,
                "reason": self.reason, "citations": [c.to_dict() for c in self.citations],
                "sources": [h.to_dict() for h in self.sources],
                "timings": {k: round(v, 4) for k, v in self.timings.items()},
                "completion_tokens": self.tokens, "groundedness": self.groundedness}


def says_dont_know(text: str) -> bool:
    return bool(_ABSTAIN.search(text)) or not text.strip()


def source_block(sources: list[Hit], question: str) -> str:
    """The user message: the numbered documents, then the question."""
    parts = [f"Document [{i}] ({h.location}):\n{h.chunk.text.strip()}"
             for i, h in enumerate(sources, 1)]
    cite_as = "[1]" if len(sources) == 1 else "the document you use, like [1]"
    return "\n\n".join(parts) + f"\n\nQuestion: {question}\nAnswer in one sentence, " \
        f"citing {cite_as}."


def cite(text: str, sources: list[Hit]) -> tuple[str, list[Citation]]:
    """The reply's valid ``[n]`` markers as citations, or one attributed by word overlap."""
    def citation(n: int, attributed: bool = False) -> Citation:
        h = sources[n - 1]
        c = h.chunk
        return Citation(n, h.location, h.display, c.start_line, c.end_line, c.heading,
                        c.page, attributed)

    seen = []
    for m in _MARK.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= len(sources) and n not in seen:
            seen.append(n)
    if seen:
        return text, [citation(n) for n in seen]
    words = set(bm25_tokens(text))
    if not words or not sources:
        return text, []
    overlap = [len(words & set(bm25_tokens(h.chunk.text))) for h in sources]
    best = max(range(len(sources)), key=lambda i: overlap[i])
    if overlap[best] == 0:
        return text, []
    return text.rstrip() + f" [{best + 1}]", [citation(best + 1, attributed=True)]


@dataclass
class Grounding:
    """What retrieval gives one question: the chunks, the ones for the prompt, and whether
    to abstain (the best prompt source's cosine under ``min_score``)."""

    question: str
    hits: list[Hit]
    sources: list[Hit]
    best: float
    min_score: float
    retrieve_s: float

    @property
    def abstain(self) -> bool:
        return self.best < self.min_score

    @property
    def reason(self) -> str:
        return f"best source {self.best:.2f} < min-score {self.min_score:g}" \
            if self.abstain else ""


#: Words that make a user turn lean on the one before it ("and the other one?", "why is
#: that?", "what does it return?"): pronouns and demonstratives that name nothing alone.
_LEANING = frozenset("it its it's itself they them their theirs themselves this that these "
                     "those he him his she her hers one ones other others another same "
                     "former latter there then".split())
#: A turn of at most this many words is a follow-up whatever its words ("How often?").
_SHORT = 4


def follow_up_query(user_turns: list[str]) -> str:
    """What to retrieve with in a conversation: the last user turn, preceded by the user
    turn before it when the last is short (:data:`_SHORT` words or fewer) or leans on it
    (a pronoun or demonstrative of :data:`_LEANING`). Only user turns count: the model's
    replies are its own words, not what the user asked about."""
    turns = [t.strip() for t in user_turns if t and t.strip()]
    if not turns:
        return ""
    last = turns[-1]
    words = re.findall(r"[a-z']+", last.lower())
    if len(turns) > 1 and (len(words) <= _SHORT or _LEANING.intersection(words)):
        return f"{turns[-2]} {last}"
    return last


def ground(retriever: Retriever, question: str, search: dict, context_chunks: int,
           min_score: float, hits: list[Hit] | None = None,
           query: str | None = None) -> Grounding:
    """Retrieve for ``question`` (``search``: :meth:`Retriever.search` keywords) and decide
    whether the sources can answer it; ``slm rag ask`` and ``slm serve --rag`` share this.
    ``query``, when given, is what retrieval and the abstention score use instead of the
    question (a follow-up with the turn it leans on, :func:`follow_up_query`)."""
    t0 = time.perf_counter()
    query = query or question
    qvec = retriever.embed_query(query)
    if hits is None:
        hits = retriever.search(query, query_vector=qvec, **search)
    sources = hits[:context_chunks]
    for h in sources:
        if h.dense is None:
            h.dense = retriever.dense_score(h, qvec)
    best = max((h.dense for h in sources), default=-1.0)
    return Grounding(question, hits, sources, best, min_score, time.perf_counter() - t0)


def groundedness(answer: str, source_texts: list[str]) -> float | None:
    """The share of the answer's content words (BM25's tokens: stop words out, stemmed,
    identifiers also split into parts; ``[n]`` markers dropped) that occur in the sources:
    1.0 when every word the answer uses is in the retrieved text, None for an answer
    without content words. A lexical signal, cheap enough for every answer (RAGAS'
    faithfulness asks an LLM judge per claim instead)."""
    from slmkit.rag.store import _stemmer

    stemmer = _stemmer()
    words = set(bm25_tokens(_MARK.sub(" ", answer), stemmer))
    if not words:
        return None
    seen: set[str] = set()
    for text in source_texts:
        seen.update(bm25_tokens(text, stemmer))
    return len(words & seen) / len(words)


class Answerer:
    """Retrieval plus an answering model, kept open for many questions.

    Args:
        retriever: an open :class:`~slmkit.rag.retrieve.Retriever`.
        model: a model reference (loaded with :func:`slmkit.load_model`), or a
            ``(model, tokenizer)`` pair already loaded.
        context_chunks, max_tokens, min_score, dtype: see
            :class:`~slmkit.rag.config.AnswerOptions`.
        search: keyword arguments of :meth:`Retriever.search` (k, mode, candidates,
            fusion, alpha, rrf_k).
    """

    def __init__(self, retriever: Retriever, model, context_chunks: int = 1,
                 max_tokens: int = 64, min_score: float = 0.5, dtype: str = "fp32",
                 search: dict | None = None):
        from slmkit.engine.chat import ChatSession
        from slmkit.engine.sampling import SamplingParams
        from slmkit.models import load_model

        self.retriever = retriever
        lm, tok = load_model(model, dtype=dtype) if isinstance(model, str) else model
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n\n"])
        self.session = ChatSession(lm, tok, params, system=SYSTEM)
        self.bare = ChatSession(lm, tok, params, system=SYSTEM_NO_SOURCES)
        self.context_chunks, self.min_score = context_chunks, min_score
        self.search = {"k": max(context_chunks, 3), **(search or {})}
        self.search["k"] = max(self.search["k"], context_chunks)

    def _reply(self, session, message: str) -> tuple[str, int]:
        session.reset()
        text = "".join(session.send(message)).strip()
        return text, session.last.completion_tokens if session.last else 0

    def ask(self, question: str, hits: list[Hit] | None = None) -> Answer:
        """Answer ``question`` from the index (``hits``: a retrieval already made)."""
        g = ground(self.retriever, question, self.search, self.context_chunks, self.min_score,
                   hits)
        answer = Answer(question, DONT_KNOW, sources=g.sources, hits=g.hits)
        if g.abstain:
            answer.abstained, answer.reason = True, g.reason
            answer.timings = {"retrieve_s": g.retrieve_s, "generate_s": 0.0}
            return answer
        t1 = time.perf_counter()
        text, answer.tokens = self._reply(self.session, source_block(g.sources, question))
        answer.timings = {"retrieve_s": g.retrieve_s, "generate_s": time.perf_counter() - t1}
        if says_dont_know(text):
            answer.abstained, answer.reason = True, "the model found no answer in the sources"
            answer.text = text or DONT_KNOW
            return answer
        answer.text, answer.citations = cite(text, g.sources)
        answer.groundedness = groundedness(answer.text, [h.chunk.text for h in g.sources])
        return answer

    def ask_without_retrieval(self, question: str) -> str:
        """The same model's answer with no sources (the baseline RAG must beat)."""
        return self._reply(self.bare, question)[0]

    def close(self) -> None:
        self.session.close()
        self.bare.close()
