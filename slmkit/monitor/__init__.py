"""Monitoring a deployed model: per-answer confidence and a hallucination flag
(:mod:`~slmkit.monitor.confidence`), the local request log (:mod:`~slmkit.monitor.log`)
and drift between a reference and a recent window of requests (:mod:`~slmkit.monitor.drift`).

Everything is local: the signals come from the engine's own token probabilities, the log
is one SQLite file, and the statistics run on scipy.
"""
