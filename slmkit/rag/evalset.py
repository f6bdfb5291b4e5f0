"""Question sets for ``slm rag eval``: the built-in one, mined from the stdlib, and users'.

**The built-in set** needs no download. Its documents are the source files of
:data:`CORPUS_MODULES`, standard library modules of the running Python. Its questions are
mined from the docstrings of their public top-level functions:
"Which function in module M does this: <the docstring's first sentence>" with the
function's name as the answer and the docstring's lines as the gold source. The
out-of-corpus questions have the same form but come from :data:`HELD_OUT_MODULES`, which
are not indexed, so the right reply is "I don't know". Selection is deterministic (every
function in a sorted order, then an even thinning to the set's size).

**A user's set** is a JSONL file, one question per line::

    {"question": "...", "answer": "...", "sources": ["docs/a.md", "src/b.py:10-30"]}
    {"question": "...", "answer": null}          # not in the documents: expect abstention

``sources`` are paths as the index shows them (relative to where ``slm rag index`` ran,
or absolute) with an optional line range; a chunk is relevant when its file matches and
its lines overlap the range.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.errors import DataError

#: Indexed stdlib modules of the built-in set (paths relative to the stdlib root).
CORPUS_MODULES = (
    "base64.py", "bisect.py", "calendar.py", "colorsys.py", "copy.py", "difflib.py",
    "filecmp.py", "fnmatch.py", "fractions.py", "functools.py", "glob.py", "gzip.py",
    "heapq.py", "html/__init__.py", "ipaddress.py", "json/__init__.py", "linecache.py",
    "posixpath.py", "pprint.py", "quopri.py", "random.py", "secrets.py", "shlex.py",
    "shutil.py", "statistics.py", "string.py", "tempfile.py", "textwrap.py",
    "urllib/parse.py",
)
#: Modules whose functions make the out-of-corpus questions (never indexed).
HELD_OUT_MODULES = (
    "ast.py", "codecs.py", "contextlib.py", "csv.py", "dis.py", "getpass.py", "gettext.py",
    "locale.py", "mimetypes.py", "platform.py", "sysconfig.py", "tarfile.py", "timeit.py",
    "tokenize.py", "traceback.py", "warnings.py", "webbrowser.py",
)


@dataclass
class Gold:
    """A gold source: a file (absolute or as displayed) and an optional line range."""

    path: str
    start: int = 0
    end: int = 0

    def matches(self, path: str, display: str, start: int, end: int) -> bool:
        same = path == self.path or display == self.path or (
            not Path(self.path).is_absolute() and path.endswith("/" + self.path))
        if not same:
            return False
        return not self.start or (start <= self.end and end >= self.start)


@dataclass
class Question:
    question: str
    answer: str | None                  # None: not in the documents
    sources: list[Gold] = field(default_factory=list)

    @property
    def answerable(self) -> bool:
        return self.answer is not None


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m.group(1) if m else text).strip()


def mine(path: Path, module: str) -> list[tuple[str, str, int, int]]:
    """``(function name, first sentence, docstring first line, last line)`` of the public,
    documented top-level functions of one file, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if node.name.startswith("_") or not doc:
            continue
        sentence = _first_sentence(doc)
        if len(sentence.split()) < 5 or len(sentence) > 200:
            continue
        first = node.body[0]
        out.append((node.name, sentence, first.lineno, first.end_lineno))
    return out


def _thin(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 \
        else items[:1]


def module_name(rel: str) -> str:
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def builtin_questions(root: Path, answerable: int = 60, held_out: int = 20) -> list[Question]:
    """The built-in question set over the stdlib at ``root`` (see the module docstring)."""
    def questions(modules, n, in_corpus):
        rows = []
        for rel in modules:
            path = root / rel
            if not path.is_file():
                continue
            mod = module_name(rel)
            for name, sentence, a, b in mine(path, mod):
                q = f"Which function in module {mod} does this: {sentence}"
                rows.append(Question(q, name if in_corpus else None,
                                     [Gold(str(path.resolve()), a, b)] if in_corpus else []))
        return _thin(rows, n)

    out = questions(CORPUS_MODULES, answerable, True) + \
        questions(HELD_OUT_MODULES, held_out, False)
    if not out:
        raise DataError(f"No stdlib modules found under '{root}'; the built-in RAG set needs "
                        "the Python standard library's source files.")
    return out


def corpus_files(root: Path) -> list[str]:
    """The built-in set's documents (the indexed stdlib files that exist here)."""
    return [str(root / rel) for rel in CORPUS_MODULES if (root / rel).is_file()]


def load_questions(path: str) -> list[Question]:
    """A user's JSONL question set (see the module docstring); errors name file and line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"--questions '{path}' does not exist; pass a JSONL file of "
                        "questions.")
    out = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path} line {lineno} is not JSON ({e.msg}); fix that line.") \
                from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                or not row["question"].strip():
            raise DataError(f"{path} line {lineno} has no 'question' string; give each line "
                            "{\"question\": ..., \"answer\": ..., \"sources\": [...]}.")
        unknown = sorted(set(row) - {"question", "answer", "sources"})
        if unknown:
            raise DataError(f"{path} line {lineno} has unknown field(s) {', '.join(unknown)}; "
                            "use question, answer and sources.")
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise DataError(f"{path} line {lineno}: 'answer' must be a string or null.")
        sources = row.get("sources") or []
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise DataError(f"{path} line {lineno}: 'sources' must be a list of 'path' or "
                            "'path:START-END' strings.")
        out.append(Question(row["question"], answer, [_gold(s, path, lineno)
                                                      for s in sources]))
    if not out:
        raise DataError(f"--questions '{path}' has no questions.")
    return out


def _gold(spec: str, path: str, lineno: int) -> Gold:
    m = re.fullmatch(r"(.+?):(\d+)(?:-(\d+))?", spec)
    if not m:
        return Gold(spec)
    start = int(m.group(2))
    end = int(m.group(3) or start)
    if end < start:
        raise DataError(f"{path} line {lineno}: source '{spec}' ends before it starts.")
    return Gold(m.group(1), start, end)
