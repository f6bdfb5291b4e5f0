"""Who holds which data: ``--clients`` specs and the built-in non-IID demo split.

``--clients a.jsonl,b.jsonl`` gives one client per item (``NAME=SPEC`` names it, else the
file's stem). ``split:TASK:N`` is the demo: the rows of a built-in task (mined from the
stdlib's train split) dealt to ``N`` clients **by stdlib package**, whole packages at a
time (largest first, each to the client holding the fewest rows), so every client's code
comes from packages no other client has seen: a non-IID federation from data we have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from slmkit.errors import ConfigError

__all__ = ["client_specs", "split_by_package", "package_of"]


def package_of(source: str) -> str:
    """``"stdlib:email/parser.py"`` -> ``"email"``; ``"stdlib:json.py"`` -> ``"json"``."""
    path = source.split(":", 1)[-1]
    return path.split("/", 1)[0].removesuffix(".py")


def split_by_package(rows: list[dict], n: int) -> list[list[dict]]:
    """Deal ``rows`` (with ``source``) to ``n`` clients by package, sizes kept close."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(package_of(r["source"]), []).append(r)
    if len(groups) < n:
        raise ConfigError(f"the task has rows from {len(groups)} packages, fewer than the "
                          f"{n} clients asked for; ask for at most {len(groups)}.")
    parts: list[list[dict]] = [[] for _ in range(n)]
    for _, group in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        min(parts, key=len).extend(group)
    return parts


def client_specs(items: list[str], workdir: Path, max_samples: int | None = None,
                 fits: Callable[[dict], bool] | None = None) -> list[tuple[str, str]]:
    """``[(name, data spec)]`` for ``--clients``; a ``split:TASK:N`` item is written as N
    JSONL files under ``workdir/clients/``, keeping the rows ``fits`` accepts (those that
    fit the context; a written row that does not would refuse its whole client).

    Raises:
        ConfigError: a malformed ``split:`` item, an unknown task, or two clients with the
            same name.
    """
    from slmkit.train.task_data import GENERATION_TASKS, builtin_task_rows

    out: list[tuple[str, str]] = []
    for item in items:
        if item.startswith("split:"):
            _, task, n = (item.split(":") + ["", ""])[:3]
            if task not in GENERATION_TASKS or not n.isdigit() or int(n) < 1:
                raise ConfigError(f"--clients {item} is not split:TASK:N with TASK one of "
                                  f"{', '.join(GENERATION_TASKS)} and N >= 1, e.g. "
                                  "split:stdlib-docstring:3.")
            folder = workdir / "clients"
            folder.mkdir(parents=True, exist_ok=True)
            rows = [r for r in builtin_task_rows(task) if fits is None or fits(r)]
            for k, part in enumerate(split_by_package(rows, int(n))):
                part = part[:max_samples] if max_samples else part
                path = folder / f"{task}-{k + 1}.jsonl"
                path.write_text("".join(json.dumps({"prompt": r["prompt"],
                                                    "completion": r["completion"],
                                                    "package": package_of(r["source"])})
                                        + "\n" for r in part))
                out.append((f"{task}-{k + 1}", str(path)))
            continue
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = Path(item.rstrip("/")).stem or item, item
        out.append((name, spec))
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"--clients names {', '.join(dupes)} more than once; give each "
                          "client its own name with NAME=SPEC.")
    return out
