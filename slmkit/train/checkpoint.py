"""Atomic, prunable training checkpoints under ``<out>/checkpoints/step-XXXXXXXX/``.

A checkpoint holds everything a resumed run needs to continue exactly where it stopped:

* ``model.safetensors``: the fp32 master weights (tied weights stored once);
* ``trainer.pt``: the optimizer state and the torch RNG state (tensors and plain values
  only, loaded back with ``torch.load(weights_only=True)``, which cannot run code);
* ``state.json``: step, tokens, elapsed time, loss history and the training config.

The data order needs no saved state: batches are a function of (seed, index).

Each checkpoint is written into a temp dir and renamed into place, so ``kill -9`` at any
moment leaves the previous checkpoints intact and loses at most one interval.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from slmkit.errors import OutputError

CHECKPOINT_DIR = "checkpoints"
_PREFIX = "step-"


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (a run's ``checkpoints/`` folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], step: int,
                    keep: int, optimizer_state: dict | None = None) -> Path:
    """Write ``root/step-<step>`` atomically and prune to the last ``keep``.

    ``optimizer_state`` replaces ``optimizer.state_dict()`` (a sharded run passes the full
    state it gathered, in the same form).

    Returns:
        The checkpoint directory.
    """
    from safetensors.torch import save_model as save_safetensors

    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot create checkpoint folder '{root}' ({e.strerror}); choose a "
                          "writable --out.") from None
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_safetensors(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer_state or optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state()},
                   tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from a checkpoint dir; return its ``state.json``."""
    from safetensors.torch import load_model as load_safetensors

    path = Path(path)
    load_safetensors(model, str(path / "model.safetensors"))
    blob = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    return json.loads((path / "state.json").read_text())
