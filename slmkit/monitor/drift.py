"""Drift between a reference window of requests and a recent one.

Signals, each a two-sample test with a p-value (scipy):

* ``embedding``: prompt embeddings, maximum mean discrepancy with a Gaussian kernel
  (Gretton et al. 2012, "A Kernel Two-Sample Test", JMLR), bandwidth by the median
  heuristic on the reference, p-value from a permutation test (:func:`mmd_test`);
* ``length``: prompt length in characters, Kolmogorov-Smirnov (``scipy.stats.ks_2samp``);
* ``language``: the :func:`slmkit.monitor.text.language` labels, chi-square on the counts
  (``scipy.stats.chi2_contingency``);
* ``confidence``: answers' mean token log-probability, Mann-Whitney U;
* ``flag_rate``: share of flagged answers, Fisher's exact test.

A signal drifts when its p-value is at most ``alpha``. :class:`DriftDetector` is the
streaming form the server and ``bench/monitor.py`` use: a fixed reference, the last
``window`` requests tested every ``every`` requests at ``alpha = 0.001`` (over 25 checks
of an unshifted stream that is at most 2.5% false alarms by Bonferroni's bound).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

#: Per-check significance of the streaming detector and of reports.
ALPHA = 0.001
PERMUTATIONS = 999


def median_bandwidth(x: np.ndarray, max_points: int = 500) -> float:
    """Median pairwise Euclidean distance of (up to ``max_points`` of) the rows of ``x``."""
    from scipy.spatial.distance import pdist

    x = x[:max_points]
    d = pdist(x.astype(np.float64))
    med = float(np.median(d)) if d.size else 1.0
    return med if med > 0 else 1.0


def mmd_test(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None,
             permutations: int = PERMUTATIONS, seed: int = 0) -> tuple[float, float]:
    """``(MMD², p-value)`` of samples ``x [n, d]`` and ``y [m, d]``.

    The statistic is the biased (V-statistic) MMD² with kernel ``exp(-|a-b|² / 2h²)``;
    the p-value is ``(1 + #{permuted >= observed}) / (1 + permutations)`` over random
    relabellings of the pooled sample, all computed as ``s Kᵀ s`` for sign vectors ``s``.
    """
    from scipy.spatial.distance import cdist

    z = np.concatenate([x, y]).astype(np.float64)
    n, m = len(x), len(y)
    h = bandwidth or median_bandwidth(np.asarray(x))
    k = np.exp(-cdist(z, z, "sqeuclidean") / (2 * h * h))                 # [N, N]
    base = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])     # [N]
    observed = float(base @ k @ base)
    rng = np.random.default_rng(seed)
    signs = np.stack([rng.permutation(base) for _ in range(permutations)])  # [P, N]
    null = np.einsum("pi,pi->p", signs @ k, signs)
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + permutations)
    return observed, p


class DriftDetector:
    """Streaming embedding drift against a fixed reference.

    Args:
        reference: ``[n, d]`` prompt embeddings of typical traffic.
        window: recent requests compared with the reference.
        alpha: per-check significance.
    """

    def __init__(self, reference: np.ndarray, window: int = 100, alpha: float = ALPHA,
                 permutations: int = PERMUTATIONS, seed: int = 0):
        self.reference = np.asarray(reference, dtype=np.float64)
        self.bandwidth = median_bandwidth(self.reference)
        self.window, self.alpha = window, alpha
        self.permutations, self.seed = permutations, seed

    def check(self, recent: np.ndarray) -> dict:
        """Test the last ``window`` rows of ``recent``: ``{mmd2, p_value, drift}``."""
        recent = np.asarray(recent, dtype=np.float64)[-self.window:]
        mmd2, p = mmd_test(self.reference, recent, self.bandwidth, self.permutations,
                           self.seed)
        return {"mmd2": mmd2, "p_value": p, "drift": p <= self.alpha, "n": len(recent)}


def _num(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows if r.get(key) is not None], dtype=np.float64)


def compare(reference: list[dict], recent: list[dict], alpha: float = ALPHA,
            permutations: int = PERMUTATIONS) -> dict[str, dict]:
    """Every signal of the module doc for two lists of request-log rows.

    Returns:
        ``{signal: {"p_value", "drift", "reference", "recent", ...}}``; a signal without
        enough data on either side has ``p_value`` None and ``drift`` False.
    """
    from scipy import stats

    out: dict[str, dict] = {}

    def result(name, p, ref_value, recent_value, **extra):
        out[name] = {"p_value": None if p is None else float(p),
                     "drift": p is not None and p <= alpha,
                     "reference": ref_value, "recent": recent_value, **extra}

    ea = [r["embedding"] for r in reference if r.get("embedding") is not None]
    dim = len(ea[0]) if ea else None  # rows of another embedder (another size) are left out
    ea = [e for e in ea if len(e) == dim]
    eb = [r["embedding"] for r in recent if r.get("embedding") is not None
          and len(r["embedding"]) == dim]
    if len(ea) >= 5 and len(eb) >= 5:
        mmd2, p = mmd_test(np.stack(ea), np.stack(eb), permutations=permutations)
        result("embedding", p, len(ea), len(eb), mmd2=mmd2)
    else:
        result("embedding", None, len(ea), len(eb))
    la, lb = _num(reference, "prompt_chars"), _num(recent, "prompt_chars")
    p = stats.ks_2samp(la, lb).pvalue if la.size >= 5 and lb.size >= 5 else None
    result("length", p, float(np.median(la)) if la.size else None,
           float(np.median(lb)) if lb.size else None)
    ca = Counter(r["language"] for r in reference if r.get("language"))
    cb = Counter(r["language"] for r in recent if r.get("language"))
    labels = sorted(set(ca) | set(cb))
    p = None
    if len(labels) > 1 and ca and cb:
        p = stats.chi2_contingency([[ca[k] for k in labels], [cb[k] for k in labels]]).pvalue
    elif ca and cb:
        p = 1.0
    result("language", p, dict(ca), dict(cb))
    ma, mb = _num(reference, "mean_logprob"), _num(recent, "mean_logprob")
    p = stats.mannwhitneyu(ma, mb).pvalue if ma.size >= 5 and mb.size >= 5 else None
    result("confidence", p, float(ma.mean()) if ma.size else None,
           float(mb.mean()) if mb.size else None)
    fa, fb = _num(reference, "flagged"), _num(recent, "flagged")
    p = None
    if fa.size >= 5 and fb.size >= 5:
        table = [[int(fa.sum()), int(fa.size - fa.sum())], [int(fb.sum()), int(fb.size - fb.sum())]]
        p = stats.fisher_exact(table).pvalue
    result("flag_rate", p, float(fa.mean()) if fa.size else None,
           float(fb.mean()) if fb.size else None)
    return out
