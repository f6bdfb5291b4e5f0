"""Built-in task sets mined with ``ast`` from Python source (by default the stdlib corpus).

The labels are facts of real code, so no annotation is needed, and every item inherits
the train/validation split of the document it comes from (documents are read through
:func:`slmkit.data.corpus.iter_documents`): a validation item never contains text from a
training document, multiple-choice distractors included.

===================  ==========  ============================================================
task                 kind        item
===================  ==========  ============================================================
stdlib-funcname      generation  a function with its name masked as ``___`` -> the name
stdlib-docstring-mc  mult.choice source without docstring -> its docstring summary among 4
stdlib-docstring     generation  source without docstring -> one-line summary (ROUGE-L, EM)
stdlib-nextline      generation  a function cut after line k -> line k+1, exactly
===================  ==========  ============================================================

Mining is deterministic: items are ordered by a hash of their id (which names the document,
the function and its line) and the first ``limit`` are kept, so the set does not depend on
iteration order and changes little when the corpus grows.
"""

from __future__ import annotations

import ast
import bisect
import hashlib
import random
import re
import textwrap
from collections.abc import Iterable
from typing import Any

from slmkit.errors import ConfigError

BUILTIN_TASKS = ("stdlib-funcname", "stdlib-docstring-mc", "stdlib-nextline",
                 "stdlib-docstring")
MASK = "___"
MIN_LINES, MAX_LINES, MAX_CHARS = 3, 30, 1500


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def iter_functions(doc_id: str, text: str) -> Iterable[dict[str, Any]]:
    """Functions of a Python document that make good items, with what the tasks need.

    Yields:
        dicts with ``name``, ``qualname``, ``line``, ``source`` (dedented, no decorators),
        ``summary`` (first docstring line or None) and ``bare`` (source without docstring
        or None when the function has none).
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    text_lines = text.split("\n")
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                stack.append((child, qual + "."))
                if not isinstance(child, ast.ClassDef):
                    fn = _function(text_lines, child, qual)
                    if fn is not None:
                        yield fn


def _function(text_lines: list[str], node: ast.FunctionDef, qualname: str
              ) -> dict[str, Any] | None:
    if node.end_lineno is None or node.end_lineno - node.lineno + 1 > MAX_LINES:
        return None
    # whole lines of the def (decorators excluded): ast.get_source_segment re-splits the
    # whole file on every call, which is quadratic on big modules
    source = textwrap.dedent("\n".join(text_lines[node.lineno - 1:node.end_lineno])).rstrip()
    lines = source.split("\n")
    if not MIN_LINES <= len(lines) <= MAX_LINES or len(source) > MAX_CHARS:
        return None
    summary = bare = None
    doc = ast.get_docstring(node, clean=True)
    first = node.body[0]
    if doc and len(node.body) > 1:
        line = doc.strip().split("\n\n")[0].strip()  # first paragraph, on one line only
        if "\n" not in line and 12 <= len(line) <= 100 and '"""' not in line and "\\" not in line:
            summary = line
            start, end = first.lineno - node.lineno, first.end_lineno - node.lineno
            bare = "\n".join(lines[:start] + lines[end + 1:])
    return {"name": node.name, "qualname": qualname, "line": node.lineno, "source": source,
            "summary": summary, "bare": bare,
            "doc_lines": (first.lineno - node.lineno, first.end_lineno - node.lineno)
            if doc else None}


def _funcname_item(fn: dict[str, Any]) -> dict[str, Any] | None:
    name = fn["name"]
    if name.startswith("__") or len(name) < 4:
        return None
    masked = re.sub(rf"\b{re.escape(name)}\b", MASK, fn["source"])
    prompt = f"{masked}\n\n# The function {MASK} above is named: "
    return {"type": "generation", "prompt": prompt, "answer": name,
            "stop": ["\n", " ", "("], "max_new_tokens": 12, "metric": "exact_match"}


def _docstring_prompt(fn: dict[str, Any]) -> str:
    return f'{fn["bare"]}\n\n{fn["name"]}.__doc__ = """'


def _docstring_item(fn: dict[str, Any]) -> dict[str, Any] | None:
    if not fn["summary"]:
        return None
    return {"type": "generation", "prompt": _docstring_prompt(fn), "answer": fn["summary"],
            "stop": ['"""', "\n"], "max_new_tokens": 40, "metric": "rouge_l"}


