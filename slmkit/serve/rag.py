"""``slm serve --rag INDEX``: chat completions answered from local documents, with sources.

:class:`RagChat` sits between the chat route and :class:`GenerationService`. For each chat
request it takes the last user message as the question, retrieves with the index (the same
:func:`slmkit.rag.answerer.ground` as ``slm rag ask``: BM25 + dense by reciprocal rank,
abstention when the best source's cosine is under ``--rag-min-score``), replaces that
message with the numbered sources and the question (``source_block``, the prompt ``slm rag
ask`` uses; the answering system prompt is added when the client sent none), and lets the
engine answer. Earlier turns pass unchanged. A follow-up ("How often?", "and what does it
return?": four words or fewer, or a pronoun that leans on the turn before) is retrieved
with the previous user turn prefixed (:func:`slmkit.rag.answerer.follow_up_query`); the
prompt keeps the user's own words, and ``slm_rag.query`` shows what was searched.

Where the sources come back:

* ``message.content`` keeps the model's ``[n]`` markers; when the model cited nothing the
  source sharing the most words with the answer is appended as `` [n]`` (``attributed``);
* ``message.annotations``: one OpenAI ``url_citation`` per marker in the content
  (``start_index``/``end_index`` of the marker, ``title`` = ``path:lines (heading)``,
  ``url`` = a ``file://`` URL with ``#L12-L30``), so clients that render citations show
  them;
* ``slm_rag`` (an extra top-level field; in a stream, one chunk with ``choices: []`` before
  ``[DONE]``): ``question``, ``query`` (what retrieval searched), ``mode``, ``abstained``
  and ``reason``, ``sources`` (every retrieved chunk: ``n`` for those in the prompt, path,
  lines, heading, scores, text), ``citations`` and ``groundedness`` (share of the answer's
  content words found in the prompt's sources, :func:`slmkit.rag.answerer.groundedness`;
  null when abstained);
* headers ``X-SLM-RAG-Sources`` (chunks in the prompt) and, on abstention,
  ``X-SLM-RAG-Abstained: 1``.

``/v1/embeddings`` also serves the index's embedding model under its own id
(:data:`EMBEDDING_MODEL`, listed in ``/v1/models``; the served LM keeps its id): the same
vectors the chunks were indexed with, so a client can search or cache with them.

An abstention is answered without generating: ``"I don't know: ..."`` with
``finish_reason: "stop"`` and zero completion tokens (streamed as one delta when asked).

A request may send ``"rag": false`` (answer without retrieval), ``true``, or an object with
``mode``, ``k``, ``context_chunks``, ``min_score``. Refused with a 400 rather than
half-honoured: ``tools``/``tool_choice`` or a JSON ``response_format`` with retrieval on (a
tool call or a JSON object carries no ``[n]`` citations; send ``"rag": false``), a
conversation whose last message is not the user's, and ``"rag"`` on ``/v1/completions``
or on a server without ``--rag``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from slmkit.serve import responses as R
from slmkit.serve.protocol import APIError, ChatMessage, ChatRequest

#: Keys a request's ``"rag"`` object may set, and their server-flag names.
REQUEST_KEYS = {"mode": "rag_mode", "k": "rag_k", "context_chunks": "rag_context_chunks",
                "min_score": "rag_min_score"}
MODES = ("hybrid", "bm25", "dense")
#: The model id of the index's embedding model on ``/v1/embeddings`` (MiniLM indexes).
EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def no_index_error() -> APIError:
    return APIError(400, "This server has no document index (start it with --rag INDEX); "
                    "drop 'rag'.", param="rag")


class RagChat:
    """Retrieval in front of the chat route (see the module doc).

    Args:
        service: the server's :class:`~slmkit.serve.service.GenerationService`.
        config: the server's settings (``rag`` and ``rag_*``).

    Raises:
        DataError: ``config.rag`` is not an index.
    """

    def __init__(self, service, config):
        from slmkit.rag.retrieve import Retriever

        self.service, self.config = service, config
        self.retriever = Retriever.open(config.rag)
        self.files, self.chunks = self.retriever.store.count()
        self.retriever.embed_query("warm up")       # load the embedding model now
        self._lock = threading.Lock()               # one SQLite connection, one embedder
        self.requests = {"grounded": 0, "abstained": 0, "off": 0}
        self.groundedness_sum, self.groundedness_n = 0.0, 0

    def close(self) -> None:
        with self._lock:
            self.retriever.close()

    # ------------------------------------------------------------------ /v1/embeddings

    @property
    def embedding_model(self) -> str | None:
        """The embedding model's id on ``/v1/embeddings`` (None for an ``lm:`` index)."""
        return EMBEDDING_MODEL if self.retriever.embedder_name == "minilm" else None

    async def embeddings(self, req) -> dict:
        """``/v1/embeddings`` with the index's embedder (strings only; 400 naming the
        input otherwise)."""
        from slmkit.serve.embeddings import MAX_INPUTS, embedding_list

        def bad(param: str, what: str) -> APIError:
            return APIError(400, f"Invalid '{param}': {what}.", param=param)

        embedder = self.retriever.embedder
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise bad("input", "send a string or a non-empty list of strings")
        if len(texts) > MAX_INPUTS:
            raise bad("input", f"{len(texts)} inputs are over the limit of {MAX_INPUTS}; "
                      "split the request")
        for i, t in enumerate(texts):
            param = "input" if isinstance(req.input, str) else f"input.{i}"
            if not isinstance(t, str):
                raise bad(param, f"{EMBEDDING_MODEL} takes text, not token ids (ids are the "
                          "chat model's vocabulary)")
            if not t.strip():
                raise bad(param, "the text is empty")
        if req.dimensions is not None and req.dimensions != embedder.dim:
            raise bad("dimensions", f"{EMBEDDING_MODEL} gives {embedder.dim} dimensions and "
                      f"cannot be shortened; leave it out or send {embedder.dim}")

        def run():
            with self._lock:
                vectors = embedder.encode(texts)
                tokens = sum(len(ids) for ids in embedder.tokenizer(
                    texts, truncation=True, max_length=embedder.max_tokens)["input_ids"])
            return vectors, tokens
        vectors, tokens = await asyncio.to_thread(run)
        return embedding_list(vectors, tokens, EMBEDDING_MODEL,
                              req.encoding_format == "base64")

    # ------------------------------------------------------------------ the request

    def options(self, body: dict) -> dict | None:
        """The request's retrieval settings, or None for ``"rag": false`` (400 when bad)."""
        cfg = self.config
        opts = {key: getattr(cfg, flag) for key, flag in REQUEST_KEYS.items()}
        given = body.get("rag", True)
        if given is False:
            return None
        if given is True:
            return opts
        if not isinstance(given, dict) or set(given) - set(REQUEST_KEYS):
            raise APIError(400, "Invalid 'rag': send true, false or an object with "
                           f"{', '.join(REQUEST_KEYS)}.", param="rag")
        opts.update(given)

        def bad(key: str, what: str) -> APIError:
            return APIError(400, f"Invalid 'rag.{key}': {what}.", param=f"rag.{key}")

        if opts["mode"] not in MODES:
            raise bad("mode", f"use one of {', '.join(MODES)}")
        for key, lo, hi in (("k", 1, 100), ("context_chunks", 1, 20)):
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise bad(key, f"send an integer in {lo}..{hi}")
        v = opts["min_score"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1 <= v <= 1:
            raise bad("min_score", "send a number in [-1, 1]")
        if opts["context_chunks"] > opts["k"]:
            raise bad("context_chunks", f"{opts['context_chunks']} is more than the "
                      f"{opts['k']} chunks retrieved ('k')")
        return opts

    @staticmethod
    def check(req: ChatRequest, plan) -> str:
        """The question (the last user message); 400 for what retrieval cannot honour."""
        if req.tools or req.tool_choice not in (None, "none"):
            raise APIError(400, "A tool call carries no citations, so 'tools' cannot be "
                           "answered from the documents; send \"rag\": false with them.",
                           param="tools")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, "A JSON answer carries no [n] citations, so 'response_format' "
                           f"{req.response_format.type} cannot be answered from the "
                           "documents; send \"rag\": false with it.", param="response_format")
        if not req.messages or req.messages[-1].role != "user":
            raise APIError(400, "Retrieval answers the last user message, and this "
                           "conversation does not end with one; end it with the user's "
                           "question or send \"rag\": false.", param="messages")
        question = req.messages[-1].text().strip()
        if not question:
            raise APIError(400, "The last user message is empty; send a question.",
                           param="messages")
        return question

    def _ground(self, question: str, opts: dict, query: str | None = None):
        from slmkit.rag.answerer import ground

        search = {"k": opts["k"], "mode": opts["mode"]}
        with self._lock:
            return ground(self.retriever, question, search, opts["context_chunks"],
                          opts["min_score"], query=query)

    def grounded_request(self, req: ChatRequest, g) -> ChatRequest:
        """``req`` with its last message replaced by the sources and the question."""
        from slmkit.rag.answerer import SYSTEM, source_block

        messages = list(req.messages)
        messages[-1] = ChatMessage(role="user", content=source_block(g.sources, g.question))
        if not any(m.role in ("system", "developer") for m in messages):
            messages.insert(0, ChatMessage(role="system", content=SYSTEM))
        return req.model_copy(update={"messages": messages})

    async def handle(self, request: Request, req: ChatRequest, body: dict, plan,
                     params) -> Response:
        """Answer one validated chat request from the documents (or without, on
        ``"rag": false``)."""
        service = self.service
        opts = self.options(body)
        record = request.scope.setdefault("slmkit", {})
        if opts is None:
            self.requests["off"] += 1
            record["rag"] = "off"
            ids = service.encode_chat(req, plan)
            return await service.run(request, req, ids, params, plan)
        from slmkit.rag.answerer import follow_up_query

        question = self.check(req, plan)
        query = follow_up_query([m.text() for m in req.messages if m.role == "user"])
        g = await asyncio.to_thread(self._ground, question, opts, query)
        info = {"question": question, "query": query, "mode": opts["mode"],
                "abstained": g.abstain,
                "reason": g.reason, "best_score": round(g.best, 4),
                "retrieve_ms": round(g.retrieve_s * 1000, 1),
                "sources": [self._source(h, i) for i, h in enumerate(g.hits, 1)],
                "citations": [], "groundedness": None}
        record.update(rag_sources=len(g.sources), rag_abstained=g.abstain,
                      rag_retrieve_ms=info["retrieve_ms"])
        if g.abstain:
            self.requests["abstained"] += 1
            return self._abstained(req, info, len(g.sources))
        grounded = self.grounded_request(req, g)
        try:
            ids = service.encode_chat(grounded, plan)
        except APIError as e:
            if e.code != "context_length_exceeded":
                raise
            raise APIError(400, f"{e.message[:-1]} (the question with its "
                           f"{len(g.sources)} retrieved source(s)); ask for fewer with "
                           "\"rag\": {\"context_chunks\": 1} or start the server with a longer "
                           "--max-seq-len.", param="messages",
                           code="context_length_exceeded") from None
        self.requests["grounded"] += 1
        response = await service.run(request, req, ids, params, plan)
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._tag_stream(response.body_iterator, req, g, info)
        elif isinstance(response, JSONResponse) and response.status_code == 200:
            out = json.loads(response.body)
            message = out["choices"][0]["message"]
            message["content"], citations = self._finish(message["content"] or "", g, info)
            message["annotations"] = self.annotations(message["content"], citations, g)
            out["slm_rag"] = info
            response = JSONResponse(out)
        response.headers["X-SLM-RAG-Sources"] = str(len(g.sources))
        return response

    # ------------------------------------------------------------------ the answer

    def _source(self, hit, n: int) -> dict:
        d = hit.to_dict()
        d["n"] = n
        d["url"] = self.url(hit)
        return d

    @staticmethod
    def url(hit) -> str:
        c = hit.chunk
        url = Path(hit.path).resolve().as_uri()
        if c.page:
            return f"{url}#page={c.page}"
        return f"{url}#L{c.start_line}" + (f"-L{c.end_line}" if c.end_line > c.start_line
                                           else "")

    def _finish(self, text: str, g, info: dict) -> tuple[str, list]:
        """The answer with its citations (one attributed when the model cited none), and
        the abstention / citations / groundedness fields of ``info`` filled in."""
        from slmkit.rag.answerer import cite, groundedness, says_dont_know

        if says_dont_know(text):
            info.update(abstained=True, reason="the model found no answer in the sources")
            return text, []
        text, citations = cite(text, g.sources)
        info["citations"] = [c.to_dict() for c in citations]
        info["groundedness"] = groundedness(text, [h.chunk.text for h in g.sources])
        if info["groundedness"] is not None:
            self.groundedness_sum += info["groundedness"]
            self.groundedness_n += 1
        return text, citations

    def annotations(self, text: str, citations: list, g) -> list[dict]:
        """OpenAI ``url_citation`` annotations, one per ``[n]`` marker of a cited source."""
        from slmkit.rag.answerer import _MARK

        cited = {c.n for c in citations}
        out = []
        for m in _MARK.finditer(text):
            n = int(m.group(1))
            if n in cited:
                h = g.sources[n - 1]
                out.append({"type": "url_citation", "url_citation": {
                    "start_index": m.start(), "end_index": m.end(), "title": h.location,
                    "url": self.url(h)}})
        return out

    def _abstained(self, req: ChatRequest, info: dict, n_sources: int) -> Response:
        from slmkit.rag.answerer import DONT_KNOW

        rid, created = f"chatcmpl-rag-{time.monotonic_ns():x}", R.now()
        use = R.usage(0, 0)
        headers = {"X-SLM-RAG-Sources": str(n_sources), "X-SLM-RAG-Abstained": "1"}
        if not req.stream:
            body = R.chat_response(rid, created, req.model, DONT_KNOW, "stop", None, use)
            body["choices"][0]["message"]["annotations"] = []
            body["slm_rag"] = info
            return JSONResponse(body, headers=headers)
        with_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def frames():
            yield R.sse(R.chat_chunk(rid, created, req.model, {"role": "assistant",
                                                               "content": ""},
                                     with_usage=with_usage))
            yield R.sse(R.chat_chunk(rid, created, req.model, {"content": DONT_KNOW},
                                     with_usage=with_usage))
            yield R.sse(R.chat_chunk(rid, created, req.model, {}, "stop",
                                     with_usage=with_usage))
            if with_usage:
                yield R.sse(R.usage_chunk(rid, created, req.model, "chat.completion.chunk",
                                          use))
            yield R.sse(self._rag_chunk(rid, created, req.model, info))
            yield R.sse("[DONE]")
        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no", **headers})

    @staticmethod
    def _rag_chunk(rid: str, created: int, model: str, info: dict) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "slm_rag": info}

    async def _tag_stream(self, frames, req: ChatRequest, g, info: dict):
        """The service's SSE frames; before the finish chunk, the `` [n]`` of an attributed
        citation as one more delta; before ``[DONE]``, the ``slm_rag`` chunk."""
        done = R.sse("[DONE]")
        rid, created, text = "", R.now(), []
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            async for frame in frames:
                if frame == done:
                    yield R.sse(self._rag_chunk(rid, created, req.model, info))
                    yield frame
                    continue
                chunk = _parse(frame)
                choice = (chunk.get("choices") or [{}])[0] if chunk else {}
                if chunk and "id" in chunk:
                    rid, created = chunk["id"], chunk.get("created", created)
                if choice.get("finish_reason") is not None:
                    answer = "".join(text)
                    full, citations = self._finish(answer, g, info)
                    extra = full[len(answer):]
                    if extra:
                        yield R.sse(R.chat_chunk(rid, created, req.model, {"content": extra},
                                                 with_usage=with_usage))
                    annotations = self.annotations(full, citations, g)
                    if annotations:
                        yield R.sse(R.chat_chunk(rid, created, req.model,
                                                 {"annotations": annotations},
                                                 with_usage=with_usage))
                elif (choice.get("delta") or {}).get("content"):
                    text.append(choice["delta"]["content"])
                yield frame
        finally:
            await frames.aclose()  # the service's own clean-up (a client that left)

    # ------------------------------------------------------------------ metrics

    def metrics_text(self) -> str:
        """Prometheus lines of the RAG counters (appended to ``/metrics``)."""
        from slmkit.serve.metrics import _labels

        p = "slm_rag_"
        out = [f"# HELP {p}requests_total Chat requests by retrieval outcome (grounded, "
               "abstained without generating, off by request).",
               f"# TYPE {p}requests_total counter"]
        out += [f"{p}requests_total{_labels(outcome=k)} {v}" for k, v in self.requests.items()]
        out += [f"# HELP {p}groundedness_sum Sum of the answers' groundedness (share of "
                "content words found in the sources).", f"# TYPE {p}groundedness_sum counter",
                f"{p}groundedness_sum {self.groundedness_sum:.6g}",
                f"# HELP {p}groundedness_count Answers with a groundedness figure.",
                f"# TYPE {p}groundedness_count counter",
                f"{p}groundedness_count {self.groundedness_n}"]
        return "\n".join(out) + "\n"


def _parse(frame: bytes) -> dict[str, Any] | None:
    if not frame.startswith(b"data: {"):
        return None
    try:
        return json.loads(frame[6:])
    except ValueError:
        return None
