"""Retrieval and answer metrics (pure functions, unit-tested on hand-made cases).

* ``recall@k``: 1 when a relevant chunk is among the first ``k``, else 0 (one gold passage
  per question, so this is the hit rate).
* ``nDCG@k`` (Järvelin & Kekäläinen 2002) with binary relevance:
  ``sum rel_i / log2(i + 1)`` over ranks ``i = 1..k``, divided by the same sum for the
  ideal ranking of ``min(k, n_relevant)`` relevant chunks.
* ``MRR``: ``1 / rank`` of the first relevant chunk (0 when none is retrieved).
* Exact match: the normalised answer equals the normalised gold (SQuAD's normalisation:
  lower case, punctuation but ``_`` and articles dropped, spaces collapsed); ``contains``: the gold
  appears in the answer as a whole word sequence.
* ROUGE-L F1 (Lin 2004): the longest common subsequence of the two token lists.
"""

from __future__ import annotations

import math
import re
import string


def recall_at(relevant: list[bool], k: int) -> float:
    return 1.0 if any(relevant[:k]) else 0.0


def ndcg_at(relevant: list[bool], k: int, n_relevant: int) -> float:
    if n_relevant <= 0:
        return 0.0
    dcg = sum(1.0 / math.log2(i + 2) for i, r in enumerate(relevant[:k]) if r)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, n_relevant)))
    return dcg / ideal


def reciprocal_rank(relevant: list[bool]) -> float:
    for i, r in enumerate(relevant):
        if r:
            return 1.0 / (i + 1)
    return 0.0


#: Punctuation dropped by the normalisation; ``_`` stays (it is part of identifiers, so
#: ``standard_b64encode`` does not contain ``b64encode``).
_PUNCT = re.compile(f"[{re.escape(string.punctuation.replace('_', ''))}]")


def normalize(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(answer: str, gold: str) -> float:
    return float(normalize(answer) == normalize(gold))


def contains(answer: str, gold: str) -> float:
    g = normalize(gold)
    return float(bool(g) and f" {g} " in f" {normalize(answer)} ")


def rouge_l(answer: str, gold: str) -> float:
    a, g = normalize(answer).split(), normalize(gold).split()
    if not a or not g:
        return 0.0
    prev = [0] * (len(g) + 1)
    for x in a:                                   # LCS by dynamic programming, O(|a||g|)
        cur = [0]
        for j, y in enumerate(g):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(g)
    return 2 * p * r / (p + r)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
