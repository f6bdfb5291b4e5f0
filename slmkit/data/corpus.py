"""Corpora: turn a ``--data`` spec into a stream of documents.

A spec is one string (or a list of them), each of:

* ``"stdlib"``: the built-in corpus, the Python standard library's own source without its
  test folders, plus the pydoc topics. Ids are ``"stdlib:<path relative to the stdlib
  root>"`` (e.g. ``"stdlib:json/decoder.py"``) and ``"stdlib:pydoc_topics/<topic>"``.
* ``"stdlib-prose"``: the built-in English prose: the docstrings of those same files (one
  document per file, doctest lines and one-liners dropped) and the pydoc topics. A file's
  prose has the id of its source, so both corpora put it in the same split: nothing of the
  prose validation split is in the code's training split, and the other way round.
* a text file (``.txt``, ``.md``, ``.py``, ...): one document; files above
  :data:`CHUNK_BYTES` are cut at line boundaries into documents ``"<path>#<n>"`` so that a
  file larger than RAM still streams with bounded memory.
* a ``.jsonl`` file: one document per line, with a ``text`` field, ``prompt``/``completion``
  fields, or chat ``messages`` (OpenAI format, tool calls and results included, with the
  row's ``tools`` list). Ids are ``"<path>:<line>"``.
* a directory (all files below it, recursively, hidden ones skipped) or a glob.

Everything is streamed file by file; nothing joins the corpus into one string. Binary
files are skipped and counted; non-UTF-8 text is decoded with replacement characters and
counted, or refused when more than :data:`MAX_BAD_FRACTION` of a file is affected.
"""

from __future__ import annotations

import codecs
import glob as globlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.data.split import check_split, check_val_fraction, in_split
from slmkit.errors import DataError

#: Text files above this size are cut into documents of about this many bytes.
CHUNK_BYTES = 4 << 20
#: Share of a file's characters that may be undecodable before the file is refused.
MAX_BAD_FRACTION = 0.01
#: Folders left out of the stdlib corpus (tests, installed packages, caches).
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                    "__pycache__"}
_SNIFF_BYTES = 8192
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        id: stable id; the train/val split is a hash of it.
        text: the document as one string (what pretraining and tokenizer training read).
        prompt: for ``prompt``/``completion`` JSONL rows, the prompt part; ``text`` is then
            ``prompt + completion`` and SFT can mask the prompt tokens.
        messages: for chat JSONL rows, the ``[{"role", "content"}, ...]`` list; ``text`` is
            then the ChatML rendering of it. Rows with tool calls keep the OpenAI messages
            (``tool_calls``, ``role: "tool"``); their text is rendered with the generic tool
            format of :mod:`slmkit.engine.tools`.
        tools: the OpenAI ``tools`` list of such a row (None otherwise).
        where: where it came from, for messages (``/data/chat.jsonl line 3``); ids of
            files are relative to the corpus directory, so this is the full path.
    """

    id: str
    text: str
    prompt: str | None = None
    messages: list | None = None
    tools: list | None = None
    where: str = field(default="", compare=False)


@dataclass
class CorpusStats:
    """What a pass over a corpus saw; filled in by :func:`iter_documents`."""

    files: int = 0
    documents: int = 0          # documents in the corpus, before the split
    yielded: int = 0            # documents of the requested split
    chars: int = 0              # characters in the yielded documents
    bytes: int = 0              # UTF-8 bytes in the yielded documents
    skipped_binary: int = 0
    skipped_empty: int = 0
    replaced_files: int = 0     # non-UTF-8 files decoded with replacement characters
    replaced_chars: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def note_skip(self, path: str) -> None:
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(path)

    def summary_rows(self) -> list[tuple[str, str]]:
        """Key/value rows for a result table (what was read and what was skipped)."""
        rows = [("documents", f"{self.yielded:,} of {self.documents:,} "
                              f"({self.files:,} files)"),
                ("text", f"{self.bytes:,} bytes")]
        if self.skipped_binary:
            rows.append(("skipped (binary)", f"{self.skipped_binary:,} files, e.g. "
                                             f"{', '.join(self.skipped_examples[:2])}"))
        if self.skipped_empty:
            rows.append(("skipped (empty)", f"{self.skipped_empty:,}"))
        if self.replaced_files:
            rows.append(("non-UTF-8 (replaced)", f"{self.replaced_files:,} files, "
                                                 f"{self.replaced_chars:,} characters"))
        return rows


def stdlib_root() -> Path:
    """The directory holding the running Python's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_documents(spec: str | list[str], split: str = "all", val_fraction: float = 0.05,
                   stats: CorpusStats | None = None) -> Iterator[Document]:
    """Stream the documents of a corpus, in a deterministic order.

    Args:
        spec: ``"stdlib"``, a file, a directory, a glob or a ``.jsonl`` file, or a list.
        split: ``"all"``, ``"train"`` or ``"val"`` (see :mod:`slmkit.data.split`).
        val_fraction: share of documents held out for validation.
        stats: filled in while iterating (files, documents, skipped, replaced).

    Yields:
        :class:`Document` objects of the requested split.

    Raises:
        DataError: a path that does not exist, a glob matching nothing, malformed JSONL
            (naming file and line), a file with too much undecodable text, or a corpus
            with no documents at all.
    """
    check_split(split)
    val_fraction = check_val_fraction(val_fraction)
    stats = stats if stats is not None else CorpusStats()
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise DataError("--data is empty; pass 'stdlib', a file, a directory, a glob or a "
                        ".jsonl file.")
    sources = [_resolve(os.fspath(s)) for s in specs]   # fail fast before streaming
    for source in sources:
        for doc in source(stats):
            stats.documents += 1
            if in_split(doc.id, split, val_fraction):
                stats.yielded += 1
                stats.chars += len(doc.text)
                stats.bytes += len(doc.text.encode("utf-8", errors="replace"))
                yield doc
    if stats.documents == 0:
        raise DataError(f"The corpus '{_describe(specs)}' has no documents (all files are "
                        "empty or binary); point --data at text files.")


