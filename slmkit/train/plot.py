"""Loss-curve PNG for a training run (train loss per log interval, val loss per eval)."""

from __future__ import annotations

import io


def loss_curve_png(history: list[dict], val_history: list[dict], title: str = "") -> bytes:
    """Render train/val loss against training tokens and return PNG bytes.

    Args:
        history: train records with ``tokens`` and ``loss``.
        val_history: eval records with ``tokens``, ``val_loss`` and optionally ``val_bpb``.
        title: figure title (e.g. the model and data).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    try:
        if history:
            ax.plot([r["tokens"] / 1e6 for r in history], [r["loss"] for r in history],
                    label="train loss", color="#4c72b0", linewidth=1.2)
        if val_history:
            ax.plot([r["tokens"] / 1e6 for r in val_history],
                    [r["val_loss"] for r in val_history], "o-", label="val loss",
                    color="#dd8452", markersize=4)
            last = val_history[-1]
            note = f"final val loss {last['val_loss']:.3f}, ppl {last['val_ppl']:.1f}"
            if "val_bpb" in last:
                note += f", {last['val_bpb']:.3f} bits/byte"
            ax.annotate(note, xy=(0.98, 0.95), xycoords="axes fraction", ha="right",
                        va="top", fontsize=9)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title or "slm train")
        ax.grid(alpha=0.3)
        ax.legend(loc="center right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
