"""Per-answer confidence from the engine's token probabilities, and the hallucination flag.

The engine records, per generated token, its log-probability and the entropy of the
distribution it was drawn from (``SamplingParams(confidence=True)`` ->
``Completion.confidence``). :func:`summarize` turns them into the figures every server
answer carries (its ``confidence`` field):

* ``mean_logprob``, ``min_logprob``: the mean and the lowest token log-probability;
* ``mean_entropy``, ``max_entropy`` (nats);
* ``low_confidence_spans``: runs of tokens below ``span_logprob`` (default ``log 0.25``),
  as character ranges of the answer with their text and lowest log-probability;
* ``risk`` in [0, 1] and ``flagged`` (``risk >= threshold``): the hallucination flag.

The risk is a logistic model over these figures (:class:`FlagModel`): the token-level
uncertainty signals of Manakul et al. 2023 ("SelfCheckGPT", the grey-box baselines: mean
and max of ``-log p`` and of entropy) combined instead of read one at a time. Its weights
ship in ``flag_model.json``, fitted by ``bench/monitor.py --fit`` on the built-in model's
chat answers to the train 60% of its questions with known answers (which stdlib module
provides a function; integer arithmetic; label: the answer is wrong) and scored on the
other 40%. On that held-out set it does *not* beat the plain mean log-probability (see the
README's figures): refit it with :meth:`FlagModel.fit` on labelled answers of your own
model and traffic, and serve that with ``slm serve --flag-model``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

#: Tokens below this probability form low-confidence spans.
SPAN_LOGPROB = math.log(0.25)
#: At most this many spans are reported per answer (the lowest first, then by position).
MAX_SPANS = 16
#: The figures the flag model reads, in order.
FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy", "first_logprob",
            "log_tokens")


def features(conf: list[tuple[float, float, int]]) -> dict[str, float]:
    """The flag model's inputs from ``Completion.confidence`` (non-empty)."""
    lps = np.array([c[0] for c in conf], dtype=np.float64)
    ents = np.array([c[1] for c in conf], dtype=np.float64)
    return {"mean_logprob": float(lps.mean()), "min_logprob": float(lps.min()),
            "mean_entropy": float(ents.mean()), "max_entropy": float(ents.max()),
            "first_logprob": float(lps[0]), "log_tokens": math.log(len(lps))}


def low_confidence_spans(conf: list[tuple[float, float, int]], text: str,
                         span_logprob: float = SPAN_LOGPROB) -> list[dict]:
    """Runs of consecutive tokens with log-probability below ``span_logprob``.

    Returns:
        ``[{"start", "end", "text", "min_logprob", "tokens"}]``: ``text[start:end]`` covers
        the run's tokens (a run ends where the next token's text starts).
    """
    spans, run = [], None
    for i, (lp, _, start) in enumerate(conf):
        if lp < span_logprob:
            if run is None:
                run = {"first": i, "start": start, "min_logprob": lp, "tokens": 0}
            run["tokens"] += 1
            run["min_logprob"] = min(run["min_logprob"], lp)
            continue
        if run is not None:
            spans.append({**run, "end": start})
            run = None
    if run is not None:
        spans.append({**run, "end": len(text)})
    if len(spans) > MAX_SPANS:
        spans = sorted(sorted(spans, key=lambda s: s["min_logprob"])[:MAX_SPANS],
                       key=lambda s: s["first"])
    out = []
    for s in spans:
        end = max(s["end"], s["start"])
        out.append({"start": s["start"], "end": end, "text": text[s["start"]:end],
                    "min_logprob": round(s["min_logprob"], 4), "tokens": s["tokens"]})
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, eps: float = 1e-6
                 ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """L2-regularised logistic regression on standardised ``x [n, d]``, labels ``y [n]``
    in {0, 1} (scipy L-BFGS; ``eps`` keeps a constant column's scale positive). Returns
    ``(weights [d], bias, mean [d], scale [d])``: ``p = sigmoid((x - mean) / scale @ w + b)``."""
    from scipy.optimize import minimize
    from scipy.special import log_expit, expit

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mean, scale = x.mean(0), x.std(0) + eps
    xs = (x - mean) / scale
    n = len(y)

    def loss(p):
        z = xs @ p[:-1] + p[-1]
        nll = -(y * log_expit(z) + (1 - y) * log_expit(-z)).sum() / n
        grad_z = (expit(z) - y) / n
        grad = np.concatenate([xs.T @ grad_z + l2 * p[:-1] / n, [grad_z.sum()]])
        return nll + 0.5 * l2 * float(p[:-1] @ p[:-1]) / n, grad

    p = minimize(loss, np.zeros(xs.shape[1] + 1), jac=True, method="L-BFGS-B").x
    return p[:-1], float(p[-1]), mean, scale