def _describe(specs: list) -> str:
    """The corpus as the user named it: one path whole (its file name is what they need),
    a long list shortened."""
    text = ", ".join(os.fspath(s) for s in specs)
    return text if len(specs) == 1 or len(text) < 80 else text[:77] + "..."


def _resolve(spec: str):
    """Turn one spec string into a function ``stats -> Iterator[Document]``."""
    if spec == "stdlib":
        return _stdlib_documents
    if spec == "stdlib-prose":
        return _stdlib_prose_documents
    if any(c in _GLOB_CHARS for c in spec) and not Path(spec).exists():
        matches = sorted(p for p in globlib.glob(os.path.expanduser(spec), recursive=True)
                         if Path(p).is_file())
        if not matches:
            raise DataError(f"The glob '{spec}' matches no files; check the pattern (quote it "
                            "so the shell does not expand it).")
        return lambda stats: _files_documents([Path(p) for p in matches], stats, None)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in _walk(path))
        return lambda stats: _files_documents(files, stats, path)
    if path.is_file():
        return lambda stats: _files_documents([path], stats, path.parent)
    raise DataError(f"--data '{spec}' does not exist; pass 'stdlib', an existing file, a "
                    "directory, a glob or a .jsonl file.")


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _files_documents(files: list[Path], stats: CorpusStats,
                     root: Path | None) -> Iterator[Document]:
    """Documents of ``files``. Their ids (which decide the train/validation split) are
    paths relative to ``root`` (the directory given, or a single file's folder), so a
    corpus splits the same wherever it is copied; glob matches keep the matched path."""
    for path in files:
        name = path.relative_to(root).as_posix() if root is not None else str(path)
        if path.suffix.lower() == ".jsonl":
            stats.files += 1
            yield from _jsonl_documents(path, stats, name)
        else:
            yield from _text_documents(path, name, stats)


# --------------------------------------------------------------------------- text files

