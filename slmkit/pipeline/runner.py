"""Run a validated recipe: skip cached steps, rerun what changed and everything downstream.

Each finished step leaves ``<workdir>/.pipeline/<name>.json`` with its config hash. A step
is skipped when that hash matches and its output still exists. Because a step's hash covers
the hashes of the steps it refers to, changing an option reruns that step and all of its
dependants. A step that was interrupted reruns; a resumable one (training) resumes from its
last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkit.console import console, print_table
from slmkit.pipeline.recipe import Recipe, build_config, config_hash
from slmkit.pipeline.steps import STEP_KINDS


@dataclass
class StepRun:
    """One step of a recipe run: what happened and the figures its StepResult gave."""

    name: str
    kind: str
    status: str           # "ran", "cached", "planned: run", "planned: cached", "failed"
    seconds: float = 0.0
    out: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def _state_file(recipe: Recipe, name: str) -> Path:
    return recipe.workdir / ".pipeline" / f"{name}.json"


def _cached(recipe: Recipe, name: str, digest: str) -> dict[str, Any] | None:
    f = _state_file(recipe, name)
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if state.get("hash") == digest and recipe.out_dir(name).exists():
        return state
    return None


def plan(recipe: Recipe) -> list[tuple[str, str, bool]]:
    """(name, hash, cached) for every step in execution order.

    A step counts as cached only if all its upstream steps are cached too (their outputs
    would otherwise be rebuilt first).
    """
    hashes: dict[str, str] = {}
    fresh: dict[str, bool] = {}
    out = []
    for step in recipe.steps:
        digest = config_hash(recipe, step, hashes)
        hashes[step.name] = digest
        cached = _cached(recipe, step.name, digest) is not None and all(fresh[d] for d in step.deps)
        fresh[step.name] = cached
        out.append((step.name, digest, cached))
    return out


def run_recipe(recipe: Recipe, dry_run: bool = False, force: bool = False) -> list[StepRun]:
    """Execute (or, with ``dry_run``, only describe) a recipe. Returns one result per step."""
    results: list[StepRun] = []
    steps = {s.name: s for s in recipe.steps}
    n = len(recipe.steps)
    for i, (name, digest, cached) in enumerate(plan(recipe), start=1):
        step = steps[name]
        out = recipe.out_dir(name)
        if dry_run:
            results.append(StepRun(name, step.kind, "planned: cached" if cached and not force
                                      else "planned: run", out=str(out)))
            continue
        if cached and not force:
            state = _cached(recipe, name, digest) or {}
            console.print(f"[dim]step {i}/{n}[/] [bold]{name}[/] ({step.kind}): cached, skipping")
            results.append(StepRun(name, step.kind, "cached", out=str(out),
                                      metrics=state.get("metrics", {})))
            continue
        console.print(f"[dim]step {i}/{n}[/] [bold]{name}[/] ({step.kind}) → {out}")
        results.append(_run_step(recipe, step, digest))
    return results


def _run_step(recipe: Recipe, step, digest: str) -> StepRun:
    kind = STEP_KINDS[step.kind]
    out = recipe.out_dir(step.name)
    state_file = _state_file(recipe, step.name)
    state_file.unlink(missing_ok=True)
    cfg = build_config(recipe, step)
    if out.exists():  # stale output from an older config: replace it
        if hasattr(cfg, "overwrite"):
            cfg = cfg.model_copy(update={"overwrite": True})
        else:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    if kind.resumable:
        cfg = cfg.model_copy(update={"resume": True})
    start = time.perf_counter()
    metrics = kind.run_function()(cfg).numbers()
    seconds = time.perf_counter() - start
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state = {"hash": digest, "kind": step.kind, "options": step.options,
             "seconds": round(seconds, 2), "metrics": metrics}
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(state_file)
    return StepRun(step.name, step.kind, "ran", seconds, str(out), metrics)


#: The figures worth a glance in the summary, in order of preference (at most three shown).
HEADLINES = (("val_ppl", "val ppl"), ("val_bpb", "bits/byte"), ("ppl", "ppl"),
             ("bits_per_byte", "bits/byte"), ("task_score", "task score"),
             ("sparsity", "sparsity"),
             ("param_fraction", "params kept"), ("decode_speedup", "decode ×"),
             ("bits_per_weight", "bits/weight"), ("params", "params"),
             ("train_loss", "train loss"),
             ("vocab_size", "vocab"), ("val_bytes_per_token", "bytes/token"),
             ("factored_params", "factored params"), ("models", "models"),
             ("failed", "failed"), ("size_on_disk", "size"), ("gguf_bytes", "size"))


def headline(metrics: dict[str, Any], limit: int = 3) -> str:
    from slmkit.console import human_bytes, human_count

    parts = []
    for key, label in HEADLINES:
        if key in metrics and len(parts) < limit:
            v = metrics[key]
            if key in ("size_on_disk", "gguf_bytes"):
                text = human_bytes(v)
            elif key in ("params", "factored_params"):
                text = human_count(v)
            elif key == "task_score":
                text = f"{v:.1%}"
            elif key in ("sparsity", "param_fraction"):
                text = f"{v:.0%}"
            else:
                text = f"{v:.4g}" if isinstance(v, float) else f"{v:,}"
            parts.append(f"{label} {text}")
    return ", ".join(parts)


def print_summary(results: list[StepRun], title: str = "slm run") -> None:
    rows = [(r.name, r.kind, r.status, f"{r.seconds:.1f}s" if r.seconds else "", r.out,
             headline(r.metrics)) for r in results]
    print_table(title, rows, header=("step", "kind", "status", "time", "output", "figures"))
