"""Pure functions behind evaluation: window planning, log-likelihoods, text metrics, Pareto.

Nothing here holds state or touches files; everything is unit-tested against a slow
reference in ``tests/test_eval_ops.py``.

References:
    * Rolling log-likelihood (each token scored once, with the most context the window
      allows): Gao et al., "A framework for few-shot language model evaluation"
      (lm-evaluation-harness, 2021), ``get_rolling_token_windows``.
    * Bits per byte: Gao et al., "The Pile" (2020), section 4.
    * Token F1 / exact match: Rajpurkar et al., "SQuAD" (2016), official evaluation script.
    * ROUGE-L: Lin, "ROUGE: A Package for Automatic Evaluation of Summaries" (2004).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

LN2 = math.log(2.0)


def rolling_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Plan the sliding windows that score every token of a sequence exactly once.

    The sequence is ``x[0..n)``; ``x[0]`` is a prefix token (the document separator) that
    is context only, so the targets are positions ``1..n-1``. Target ``p`` is predicted
    from the logits at position ``p - 1``.

    The first window covers ``x[0:min(seq_len, n))`` and scores all of its targets. Each
    following window ends ``stride`` tokens later, starts ``seq_len`` tokens before its
    end, and scores only the targets not scored yet, so each of them sees at least
    ``seq_len - stride`` tokens of context.

    Args:
        n: sequence length including the prefix token.
        seq_len: window length (the model's context, at most).
        stride: new targets per window after the first; ``1 <= stride < seq_len``.

    Returns:
        ``[(begin, end, first_target), ...]``: feed ``x[begin:end]`` and score targets
        ``x[first_target:end]``, i.e. logits rows ``first_target-1-begin .. end-2-begin``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not 1 <= stride < seq_len:
        raise ValueError(f"stride must be in [1, seq_len - 1], got {stride} for {seq_len}")
    if n < 2:
        return []
    end = min(seq_len, n)
    windows = [(0, end, 1)]
    while end < n:
        prev_end = end
        end = min(prev_end + stride, n)
        windows.append((max(0, end - seq_len), end, prev_end))
    return windows


def target_logprobs(logits, targets):
    """Log-probability of each target token under the model's next-token distribution.

    Args:
        logits: ``(..., T, V)`` scores where row ``t`` predicts ``targets[..., t]``.
        targets: ``(..., T)`` token ids.

    Returns:
        ``(..., T)`` float32 log-probabilities (computed in float32 for stability).
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., T, V)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (..., T)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood in nats -> bits per UTF-8 byte of the scored text."""
    return nll_nats / LN2 / n_bytes if n_bytes else float("nan")


def normalize_text(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD's normaliser)."""
    text = text.lower()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the stripped strings are identical, else 0.0 (code answers are exact)."""
    return float(prediction.strip() == answer.strip())


def token_f1(prediction: str, answer: str) -> float:
    """Harmonic mean of token precision and recall over normalised bag-of-words."""
    pred = normalize_text(prediction).split()
    gold = normalize_text(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programme, O(len(a)·len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, answer: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (Lin 2004, with beta = 1; no stop-word removal)."""
    pred = re.findall(r"\w+", prediction.lower())
    gold = re.findall(r"\w+", answer.lower())
    if not pred or not gold:
        return float(pred == gold)
    lcs = lcs_length(pred, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which points are Pareto-optimal when BOTH coordinates are to be minimised.

    A point is dominated when another point is no worse in both coordinates and strictly
    better in at least one. Negate a coordinate to maximise it instead.

    Returns:
        One flag per point, True for the non-dominated ones.
    """
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox <= x and oy <= y) and (ox < x or oy < y)
            for j, (ox, oy) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags
