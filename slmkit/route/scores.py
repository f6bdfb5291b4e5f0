"""Cascade scores: how sure the small model was of its own answer, from its token logprobs.

The engine records, per generated token, its log-probability and the entropy of the
distribution it was drawn from (``SamplingParams(confidence=True)`` ->
``Completion.confidence``, the same record :mod:`slmkit.monitor.confidence` summarises for
every answer). A cascade (FrugalGPT, Chen et al. 2023; AutoMix, Madaan et al. 2023) keeps
the local answer when its score is at least the threshold and escalates otherwise. Every
signal is oriented "higher = more confident":

==============  =================================================================
``mean``        mean token log-probability (length-normalised sequence likelihood)
``min``         the lowest token log-probability
``q05`` .. q50  a quantile of the token log-probabilities: Gupta et al. ICLR 2024
                ("Language model cascades: token-level uncertainty and beyond") find
                low quantiles beat the plain sequence probability as deferral signal
``entropy``     minus the mean per-token entropy (nats)
``max_entropy`` minus the largest per-token entropy
``flag``        1 - the monitor's hallucination risk (its logistic model over these, or
                its hidden-state probe where one was fitted on the local model)
==============  =================================================================
"""

from __future__ import annotations

import numpy as np

SIGNALS = ("mean", "min", "q05", "q10", "q25", "q50", "entropy", "max_entropy", "flag")
_QUANTILES = {"q05": 5, "q10": 10, "q25": 25, "q50": 50}


def all_scores(conf: list[tuple[float, float, int]] | None, hidden=None,
               probe=None) -> dict[str, float]:
    """Every signal of one answer (``Completion.confidence``); an answer with no token
    scores ``-inf`` everywhere (nothing to trust: escalate). With the answer's tapped
    ``hidden`` mean and the flag model's ``probe`` for the local model, ``flag`` reads the
    probe, as the monitor does."""
    if not conf:
        return dict.fromkeys(SIGNALS, float("-inf"))
    lps = np.array([c[0] for c in conf], dtype=np.float64)
    ents = np.array([c[1] for c in conf], dtype=np.float64)
    out = {"mean": float(lps.mean()), "min": float(lps.min()),
           "entropy": -float(ents.mean()), "max_entropy": -float(ents.max())}
    for name, q in _QUANTILES.items():
        out[name] = float(np.percentile(lps, q))
    flag = _flag_model()
    if probe is not None and hidden is not None:
        out["flag"] = 1.0 - probe.risk(hidden)
    elif flag is not None:   # the monitor's features of the same record
        from slmkit.monitor.confidence import features

        out["flag"] = 1.0 - flag.risk(features(conf))
    return out


def available_signals() -> tuple[str, ...]:
    """The signals this installation can compute ('flag' needs the monitor's model)."""
    return SIGNALS if _flag_model() is not None else SIGNALS[:-1]


def score(conf: list[tuple[float, float, int]] | None, signal: str, hidden=None,
          probe=None) -> float:
    """One signal of one answer (see the module table; ``hidden`` / ``probe`` as
    :func:`all_scores`)."""
    if signal not in SIGNALS:
        raise ValueError(f"unknown cascade signal {signal!r}; use one of {', '.join(SIGNALS)}")
    scores = all_scores(conf, hidden, probe)
    if signal not in scores:
        raise ValueError("the 'flag' signal needs the monitor's flag model "
                         "(slmkit/monitor/flag_model.json), which is not installed")
    return scores[signal]


_FLAG: list = []


def _flag_model():
    """The monitor's shipped flag model, or None where it is not installed."""
    if not _FLAG:
        try:
            from slmkit.monitor.confidence import FlagModel

            _FLAG.append(FlagModel.load())
        except (OSError, ValueError, KeyError):
            _FLAG.append(None)
    return _FLAG[0]
