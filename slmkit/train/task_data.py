"""Where fine-tuning and augmentation rows come from: task JSONL, augment outputs, built-in tasks.

A ``--data`` spec of ``slm finetune`` / ``slm augment`` is one of:

* a JSONL file of ``prompt``/``completion`` (or chat ``messages``) rows;
* a directory holding ``data.jsonl`` (what ``slm augment`` writes);
* a built-in generation task of :mod:`slmkit.eval.mining` (``stdlib-docstring``,
  ``stdlib-funcname``, ``stdlib-nextline``). Its items are mined from the corpus **train**
  split, while ``slm eval --tasks NAME`` scores the **val** split, so nothing the model is
  tuned on is ever scored.

A built-in item ``{prompt, answer, stop}`` becomes the row ``{prompt, completion: answer +
stop[0], stop}``: the completion ends with the item's first stop string (``\"\"\"`` for
``stdlib-docstring``) so the tuned model learns to close its answer where evaluation cuts it.
Built-in prompts are raw text (source code), so they are formatted with the ``plain``
template (``prompt + completion + eos``), exactly what ``slm eval`` feeds the model; the chat
template is the default for JSONL files, whose prompts are usually user messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmkit.errors import DataError

__all__ = ["AUGMENT_FILE", "GENERATION_TASKS", "builtin_task_rows", "default_template",
           "is_builtin_task", "read_rows", "resolve_data_file"]

#: The file ``slm augment`` writes into its output directory.
AUGMENT_FILE = "data.jsonl"
#: Built-in tasks usable as fine-tuning data (the multiple-choice one has no completion).
GENERATION_TASKS = ("stdlib-docstring", "stdlib-funcname", "stdlib-nextline")


def is_builtin_task(spec: Any) -> bool:
    """True when ``spec`` names a built-in generation task (and no such file exists)."""
    return isinstance(spec, str) and spec in GENERATION_TASKS and not Path(spec).exists()


def resolve_data_file(spec: str) -> str:
    """``spec``, or its ``data.jsonl`` when it is a directory holding one (an augment output).

    Other directories pass through unchanged (the corpus reader reads every JSONL in them).
    """
    path = Path(spec).expanduser()
    if path.is_dir() and (path / AUGMENT_FILE).is_file():
        return str(path / AUGMENT_FILE)
    return spec


def _record_data(spec: str) -> Any:
    """The ``data`` an ``slm augment`` output dir was made from (None otherwise)."""
    from slmkit.models.lineage import read_record

    path = Path(spec).expanduser()
    rec = read_record(path) if path.is_dir() else None
    return (rec or {}).get("params", {}).get("data") if rec and rec.get("step") == "augment" \
        else None


def default_template(spec: str | list[str]) -> str:
    """``"plain"`` for built-in tasks (and augment outputs made from one), else ``"chat"``."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    raw = [is_builtin_task(s) or is_builtin_task(_record_data(s)) for s in specs]
    return "plain" if raw and all(raw) else "chat"


def builtin_task_rows(name: str, max_samples: int | None = None, data: Any = "stdlib",
                      val_fraction: float = 0.05) -> list[dict[str, Any]]:
    """Prompt/completion rows of a built-in task, mined from the corpus TRAIN split.

    Args:
        name: one of :data:`GENERATION_TASKS`.
        max_samples: keep this many items (the mining order: lowest id hashes); None: all.
        data: the corpus the items are mined from.
        val_fraction: the corpus split's validation share (as in ``slm eval``).

    Returns:
        ``[{"prompt", "completion", "stop", "id", "source"}, ...]`` (``source``: the
        corpus document the item comes from).
    """
    from slmkit.eval.mining import mine_tasks

    items = mine_tasks([name], data=data, split="train", val_fraction=val_fraction,
                       limit=max_samples)[name]
    if not items:
        raise DataError(f"The built-in task '{name}' found no items in the train split of "
                        f"'{data}'; use a larger corpus or a task JSONL.")
    return [{"prompt": it["prompt"], "completion": it["answer"] + (it["stop"] or [""])[0],
             "stop": list(it["stop"]), "id": it["id"], "source": it["source"]} for it in items]


def read_rows(spec: str, max_samples: int | None = None) -> list[dict[str, Any]]:
    """Prompt/completion rows of a task JSONL, an augment dir or a built-in task.

    Each row gets ``where`` (``"<file> line <n>"`` or the built-in item id) for messages.

    Raises:
        DataError: a missing or empty file, a line that is not JSON, a row without string
            ``prompt``/``completion`` (file and line named), an empty completion.
    """
    if is_builtin_task(spec):
        return [{**r, "where": f"{spec} item {r['id']}"}
                for r in builtin_task_rows(spec, max_samples)]
    path = Path(resolve_data_file(spec))
    if path.is_dir():
        raise DataError(f"--data directory '{spec}' has no {AUGMENT_FILE}; pass a task JSONL "
                        "file, an `slm augment` output dir or a built-in task.")
    if not path.is_file():
        raise DataError(f"--data '{spec}' does not exist; pass a task JSONL file, an "
                        "`slm augment` output dir or a built-in task "
                        f"({', '.join(GENERATION_TASKS)}).")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot read '{path}' as UTF-8 text ({e}); write it as UTF-8 JSONL.") \
            from None
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if max_samples is not None and len(rows) >= max_samples:
            break
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg}); fix or remove that line.") \
                from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("completion"), str):
            raise DataError(f"{where} needs string 'prompt' and 'completion' fields (augment "
                            "works on prompt/completion rows); add them.")
        if not row["completion"].strip() or not row["prompt"]:
            raise DataError(f"{where} has an empty prompt or completion; fill it or remove "
                            "the line.")
        stop = row.get("stop")
        if stop is not None and (not isinstance(stop, list)
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise DataError(f"{where} has 'stop' that is not a list of non-empty strings.")
        rows.append({**row, "where": where})
    if not rows:
        raise DataError(f"'{path}' holds no rows; add JSONL lines with 'prompt' and "
                        "'completion'.")
    return rows
