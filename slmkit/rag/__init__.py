"""Retrieval-augmented generation over local documents, fully offline.

* :func:`index` (``slm rag index``): parse, chunk by structure, embed and store documents
  in an embedded database; re-running updates only what changed.
* :func:`search` (``slm rag query``): BM25 and dense retrieval fused by reciprocal rank.
* :func:`answer` (``slm rag ask``): the model answers from the retrieved chunks, citing
  them as ``[n]``, or says it does not know.
* ``slm rag eval`` (:mod:`slmkit.rag.evaluate`): retrieval and answer quality.

Imports here stay light; torch, transformers and the database load on first use.
"""

from slmkit.rag.api import answer, index, search

__all__ = ["answer", "index", "search"]
