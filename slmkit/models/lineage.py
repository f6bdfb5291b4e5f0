"""``slmkit.json``: the lineage record written beside every model slmkit saves.

Layout (one JSON object)::

    {
      "format_version": 1,
      "slmkit_version": "0.1.0",
      "created_utc": "2026-11-23T19:00:00Z",
      "step": "quantize",                 # what made this model
      "params": {...},                    # that step's options
      "metrics": {...},                   # what was measured on this model
      "parent": "runs/teacher",           # the model it was made from (null for from-scratch)
      "lineage": [ {entry}, ... ]         # ancestors, oldest first, same fields as above
    }

``read_lineage(dir)`` returns the whole chain including the model itself, so every step
that saves a model makes the chain one entry longer.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LINEAGE_FILE = "slmkit.json"
FORMAT_VERSION = 1
_ENTRY_KEYS = ("step", "ref", "params", "metrics", "parent", "created_utc", "slmkit_version")


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def external_entry(ref: str) -> dict[str, Any]:
    """Lineage root for a model slmkit did not make (a hub id or a foreign directory)."""
    return {"step": "external", "ref": ref, "params": {}, "metrics": {}, "parent": None}


def read_record(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The raw ``slmkit.json`` of a model dir, or None when it has none (or it is unreadable)."""
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_lineage(model_dir: str | os.PathLike, ref: str | None = None) -> list[dict[str, Any]]:
    """The full chain for a model dir, oldest first, ending with the model itself."""
    record = read_record(model_dir)
    if record is None:
        return [external_entry(ref or str(model_dir))]
    chain = [dict(e) for e in record.get("lineage", []) if isinstance(e, dict)]
    own = {k: record.get(k) for k in _ENTRY_KEYS}
    own["ref"] = ref or str(model_dir)
    return chain + [own]


def make_record(step: str, params: dict | None, metrics: dict | None,
                parent_chain: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Build the ``slmkit.json`` content for a new model made by ``step`` from a parent chain."""
    from slmkit import __version__

    parent_chain = parent_chain or []
    return {
        "format_version": FORMAT_VERSION,
        "slmkit_version": __version__,
        "created_utc": utc_now(),
        "step": step,
        "params": _jsonable(params or {}),
        "metrics": _jsonable(metrics or {}),
        "parent": parent_chain[-1].get("ref") if parent_chain else None,
        "lineage": _jsonable(parent_chain),
    }


def write_record(model_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``slmkit.json`` atomically (temp file + rename)."""
    model_dir = Path(model_dir)
    fd, tmp = tempfile.mkstemp(prefix=".slmkit.", suffix=".json", dir=model_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, model_dir / LINEAGE_FILE)


def update_metrics(model_dir: str | os.PathLike, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge measured ``metrics`` into a model's ``slmkit.json`` (creating one if absent)."""
    record = read_record(model_dir)
    if record is None:
        record = make_record("external", {}, {}, [])
        record["parent"] = None
    record.setdefault("metrics", {}).update(_jsonable(metrics))
    write_record(model_dir, record)
    return record


def _jsonable(value: Any) -> Any:
    """Convert tensors, paths, numpy scalars and tuples into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