def _text_documents(path: Path, doc_id: str, stats: CorpusStats,
                    strict_limit: bool = True) -> Iterator[Document]:
    """One text file as one document, or as line-aligned chunks when it is large.

    Binary files (a NUL byte in the first 8 KiB) are skipped and counted. Undecodable bytes
    become U+FFFD; above :data:`MAX_BAD_FRACTION` of the file the file is refused
    (``strict_limit``) or skipped.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"Cannot read '{path}' ({e.strerror}); check its permissions.") from None
    with f:
        head = f.read(_SNIFF_BYTES)
        if b"\x00" in head:
            stats.skipped_binary += 1
            stats.note_skip(str(path))
            return
        stats.files += 1
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        chunk_index, pending, bad, total, data = 0, "", 0, 0, head
        while True:
            more = f.read(min(1 << 20, max(CHUNK_BYTES, 4096)))
            text = decoder.decode(data, final=not more)
            bad += text.count("\ufffd")
            total += len(text)
            pending += text
            if bad > MAX_BAD_FRACTION * total and total >= 100:
                if strict_limit:
                    raise DataError(
                        f"'{path}' is not UTF-8 text ({bad:,} of {total:,} characters cannot "
                        "be decoded); convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) "
                        "or remove it from --data.")
                stats.skipped_binary += 1
                stats.note_skip(str(path))
                return
            # Emit documents of about CHUNK_BYTES cut after a line break; at EOF, the rest.
            while pending and (len(pending) >= CHUNK_BYTES or not more):
                cut = (pending.rfind("\n", 0, CHUNK_BYTES) + 1 or CHUNK_BYTES) if more \
                    else len(pending)
                piece, pending = pending[:cut], pending[cut:]
                chunked = chunk_index > 0 or bool(more) or bool(pending)   # cut: "#n" ids
                if piece.strip():
                    yield Document(f"{doc_id}#{chunk_index}" if chunked else doc_id, piece,
                                   where=str(path))
                    chunk_index += 1
            if not more:
                break
            data = more
        if chunk_index == 0:
            stats.skipped_empty += 1
        if bad:
            stats.replaced_files += 1
            stats.replaced_chars += bad


# --------------------------------------------------------------------------- JSONL

def _jsonl_documents(path: Path, stats: CorpusStats, name: str) -> Iterator[Document]:
    """One document per JSONL line: ``text``, ``prompt``/``completion`` or ``messages``."""
    try:
        f = open(path, encoding="utf-8", errors="strict")
    except OSError as e:
        raise DataError(f"Cannot read '{path}' ({e.strerror}); check its permissions.") from None
    with f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise DataError(f"{path} line {lineno + 1} is not UTF-8; re-save the file "
                                "as UTF-8.") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg} at column "
                                f"{e.colno}); fix or remove that line.") from None
            doc = _row_document(row, f"{name}:{lineno}", path, lineno)
            if doc.text.strip():
                yield doc
            else:
                stats.skipped_empty += 1


def _row_document(row, doc_id: str, path: Path, lineno: int) -> Document:
    where = f"{path} line {lineno}"
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}, not an object; each line "
                        "needs a 'text', 'prompt'/'completion' or 'messages' field.")
    if "tools" in row and "messages" not in row:
        raise DataError(f"{where} has 'tools' without 'messages'; tool rows are OpenAI-format "
                        "conversations: add 'messages'.")
    if "text" in row:
        if not isinstance(row["text"], str):
            raise DataError(f"{where} has a non-string 'text' field; make it a string.")
        return Document(doc_id, row["text"], where=where)
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where} has a non-string 'prompt' or 'completion'; make both "
                            "strings.")
        return Document(doc_id, prompt + completion, prompt=prompt, where=where)
    if "messages" in row and _is_tool_row(row):
        return _tool_row_document(row, doc_id, where)
    if "messages" in row:
        messages = row["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)
        if not ok:
            raise DataError(f"{where} has a malformed 'messages' field; it must be a non-empty "
                            'list of {"role": ..., "content": ...} objects with string values.')
        return Document(doc_id, render_chatml(messages), messages=messages, where=where)
    raise DataError(f"{where} has none of the fields 'text', 'prompt'+'completion' or "
                    f"'messages' (found: {', '.join(sorted(row)) or 'none'}); add one.")


def _is_tool_row(row: dict) -> bool:
    msgs = row["messages"] if isinstance(row["messages"], list) else []
    return "tools" in row or any(isinstance(m, dict) and (m.get("tool_calls") or
                                                          m.get("role") == "tool")
                                 for m in msgs)


def _tool_row_document(row: dict, doc_id: str, where: str) -> Document:
    """A conversation with tool calls and results (OpenAI format, ``tools`` per row),
    checked and rendered with the generic tool format the server prompts with
    (:func:`slmkit.engine.tools.conversation`)."""
    from slmkit.engine.tools import ToolFormatError, conversation, parse_tools

    messages = row["messages"]
    fix = ('write OpenAI-format messages: {"role", "content"}, an assistant\'s '
           '"tool_calls" and a tool message\'s "tool_call_id"')
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where} has a malformed 'messages' field; {fix}.")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(content, str) or (content is None and m.get("tool_calls"))):
            raise DataError(f"{where} has a malformed message {i} (a string 'role' and "
                            f"string 'content', null only next to 'tool_calls'); {fix}.")
    try:
        tools = parse_tools(row["tools"]) if "tools" in row else None
        rendered = conversation(messages, tools)
    except ToolFormatError as e:
        raise DataError(f"{where} has a bad '{e.param}': {e}.") from None
    return Document(doc_id, render_chatml(rendered), messages=messages,
                    tools=row.get("tools"), where=where)


def render_chatml(messages: list[dict]) -> str:
    """Render chat messages as ChatML text (the template :mod:`slmkit.models.tokenizer` uses)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