def _nextline_item(fn: dict[str, Any], item_id: str) -> dict[str, Any] | None:
    lines = fn["source"].split("\n")
    skip = set(range(fn["doc_lines"][0], fn["doc_lines"][1] + 1)) if fn["doc_lines"] else set()
    cands = [k for k in range(1, len(lines))
             if k not in skip and len(lines[k].strip()) >= 6
             and not lines[k].strip().startswith("#")]
    if not cands:
        return None
    k = random.Random(_key(item_id)).choice(cands)
    target = lines[k]
    indent = target[: len(target) - len(target.lstrip())]
    prompt = "\n".join(lines[:k]) + "\n" + indent
    return {"type": "generation", "prompt": prompt, "answer": target.strip(),
            "stop": ["\n"], "max_new_tokens": 48, "metric": "exact_match"}


def _docstring_mc_items(cands: list[tuple[str, str, dict]], limit: int | None
                        ) -> list[dict[str, Any]]:
    """Multiple-choice items; distractors are summaries of other functions of the SAME split,
    picked among the 30 closest in length so that length is no cue."""
    pool = sorted({fn["summary"] for _, _, fn in cands}, key=lambda s: (len(s), s))
    lengths = [len(s) for s in pool]
    items: list[dict[str, Any]] = []
    for item_id, source, fn in cands:
        if limit is not None and len(items) >= limit:
            break
        answer = fn["summary"]
        mid = bisect.bisect_left(lengths, len(answer))
        window = pool[max(0, mid - 40):mid + 40]
        near = sorted((s for s in window if s.lower() != answer.lower()),
                      key=lambda s: (abs(len(s) - len(answer)), s))[:30]
        if len(near) < 3:
            continue
        rng = random.Random(_key(item_id))
        choices = rng.sample(near, 3) + [answer]
        rng.shuffle(choices)
        items.append({"id": item_id, "type": "multiple_choice",
                      "context": _docstring_prompt(fn),
                      "choices": [c + '"""' for c in choices],
                      "answer": choices.index(answer), "source": source})
    return items


def mine_tasks(names: Iterable[str] = BUILTIN_TASKS, data: Any = "stdlib", split: str = "val",
               val_fraction: float = 0.05, limit: int | None = 100
               ) -> dict[str, list[dict[str, Any]]]:
    """Mine built-in task sets from the documents of one corpus split.

    Args:
        names: built-in task names (see :data:`BUILTIN_TASKS`).
        data: corpus spec for :func:`slmkit.data.corpus.iter_documents`.
        split: ``"val"`` (default, for evaluation), ``"train"`` (e.g. fine-tuning data)
            or ``"all"``.
        val_fraction: validation share of the corpus split.
        limit: items kept per task (the lowest id hashes); None keeps all.

    Returns:
        ``{task name: [item, ...]}`` in the JSONL task format of :mod:`slmkit.eval.tasks`,
        each item with ``id``, ``source`` (document id) and ``split``.
    """
    from slmkit.data.corpus import iter_documents

    names = list(names)
    unknown = [n for n in names if n not in BUILTIN_TASKS]
    if unknown:
        raise ConfigError(f"Unknown built-in task '{unknown[0]}'; choose from "
                          f"{', '.join(BUILTIN_TASKS)} or pass a .jsonl file.")
    found: dict[str, list[tuple[str, str, dict]]] = {n: [] for n in names}
    for doc in iter_documents(data, split=split, val_fraction=val_fraction):
        for fn in iter_functions(doc.id, doc.text):
            base = f"{doc.id}:{fn['qualname']}:{fn['line']}"
            for name in names:
                item_id = f"{name}/{base}"
                if name == "stdlib-docstring-mc":
                    if fn["summary"]:
                        found[name].append((item_id, doc.id, fn))
                    continue
                item = {"stdlib-funcname": _funcname_item,
                        "stdlib-docstring": _docstring_item}.get(name)
                made = item(fn) if item else _nextline_item(fn, item_id)
                if made is not None:
                    found[name].append((item_id, doc.id, made))
    out: dict[str, list[dict[str, Any]]] = {}
    for name, cands in found.items():
        cands.sort(key=lambda c: (_key(c[0]), c[0]))
        if name == "stdlib-docstring-mc":
            items = _docstring_mc_items(cands, limit)
        else:
            items = [{"id": i, **made, "source": src} for i, src, made in cands]
        out[name] = [{**it, "split": split} for it in items[:limit]]
    return out
