"""Deterministic train/validation split by whole document.

A document goes to validation when a hash of its id falls below ``val_fraction``. The
decision depends on nothing but the id, so every command (training, evaluation, task
mining, compression calibration) agrees on which documents are held out, and a
validation document never contributes a token to training. Anything mined from a
document (an eval task, a calibration sample) inherits that document's split.
"""

from __future__ import annotations

import hashlib

from slmkit.errors import ConfigError

SPLITS = ("all", "train", "val")
_SCALE = float(1 << 64)


def check_val_fraction(val_fraction: float) -> float:
    """Validate ``val_fraction`` (``0 <= f < 1``) and return it as a float."""
    try:
        f = float(val_fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"--val-fraction '{val_fraction}' is not a number; use e.g. 0.05.") \
            from None
    if not 0.0 <= f < 1.0:
        raise ConfigError(f"--val-fraction {f} is outside [0, 1); use e.g. 0.05 for 5% of the "
                          "documents.")
    return f


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"Unknown split '{split}'; use one of {', '.join(SPLITS)}.")
    return split


def doc_hash_fraction(doc_id: str) -> float:
    """Map a document id to a stable number in ``[0, 1)`` (BLAKE2b, 64 bits)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def is_val(doc_id: str, val_fraction: float = 0.05) -> bool:
    """True when the document ``doc_id`` belongs to the validation split.

    Args:
        doc_id: the document id (e.g. ``"stdlib:json/decoder.py"``).
        val_fraction: expected share of documents held out, in ``[0, 1)``.
    """
    return doc_hash_fraction(doc_id) < val_fraction


def in_split(doc_id: str, split: str, val_fraction: float) -> bool:
    """Whether ``doc_id`` belongs to ``split`` (``"all"``, ``"train"`` or ``"val"``)."""
    if split == "all":
        return True
    return is_val(doc_id, val_fraction) == (split == "val")
