"""Trade-off plots for ``slm compare``: quality against size and against decode speed.

Quality is bits per byte (lower is better; fair across tokenizers). Pareto-optimal models
(no other model is both better on quality and better on the x axis) are drawn as coloured
stars on a dashed front and labelled in bold; dominated models are grey.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmkit.eval.ops import pareto_front

_FRONT = "#1f6feb"
_GREY = "#8b949e"


def _points(models: list[dict[str, Any]], x_key: str) -> tuple[list, int]:
    pts, missing = [], 0
    for m in models:
        s = m.get("summary") or {}
        x, y = s.get(x_key), s.get("bits_per_byte")
        if m.get("error") or x is None or y is None:
            missing += 1
            continue
        pts.append((m["label"], float(x), float(y)))
    return pts, missing


def tradeoff_plot(models: list[dict[str, Any]], x_key: str, path: Path, title: str,
                  x_label: str, x_scale: float = 1.0, higher_x_better: bool = False) -> Path:
    """Write one scatter plot of bits/byte against ``summary[x_key]`` with the Pareto front.

    Args:
        models: the ``models`` rows of the compare results.
        x_key: summary key for the x axis (``size_on_disk``, ``decode_tok_s``).
        path: PNG to write.
        title, x_label: texts.
        x_scale: divide x values by this (bytes -> MB).
        higher_x_better: True when a larger x is better (speed), False for size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, missing = _points(models, x_key)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=150)
    ax.set_title(title, loc="left", fontsize=13, fontweight="bold")
    ax.grid(True, color="#e1e4e8", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(x_label)
    ax.set_ylabel("bits per byte  (lower is better)")
    if not pts:
        ax.text(0.5, 0.5, "no model could be measured", ha="center", va="center",
                transform=ax.transAxes, color=_GREY, fontsize=12)
    else:
        xs = [x / x_scale for _, x, _ in pts]
        ys = [y for _, _, y in pts]
        front = pareto_front([(-x if higher_x_better else x, y) for x, y in zip(xs, ys)])
        if len(xs) > 1 and max(xs) / max(min(xs), 1e-12) > 20:
            ax.set_xscale("log")
        order = sorted((x, y) for x, y, f in zip(xs, ys, front) if f)
        if len(order) > 1:
            ax.plot(*zip(*order), linestyle="--", color=_FRONT, alpha=0.6, linewidth=1.2,
                    zorder=1, label="Pareto front")
        offsets = _label_offsets(xs, ys, log_x=ax.get_xscale() == "log")
        for (label, _, _), x, y, f, dy in zip(pts, xs, ys, front, offsets):
            ax.scatter([x], [y], s=160 if f else 60, marker="*" if f else "o",
                       color=_FRONT if f else _GREY, edgecolor="white", linewidth=0.8,
                       zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(7, dy),
                        fontsize=9, color="#24292f" if f else _GREY,
                        fontweight="bold" if f else "normal", zorder=4)
        ax.scatter([], [], s=160, marker="*", color=_FRONT, label="Pareto-optimal")
        ax.scatter([], [], s=60, marker="o", color=_GREY, label="dominated")
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, frameon=False,
                  fontsize=8, handletextpad=0.3, columnspacing=1.0)
        _pad(ax, xs, ys)
        where = "lower and further right" if higher_x_better else "lower and further left"
        ax.text(0.0, -0.16, f"Better models sit {where}.", transform=ax.transAxes,
                fontsize=8, color=_GREY)
    if missing:
        ax.text(1.0, -0.16, f"{missing} model(s) not shown (failed or not measured)",
                transform=ax.transAxes, fontsize=8, color="#cf222e", ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pad(ax, xs: list[float], ys: list[float]) -> None:
    """Leave room around the points so that labels stay inside the axes."""
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or max(abs(hi) * 0.05, 0.05)
    ax.set_ylim(lo - 0.15 * span, hi + 0.25 * span)
    if ax.get_xscale() == "log":
        ax.set_xlim(min(xs) / 1.6, max(xs) * 2.5)
    else:
        xlo, xhi = min(xs), max(xs)
        xspan = (xhi - xlo) or max(abs(xhi) * 0.1, 1e-3)
        ax.set_xlim(max(0.0, xlo - 0.15 * xspan) if xlo >= 0 else xlo - 0.15 * xspan,
                    xhi + 0.35 * xspan)


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Both trade-off plots for a compare run; returns ``{name: path}``."""
    models = results["models"]
    return {
        "quality_vs_size": tradeoff_plot(
            models, "size_on_disk", out_dir / "quality_vs_size.png",
            "Quality vs size on disk", "size on disk (MB)", x_scale=1e6),
        "quality_vs_speed": tradeoff_plot(
            models, "decode_tok_s", out_dir / "quality_vs_speed.png",
            "Quality vs decode speed", "decode tokens/s at batch 1  (higher is better)",
            higher_x_better=True),
    }


def _label_offsets(xs: list[float], ys: list[float], log_x: bool = False) -> list[int]:
    """Vertical label offsets (points) so labels of nearby markers stack instead of overlap.

    Two markers count as near when they are within 25% of the x range and 6% of the y
    range; each further near marker's label moves 12 points lower.
    """
    import math

    tx = [math.log10(x) if log_x and x > 0 else x for x in xs]
    xr = (max(tx) - min(tx)) or 1.0
    yr = (max(ys) - min(ys)) or 1.0
    out: list[int] = []
    for i, (x, y) in enumerate(zip(tx, ys)):
        near = sum(1 for j in range(i) if abs(tx[j] - x) < 0.25 * xr
                   and abs(ys[j] - y) < 0.06 * yr)
        out.append(6 - 12 * near)
    return out

