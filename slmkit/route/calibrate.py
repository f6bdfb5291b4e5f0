"""Thresholds from a calibration set, and how far they hold on another traffic mix.

A routing score (cascade signal or router) only means something next to a threshold, and
a threshold picked on one mix of requests forwards a different share on another -- the
top complaint about RouteLLM's calibrated thresholds. ``slm route calibrate`` picks the
threshold meeting a target on one set of scored requests and reports, on a second set,
the share it really forwards there.

Rows (JSONL): ``score`` (or ``scores: {name: value}`` with ``--signal``), and for quality
targets ``small_quality`` and ``big_quality``. ``slm route eval --out DIR`` writes such rows
(``scores.jsonl``), one per task item.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slmkit.errors import DataError


def curve(scores, small_q, big_q) -> tuple[np.ndarray, np.ndarray]:
    """Quality against share forwarded when the lowest scores go to the big model first.

    Returns ``(shares [n + 1], quality [n + 1])``: point k forwards the k lowest-scored
    requests (ties in input order).
    """
    scores, small_q, big_q = (np.asarray(a, dtype=np.float64) for a in (scores, small_q, big_q))
    order = np.argsort(scores, kind="stable")
    gain = (big_q - small_q)[order]
    n = len(scores)
    quality = small_q.mean() + np.concatenate([[0.0], np.cumsum(gain)]) / n
    return np.arange(n + 1) / n, quality


def threshold_at(scores, k: int) -> float:
    """The threshold forwarding the ``k`` lowest scores (``score < threshold``)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if k <= 0:
        return float(s[0])
    if k >= len(s):
        return float(np.nextafter(s[-1], np.inf))
    return float((s[k - 1] + s[k]) / 2) if s[k] > s[k - 1] else float(s[k])


def share_below(scores, threshold: float) -> float:
    return float((np.asarray(scores, dtype=np.float64) < threshold).mean())


def quality_at(scores, small_q, big_q, threshold: float) -> float:
    fwd = np.asarray(scores, dtype=np.float64) < threshold
    return float(np.where(fwd, big_q, small_q).mean())


def read_scores(path: str | Path, signal: str | None) -> dict[str, np.ndarray]:
    """``score`` (and ``small_quality`` / ``big_quality`` when every row has them)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read {path} ({e}); pass a UTF-8 JSONL of scored requests.") \
            from None
    scores, small, big = [], [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg}).") from None
        value = row.get("scores", {}).get(signal) if signal else row.get("score")
        if not isinstance(value, (int, float)):
            what = f"scores.{signal}" if signal else "score"
            raise DataError(f"{path} line {n} has no numeric '{what}'" + (
                "" if signal else "; pass --signal NAME for rows of `slm route eval`") + ".")
        scores.append(float(value))
        small.append(row.get("small_quality"))
        big.append(row.get("big_quality"))
    if len(scores) < 2:
        raise DataError(f"{path} holds {len(scores)} scored rows; calibrating needs at least 2.")
    out = {"score": np.array(scores)}
    if all(isinstance(v, (int, float)) for v in small + big):
        out.update(small=np.array(small, dtype=np.float64), big=np.array(big, dtype=np.float64))
    return out


def pick_threshold(data: dict[str, np.ndarray], target_share: float | None,
                   target_quality: float | None) -> float:
    """The threshold that forwards ``target_share``, or the fewest forwards reaching
    ``target_quality`` x the big model's mean quality."""
    s = data["score"]
    if target_share is not None:
        return threshold_at(s, int(round(target_share * len(s))))
    if "small" not in data:
        raise DataError("--target-quality needs 'small_quality' and 'big_quality' in every "
                        "row.")
    shares, quality = curve(s, data["small"], data["big"])
    goal = target_quality * data["big"].mean()
    k = int(np.argmax(quality >= goal - 1e-12)) if (quality >= goal - 1e-12).any() else len(s)
    return threshold_at(s, k)


def run_calibrate(cfg):
    """``slm route calibrate``."""
    from slmkit.step import StepResult

    data = read_scores(cfg.scores, cfg.signal)
    t = pick_threshold(data, cfg.target_share, cfg.target_quality)
    figures = {"threshold": t, "share": share_below(data["score"], t)}
    rows = [("threshold", f"{t:.6g} (forward when the score is below it)"),
            ("share forwarded", f"{figures['share']:.1%} of {len(data['score'])} "
                                f"({cfg.scores})")]
    if "small" in data:
        figures["quality"] = quality_at(data["score"], data["small"], data["big"], t)
        figures["big_quality"] = float(data["big"].mean())
        rows.append(("quality", f"{figures['quality']:.4f} (big alone "
                                f"{figures['big_quality']:.4f}, small alone "
                                f"{data['small'].mean():.4f})"))
    if cfg.check:
        other = read_scores(cfg.check, cfg.signal)
        figures["check_share"] = share_below(other["score"], t)
        figures["share_shift"] = figures["check_share"] - figures["share"]
        rows.append(("share on --check", f"{figures['check_share']:.1%} of "
                                         f"{len(other['score'])} ({cfg.check}): moved "
                                         f"{figures['share_shift']:+.1%}"))
        if "small" in other:
            figures["check_quality"] = quality_at(other["score"], other["small"],
                                                  other["big"], t)
            rows.append(("quality on --check", f"{figures['check_quality']:.4f} (big alone "
                                               f"{other['big'].mean():.4f})"))
    return StepResult("route calibrate", figures=figures, rows=rows)