# --------------------------------------------------------------------------- stdlib

def _stdlib_files() -> Iterator[tuple[Path, str]]:
    """``(path, relative posix path)`` of the stdlib's ``.py`` files, sorted, test folders
    and the pydoc topics module skipped."""
    root = stdlib_root()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = (rel_dir / name).as_posix()
            if rel == "pydoc_data/topics.py":   # its content comes as topic documents
                continue
            yield Path(dirpath) / name, rel


def _pydoc_topics(stats: CorpusStats) -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        return
    for name in sorted(topics):
        stats.files += 1
        yield Document(f"stdlib:pydoc_topics/{name}", topics[name])


def _stdlib_documents(stats: CorpusStats) -> Iterator[Document]:
    """The stdlib's ``.py`` files (sorted, test folders skipped), then the pydoc topics."""
    for path, rel in _stdlib_files():
        yield from _text_documents(path, f"stdlib:{rel}", stats, strict_limit=False)
    yield from _pydoc_topics(stats)


#: A docstring paragraph is prose when it has at least this many words.
PROSE_MIN_WORDS = 8


def docstring_prose(source: str) -> str:
    """The English prose of a Python file: its docstrings' paragraphs of at least
    :data:`PROSE_MIN_WORDS` words, without doctest lines, joined by blank lines."""
    import ast
    import inspect

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    paragraphs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            continue
        for para in inspect.cleandoc(doc).split("\n\n"):
            lines = [ln for ln in para.splitlines()
                     if not ln.lstrip().startswith((">>>", "... "))]
            text = "\n".join(lines).strip()
            if len(text.split()) >= PROSE_MIN_WORDS:
                paragraphs.append(text)
    return "\n\n".join(paragraphs)


#: Bump when :func:`docstring_prose` changes what it extracts (invalidates the cache).
PROSE_VERSION = 1


def _stdlib_prose_documents(stats: CorpusStats) -> Iterator[Document]:
    """The docstring prose of every stdlib file (same ids as ``stdlib``), then the pydoc
    topics.

    Parsing every stdlib file takes seconds, and every calibration or evaluation on this
    corpus streams it (once to hash it, once to tokenize), so the extracted prose is kept
    in ``$SLMKIT_CACHE_DIR/corpus``, keyed by the Python version, the extractor version and
    every file's path, size and mtime: any change of the stdlib makes a new file.
    """
    import hashlib
    import sys
    import tempfile

    from slmkit.data.tokens import cache_root

    files = list(_stdlib_files())
    key = hashlib.sha256(f"{PROSE_VERSION}\0{sys.version}\0{stdlib_root()}".encode())
    for path, rel in files:
        st = path.stat()
        key.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    cached = cache_root() / "corpus" / f"stdlib-prose-{key.hexdigest()[:16]}.jsonl"
    stats.files += len(files)
    if cached.is_file():
        with open(cached, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                yield Document(row["id"], row["text"])
    else:
        docs = []
        for path, rel in files:
            text = docstring_prose(path.read_text(encoding="utf-8", errors="replace"))
            if text:
                docs.append(Document(f"stdlib:{rel}", text))
        try:                             # written whole or not at all (temp file + rename)
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".prose.", dir=cached.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                for d in docs:
                    fh.write(json.dumps({"id": d.id, "text": d.text}) + "\n")
            os.replace(tmp, cached)
        except OSError:                  # a read-only cache only costs the parsing again
            pass
        yield from docs
    yield from _pydoc_topics(stats)
