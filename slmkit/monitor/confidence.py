"""Per-answer confidence from the engine's token probabilities, and the hallucination flag.

The engine records, per generated token, its log-probability, the entropy of the
distribution it was drawn from and its margin over the best other token
(``SamplingParams(confidence=True)`` -> ``Completion.confidence``). :func:`summarize` turns
them into the figures every server answer carries (its ``confidence`` field):

* ``mean_logprob``, ``min_logprob``: the mean and the lowest token log-probability;
* ``mean_entropy``, ``max_entropy`` (nats); ``mean_margin``: the mean top-1 / top-2 gap;
* ``answer_mean_logprob``, ``answer_min_margin``: the same over the answer's own tokens
  only (:func:`answer_tokens`: not filler such as "The answer is", not words copied from
  the question);
* ``low_confidence_spans``: runs of tokens below ``span_logprob`` (default ``log 0.25``),
  as character ranges of the answer with their text and lowest log-probability;
* ``risk`` in [0, 1] and ``flagged`` (``risk >= threshold``): the hallucination flag.

The risk is a logistic model over these figures (:class:`FlagModel`; the grey-box signals
of Manakul et al. 2023, "SelfCheckGPT", combined instead of read one at a time). The
shipped weights (``flag_model.json``) are fitted by ``bench/monitor.py --parts flag --fit``
on the built-in model's chat answers to the train 60% of ~700 questions with answers
checked offline (graded arithmetic, capitals, opposites, stdlib modules, the built-in RAG
questions with and without the retrieved source); the feature set is picked by
cross-validation on train and the bench scores the other 40%. :func:`consistency` (agreement
of sampled answers with the greedy one, SelfCheckGPT's own check) is measured there but
costs extra generations and is not part of the served flag. Refit the flag with
:meth:`FlagModel.fit` on labelled answers of your own model and traffic, and serve it with
``slm serve --flag-model``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

#: Tokens below this probability form low-confidence spans.
SPAN_LOGPROB = math.log(0.25)
#: At most this many spans are reported per answer (the lowest first, then by position).
MAX_SPANS = 16
#: Every figure :func:`features` computes (the flag model reads a subset, named in its file).
ALL_FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy", "first_logprob",
                "log_tokens", "mean_margin", "min_margin", "answer_mean_logprob",
                "answer_min_logprob", "answer_mean_margin", "answer_min_margin",
                "answer_tokens")
#: The figures the shipped flag model reads, in order (the default of :class:`FlagModel`).
FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "max_entropy", "first_logprob",
            "log_tokens")
#: Words that never make an answer token: English stop words and the boilerplate of
#: replies ("The answer is ...", "Sure, here ...").
_FILLER = frozenset("""a an and are as at be but by for if in into is it its no not of on or
such that the their then there these they this to was will with i you we he she my your our
answer answers question sure here yes so which what who where when how does do did has have
had can could would should may might called named""".split())
_WORD = re.compile(r"[A-Za-z0-9]+")


def _margins(conf) -> np.ndarray:
    """Each token's margin over the best other token (the record's 4th element); a record
    without it (an older cache) gets its lower bound from the token's own probability,
    ``log p - log(1 - p)``."""
    out = []
    for c in conf:
        if len(c) > 3 and c[3] is not None:
            out.append(c[3])
        else:
            out.append(c[0] - math.log(-math.expm1(min(c[0], -1e-9))))
    return np.array(out, dtype=np.float64)


def answer_tokens(conf, text: str, question: str = "") -> np.ndarray:
    """Which tokens carry the answer: their text has a word that is neither filler
    (:data:`_FILLER`) nor a word of the question (copied from the prompt, as in "The capital
    of France is Paris": only "Paris" counts). Boolean mask over ``conf``."""
    asked = {w.lower() for w in _WORD.findall(question)} | _FILLER
    ends = [c[2] for c in conf[1:]] + [len(text)]
    mask = []
    for c, end in zip(conf, ends):
        words = {w.lower() for w in _WORD.findall(text[c[2]:max(end, c[2])])}
        mask.append(bool(words - asked))
    return np.array(mask, dtype=bool)


def features(conf: list[tuple], text: str = "", question: str = "") -> dict[str, float]:
    """Every figure of :data:`ALL_FEATURES` from ``Completion.confidence`` (non-empty):
    over all tokens, and over the answer's own tokens (:func:`answer_tokens`; all tokens
    when none qualifies, e.g. without ``text``). ``question``: the user's last message."""
    lps = np.array([c[0] for c in conf], dtype=np.float64)
    ents = np.array([c[1] for c in conf], dtype=np.float64)
    margins = _margins(conf)
    mask = answer_tokens(conf, text, question) if text else np.zeros(len(lps), dtype=bool)
    if not mask.any():
        mask[:] = True
    return {"mean_logprob": float(lps.mean()), "min_logprob": float(lps.min()),
            "mean_entropy": float(ents.mean()), "max_entropy": float(ents.max()),
            "first_logprob": float(lps[0]), "log_tokens": math.log(len(lps)),
            "mean_margin": float(margins.mean()), "min_margin": float(margins.min()),
            "answer_mean_logprob": float(lps[mask].mean()),
            "answer_min_logprob": float(lps[mask].min()),
            "answer_mean_margin": float(margins[mask].mean()),
            "answer_min_margin": float(margins[mask].min()),
            "answer_tokens": float(mask.sum())}


def consistency(answer: str, samples: list[str], question: str = "", words: int = 8
                ) -> float:
    """SelfCheckGPT's idea (Manakul et al. 2023) read lexically: the share of the answer's
    first ``words`` own words (not filler, not the question's) that each sampled answer to
    the same prompt also says, averaged over the samples. 1.0 when the answer has no word
    of its own. A model that knows the answer says it again; one that guesses drifts."""
    asked = {w.lower() for w in _WORD.findall(question)} | _FILLER
    own = []
    for w in _WORD.findall(answer):
        if w.lower() not in asked and w.lower() not in own:
            own.append(w.lower())
    own = own[:words]
    if not own or not samples:
        return 1.0
    said = [{w.lower() for w in _WORD.findall(s)} for s in samples]
    return float(np.mean([sum(w in s for w in own) / len(own) for s in said]))


def low_confidence_spans(conf: list[tuple[float, float, int]], text: str,
                         span_logprob: float = SPAN_LOGPROB) -> list[dict]:
    """Runs of consecutive tokens with log-probability below ``span_logprob``.

    Returns:
        ``[{"start", "end", "text", "min_logprob", "tokens"}]``: ``text[start:end]`` covers
        the run's tokens (a run ends where the next token's text starts).
    """
    spans, run = [], None
    for i, (lp, _, start, *_) in enumerate(conf):
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


def _value(feats: dict[str, float], name: str) -> float:
    """A flag input: a feature, or with ``^2`` its square (a quadratic term)."""
    if name.endswith("^2"):
        return feats[name[:-2]] ** 2
    return feats[name]


def model_fingerprint(model) -> str:
    """A short digest of a model's shape and input-embedding values (rounded), so a probe
    fitted on one model's hidden states is applied to that model only (a quantized or
    fine-tuned variant has other hidden states)."""
    import hashlib

    import torch

    cfg = model.config
    emb = model.get_input_embeddings()
    with torch.no_grad():
        rows = emb(torch.arange(min(16, cfg.vocab_size))).float()
    key = f"{cfg.model_type}/{cfg.hidden_size}/{cfg.num_hidden_layers}/{cfg.vocab_size}/"
    digest = hashlib.sha256(key.encode() + np.round(rows.numpy(), 3).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class _Logistic:
    """A fitted logistic risk: ``sigmoid(weights . (x - mean) / scale + bias)``, flagged at
    ``threshold``; ``source`` says where the weights came from."""

    weights: list[float]
    bias: float
    mean: list[float]
    scale: list[float]
    threshold: float = 0.5
    source: dict = field(default_factory=dict)


@dataclass
class HiddenProbe(_Logistic):
    """Logistic risk over a model's mean hidden state after :attr:`after` blocks, over an
    answer's generated tokens (``Completion.hidden_mean``); valid for the model whose
    :func:`model_fingerprint` it holds. ``flagged = risk >= threshold``."""

    after: int = 0
    fingerprint: str = ""

    def risk(self, hidden) -> float:
        return _logistic(self, np.asarray(hidden, dtype=np.float64))

    @classmethod
    def fit(cls, hidden: list, wrong: list[bool], after: int, fingerprint: str,
            l2: float = 100.0, source: dict | None = None) -> HiddenProbe:
        """L2-regularised logistic fit; threshold at Youden's J on the same rows."""
        from scipy.special import expit

        x = np.asarray(hidden, dtype=np.float64)
        y = np.asarray(wrong, dtype=bool)
        w, b, mean, scale = fit_logistic(x, y, l2)
        threshold = youden_threshold(expit((x - mean) / scale @ w + b), y)
        return cls(w.tolist(), float(b), mean.tolist(), scale.tolist(), threshold,
                   source or {}, after=after, fingerprint=fingerprint)

    def to_dict(self) -> dict:
        return {"after": self.after, "fingerprint": self.fingerprint, "weights": self.weights,
                "bias": self.bias, "mean": self.mean, "scale": self.scale,
                "threshold": self.threshold, "source": self.source}


def _logistic(m, x: np.ndarray) -> float:
    """``sigmoid(w . (x - mean) / scale + b)`` of a fitted model ``m`` (a flag or a probe)."""
    z = float(np.dot(m.weights, (x - m.mean) / m.scale) + m.bias)
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def youden_threshold(risk: np.ndarray, y: np.ndarray) -> float:
    """The risk threshold maximising Youden's J (share of wrong answers flagged minus share
    of right ones flagged): it does not drift with the share of wrong answers."""
    best, threshold = -2.0, 0.5
    for t in np.unique(np.round(risk, 4)):
        pred = risk >= t
        j = pred[y].mean() - pred[~y].mean() if y.any() and (~y).any() else 0.0
        if j > best:
            best, threshold = j, float(t)
    return threshold


@dataclass
class FlagModel(_Logistic):
    """Logistic risk over standardised :attr:`features` (names from :func:`features`, or
    such a name with ``^2`` for its square); ``flagged = risk >= threshold``.

    Attributes:
        weights, bias: the logistic model over standardised features.
        mean, scale: the standardisation (fitted on the training answers).
        threshold: the operating point (chosen on the training answers).
        source: where the weights came from (model, data, sizes), for the docs and reports.
        features: the names of the figures it reads, in order.
        probe: for the one model it was fitted on, a :class:`HiddenProbe` that replaces the
            logprob features where an answer's hidden states were tapped.
    """

    features: tuple[str, ...] = FEATURES
    probe: HiddenProbe | None = None

    def probe_for(self, model) -> HiddenProbe | None:
        """The hidden-state probe when it was fitted on ``model``, else None."""
        if self.probe is None or self.probe.after > model.config.num_hidden_layers \
                or model_fingerprint(model) != self.probe.fingerprint:
            return None
        return self.probe

    def risk(self, feats: dict[str, float]) -> float:
        return _logistic(self, np.array([_value(feats, k) for k in self.features]))

    @classmethod
    def fit(cls, rows: list[dict[str, float]], wrong: list[bool], l2: float = 1.0,
            source: dict | None = None, names: tuple[str, ...] = FEATURES) -> FlagModel:
        """Fit by L2-regularised maximum likelihood (scipy L-BFGS); the threshold maximises
        Youden's J (share of wrong answers flagged minus share of right ones flagged) on
        the same rows, so it does not drift with the share of wrong answers.

        Args:
            rows: :func:`features` of each answer.
            wrong: True where the answer was wrong (what the flag should catch).
            names: the features to read.
        """
        from scipy.special import expit

        unknown = [k for k in names if k.removesuffix("^2") not in ALL_FEATURES]
        if unknown:
            raise ValueError(f"unknown flag features {unknown}; use names of {ALL_FEATURES} "
                             "(a name with '^2' reads its square)")
        x = np.array([[_value(r, k) for k in names] for r in rows], dtype=np.float64)
        y = np.asarray(wrong, dtype=bool)
        w, b, mean, scale = fit_logistic(x, y, l2, eps=1e-9)
        threshold = youden_threshold(expit((x - mean) / scale @ w + b), y)
        return cls(w.tolist(), b, mean.tolist(), scale.tolist(), threshold, source or {},
                   tuple(names))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"features": list(self.features), "weights": self.weights,
                                    "bias": self.bias, "mean": self.mean, "scale": self.scale,
                                    "threshold": self.threshold, "source": self.source,
                                    **({"probe": self.probe.to_dict()} if self.probe else {})},
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
        names = tuple(d.get("features") or ())
        unknown = [k for k in names if k.removesuffix("^2") not in ALL_FEATURES]
        if not names or unknown or len(names) != len(d["weights"]):
            raise ValueError(f"flag model {path or 'flag_model.json'} reads features "
                             f"{list(names)}; this slmkit computes {list(ALL_FEATURES)}; "
                             "refit it.")
        probe = d.get("probe")
        if probe is not None:
            try:
                probe = HiddenProbe(**probe)
            except TypeError as e:
                raise ValueError(f"flag model {path or 'flag_model.json'} has a malformed "
                                 f"hidden-state probe ({e}); refit it.") from None
            if not len(probe.weights) == len(probe.mean) == len(probe.scale):
                raise ValueError(f"flag model {path or 'flag_model.json'} has a hidden-state "
                                 "probe of mismatched sizes; refit it.")
        return cls(d["weights"], d["bias"], d["mean"], d["scale"], d["threshold"],
                   d.get("source", {}), names, probe)


def summarize(conf: list[tuple] | None, text: str, flag: FlagModel | None = None,
              span_logprob: float = SPAN_LOGPROB, question: str = "",
              hidden=None, probe: HiddenProbe | None = None) -> dict | None:
    """The ``confidence`` field of an answer (None when no token was generated);
    ``question``: the user's last message (the answer's own tokens leave its words out);
    ``hidden``: the answer's mean tapped hidden state, which ``probe`` (the flag model's,
    for this model) scores instead of the logprob features."""
    if not conf:
        return None
    feats = features(conf, text, question)
    out = {"tokens": len(conf),
           "mean_logprob": round(feats["mean_logprob"], 4),
           "min_logprob": round(feats["min_logprob"], 4),
           "mean_entropy": round(feats["mean_entropy"], 4),
           "max_entropy": round(feats["max_entropy"], 4),
           "mean_margin": round(feats["mean_margin"], 4),
           "answer_mean_logprob": round(feats["answer_mean_logprob"], 4),
           "answer_min_margin": round(feats["answer_min_margin"], 4),
           "low_confidence_spans": low_confidence_spans(conf, text, span_logprob)}
    if flag is not None and probe is not None and hidden is not None:
        risk = probe.risk(hidden)
        out.update(risk=round(risk, 4), flagged=bool(risk >= probe.threshold),
                   risk_from="hidden state")
    elif flag is not None:
        risk = flag.risk(feats)
        out.update(risk=round(risk, 4), flagged=bool(risk >= flag.threshold),
                   risk_from="token logprobs")
    return out