@dataclass
class FlagModel:
    """Logistic risk over standardised :data:`FEATURES`; ``flagged = risk >= threshold``.

    Attributes:
        weights, bias: the logistic model over standardised features.
        mean, scale: the standardisation (fitted on the training answers).
        threshold: the operating point (chosen on the training answers).
        source: where the weights came from (model, data, sizes), for the docs and reports.
    """

    weights: list[float]
    bias: float
    mean: list[float]
    scale: list[float]
    threshold: float = 0.5
    source: dict = field(default_factory=dict)

    def risk(self, feats: dict[str, float]) -> float:
        x = (np.array([feats[k] for k in FEATURES]) - self.mean) / self.scale
        z = float(np.dot(self.weights, x) + self.bias)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    @classmethod
    def fit(cls, rows: list[dict[str, float]], wrong: list[bool], l2: float = 1.0,
            source: dict | None = None) -> FlagModel:
        """Fit by L2-regularised maximum likelihood (scipy L-BFGS); the threshold maximises
        F1 of "wrong" on the same rows.

        Args:
            rows: :func:`features` of each answer.
            wrong: True where the answer was wrong (what the flag should catch).
        """
        from scipy.special import expit

        x = np.array([[r[k] for k in FEATURES] for r in rows], dtype=np.float64)
        y = np.asarray(wrong, dtype=np.float64)
        w, b, mean, scale = fit_logistic(x, y, l2, eps=1e-9)
        risk = expit((x - mean) / scale @ w + b)
        best, threshold = -1.0, 0.5
        for t in np.unique(np.round(risk, 4)):
            pred = risk >= t
            tp = float((pred & (y == 1)).sum())
            f1 = 2 * tp / max(1.0, pred.sum() + y.sum())
            if f1 > best:
                best, threshold = f1, float(t)
        return cls(w.tolist(), b, mean.tolist(), scale.tolist(), threshold, source or {})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"features": list(FEATURES), "weights": self.weights,
                                    "bias": self.bias, "mean": self.mean, "scale": self.scale,
                                    "threshold": self.threshold, "source": self.source},
                                   indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path | None = None) -> FlagModel:
        """The shipped model (``flag_model.json``) or one written by :meth:`save`."""
        if path is None:
            text = resources.files("slmkit.monitor").joinpath("flag_model.json").read_text(
                encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        d = json.loads(text)
        if list(d.get("features", [])) != list(FEATURES):
            raise ValueError(f"flag model {path or 'flag_model.json'} was fitted on features "
                             f"{d.get('features')}, not {list(FEATURES)}; refit it.")
        return cls(d["weights"], d["bias"], d["mean"], d["scale"], d["threshold"],
                   d.get("source", {}))


def summarize(conf: list[tuple[float, float, int]] | None, text: str,
              flag: FlagModel | None = None, span_logprob: float = SPAN_LOGPROB) -> dict | None:
    """The ``confidence`` field of an answer (None when no token was generated)."""
    if not conf:
        return None
    feats = features(conf)
    out = {"tokens": len(conf),
           "mean_logprob": round(feats["mean_logprob"], 4),
           "min_logprob": round(feats["min_logprob"], 4),
           "mean_entropy": round(feats["mean_entropy"], 4),
           "max_entropy": round(feats["max_entropy"], 4),
           "low_confidence_spans": low_confidence_spans(conf, text, span_logprob)}
    if flag is not None:
        risk = flag.risk(feats)
        out.update(risk=round(risk, 4), flagged=bool(risk >= flag.threshold))
    return out
