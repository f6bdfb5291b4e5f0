"""Server metrics in the Prometheus text exposition format (written by hand, no library).

Exposed at ``GET /metrics``:

* ``slm_requests_total{endpoint, status}`` -- every answered request by HTTP status;
* ``slm_generations_total{reason}`` -- finished generations by finish reason
  (stop, length, cancelled, error, timeout);
* ``slm_prompt_tokens_total`` / ``slm_completion_tokens_total``;
* ``slm_time_to_first_token_seconds`` and ``slm_request_duration_seconds`` histograms;
* gauges ``slm_queue_depth``, ``slm_running_streams``, ``slm_engine_free_slots``;
* answer confidence (with monitoring on): ``slm_answers_scored_total``,
  ``slm_answers_flagged_total``, histograms ``slm_answer_mean_logprob`` and
  ``slm_answer_risk``, and gauges over the last :data:`RECENT` answers
  (``slm_recent_mean_logprob``, ``slm_recent_min_logprob``, ``slm_recent_mean_entropy``,
  ``slm_recent_flag_rate``);
* whatever else registers a gauge with :meth:`Metrics.set_gauge` (drift, canaries).

Format reference: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter, deque

#: Latency buckets in seconds (CPU generation: milliseconds to minutes).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PREFIX = "slm_"
#: Mean token log-probability buckets of an answer (nats; 0 is certain).
LOGPROB_BUCKETS = (-8.0, -4.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.3, -0.2, -0.1, -0.05, 0.0)
RISK_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Answers the ``slm_recent_*`` gauges average over.
RECENT = 100


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` buckets, sum, count)."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help: str) -> list[str]:
        lines = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        running = 0
        for le, n in zip(self.buckets, self.counts):
            running += n
            lines.append(f'{name}_bucket{{le="{le:g}"}} {running}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                  f"{name}_count {self.count}"]
        return lines


def _labels(**labels: str) -> str:
    def esc(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    """Counters and histograms of one server (updated from the event loop thread)."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.generations: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram()
        self.latency = Histogram()
        self.answers = 0
        self.flagged = 0
        self.answer_logprob = Histogram(LOGPROB_BUCKETS)
        self.answer_risk = Histogram(RISK_BUCKETS)
        self.recent: deque[dict] = deque(maxlen=RECENT)
        #: name -> (help, {label tuple: value}); see :meth:`set_gauge`
        self.gauges: dict[str, tuple[str, dict[tuple, float]]] = {}
        self._gauge_lock = threading.Lock()  # set_gauge may run on other threads

    def record_answer(self, confidence: dict) -> None:
        """One answer's ``confidence`` field (:func:`slmkit.monitor.confidence.summarize`)."""
        self.answers += 1
        self.flagged += bool(confidence.get("flagged"))
        self.answer_logprob.observe(confidence["mean_logprob"])
        if "risk" in confidence:
            self.answer_risk.observe(confidence["risk"])
        self.recent.append(confidence)

    def set_gauge(self, name: str, value: float, help: str, **labels: str) -> None:
        """Set gauge ``slm_<name>{labels}`` (drift and canary figures)."""
        with self._gauge_lock:
            self.gauges.setdefault(name, (help, {}))[1][tuple(sorted(labels.items()))] = value

    def recent_summary(self) -> dict[str, float]:
        """Means over the last :data:`RECENT` answers (empty before the first one)."""
        if not self.recent:
            return {}
        n = len(self.recent)
        return {"recent_mean_logprob": sum(c["mean_logprob"] for c in self.recent) / n,
                "recent_min_logprob": sum(c["min_logprob"] for c in self.recent) / n,
                "recent_mean_entropy": sum(c["mean_entropy"] for c in self.recent) / n,
                "recent_flag_rate": sum(bool(c.get("flagged")) for c in self.recent) / n}

    def record_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, int(status))] += 1

    def record_generation(self, reason: str, prompt_tokens: int, completion_tokens: int,
                          ttft_s: float | None, duration_s: float | None) -> None:
        self.generations[reason] += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if duration_s is not None:
            self.latency.observe(duration_s)

    def render(self, queue_depth: int, running: int, free_slots: int) -> str:
        """The whole exposition text."""
        p = PREFIX
        out = [f"# HELP {p}requests_total Answered HTTP requests by endpoint and status.",
               f"# TYPE {p}requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f"{p}requests_total{_labels(endpoint=endpoint, status=str(status))} {n}")
        out += [f"# HELP {p}generations_total Finished generations by finish reason.",
                f"# TYPE {p}generations_total counter"]
        for reason, n in sorted(self.generations.items()):
            out.append(f"{p}generations_total{_labels(reason=reason)} {n}")
        for name, value, help in (
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                ("completion_tokens_total", self.completion_tokens, "Tokens generated.")):
            out += [f"# HELP {p}{name} {help}", f"# TYPE {p}{name} counter",
                    f"{p}{name} {value}"]
        out += self.ttft.render(f"{p}time_to_first_token_seconds",
                                "Seconds from request arrival to the first generated token.")
        out += self.latency.render(f"{p}request_duration_seconds",
                                   "Seconds from request arrival to the last generated token.")
        for name, value, help in (
                ("queue_depth", queue_depth, "Requests waiting for a decoding slot."),
                ("running_streams", running, "Requests holding a decoding slot."),
                ("engine_free_slots", free_slots, "Free KV-cache slots in the engine.")):
            out += [f"# HELP {p}{name} {help}", f"# TYPE {p}{name} gauge", f"{p}{name} {value}"]
        for name, value, help in (
                ("answers_scored_total", self.answers, "Answers with confidence figures."),
                ("answers_flagged_total", self.flagged, "Answers flagged as likely wrong.")):
            out += [f"# HELP {p}{name} {help}", f"# TYPE {p}{name} counter",
                    f"{p}{name} {value}"]
        out += self.answer_logprob.render(f"{p}answer_mean_logprob",
                                          "Mean token log-probability of each answer.")
        out += self.answer_risk.render(f"{p}answer_risk",
                                       "Hallucination risk of each answer (0..1).")
        helps = {"recent_mean_logprob": "Mean token log-probability, last answers.",
                 "recent_min_logprob": "Lowest token log-probability, mean over last answers.",
                 "recent_mean_entropy": "Mean token entropy (nats), last answers.",
                 "recent_flag_rate": "Share of the last answers flagged."}
        for name, value in self.recent_summary().items():
            out += [f"# HELP {p}{name} {helps[name]} (last {RECENT})",
                    f"# TYPE {p}{name} gauge", f"{p}{name} {value:.6g}"]
        with self._gauge_lock:
            gauges = [(name, help, sorted(values.items()))
                      for name, (help, values) in sorted(self.gauges.items())]
        for name, help, values in gauges:
            out += [f"# HELP {p}{name} {help}", f"# TYPE {p}{name} gauge"]
            for labels, value in values:
                out.append(f"{p}{name}{_labels(**dict(labels)) if labels else ''} {value:.6g}")
        return "\n".join(out) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` from exposition text (for tests and the load bench)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
