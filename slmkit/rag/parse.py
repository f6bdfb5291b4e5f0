"""Read a document into structural sections: headings, paragraphs, functions, pages.

Each reader returns :class:`Section` objects that know where they came from (1-based line
range, or the page for PDF) and the heading path above them, so that a citation can point
at ``guide.md:40-52 (Install > From source)`` or ``json/decoder.py:332-345
(JSONDecoder.decode)``.

* Markdown (``.md``, ``.markdown``): ATX headings (``#``...) outside code fences.
* reStructuredText (``.rst``): a title line underlined (and optionally overlined) with a
  repeated punctuation character; the heading level is the order the styles first appear.
* HTML (``.html``, ``.htm``): the text of the page split at ``<h1>``..``<h6>``, scripts
  and styles dropped (the standard library's :mod:`html.parser`, which tolerates broken
  markup).
* Python (``.py``): the module docstring and every top-level function and class; a class
  longer than the chunk cap is cut into its header and each method (:mod:`ast`).
* PDF (``.pdf``): one section per page, text extracted by pypdf.
* Anything else that decodes as text (``.txt``, ``.rst`` without headings, ...): one
  section, which the chunker cuts at blank lines.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from slmkit.errors import DataError

#: Suffixes the indexer reads; other files in a folder are skipped and counted.
SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".py", ".pdf", ".text"}


@dataclass
class Section:
    """A structural piece of a document.

    Attributes:
        text: the section's text (for Python, the source lines).
        heading: the heading path, ``"A > B"`` (``""`` at the top of a file).
        start_line, end_line: 1-based inclusive line range in the file (PDF: 0).
        page: 1-based page number for PDF, else 0.
    """

    text: str
    heading: str
    start_line: int
    end_line: int
    page: int = 0


def read_sections(path: Path, cap: int) -> list[Section]:
    """The sections of one file, by its suffix (``cap``: the chunk size in characters,
    so a long Python class is cut into methods)."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _pdf_sections(path)
    text = read_text(path)
    if suffix in (".md", ".markdown"):
        return _markdown_sections(text)
    if suffix == ".rst":
        return _rst_sections(text)
    if suffix in (".html", ".htm"):
        return _html_sections(text)
    if suffix == ".py":
        return _python_sections(text, cap, path)
    return [Section(text, "", 1, text.count("\n") + 1)] if text.strip() else []


def read_text(path: Path) -> str:
    """A text file as UTF-8 (undecodable bytes replaced); a binary file is refused."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise DataError(f"'{path}' is a binary file; index text, Markdown, HTML, "
                        "reStructuredText, Python or PDF files.")
    return data.decode("utf-8", errors="replace")


def _heading_path(stack: list[tuple[int, str]]) -> str:
    return " > ".join(title for _, title in stack)


def _push(stack: list[tuple[int, str]], level: int, title: str) -> None:
    while stack and stack[-1][0] >= level:
        stack.pop()
    stack.append((level, title))


def _split_at(lines: list[str], marks: list[tuple[int, int, int, str]]) -> list[Section]:
    """Sections from heading marks ``(first_line_idx, body_idx, level, title)`` (0-based),
    each section running from its heading to the next one."""
    out, stack = [], []
    bounds = [(0, 0, 0, "")] + marks
    for i, (start, _, level, title) in enumerate(bounds):
        if level:
            _push(stack, level, title)
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(lines)
        body = "\n".join(lines[start:end])
        if body.strip():
            out.append(Section(body, _heading_path(stack), start + 1, end))
    return out


_ATX = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _markdown_sections(text: str) -> list[Section]:
    lines = text.split("\n")
    marks, fenced = [], False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _ATX.match(line)
        if m:
            marks.append((i, i + 1, len(m.group(1)), m.group(2).strip()))
    return _split_at(lines, marks)


_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>:.!_])\1{2,}\s*$")


def _rst_sections(text: str) -> list[Section]:
    lines = text.split("\n")
    marks, styles = [], []
    i = 0
    while i + 1 < len(lines):
        title, under = lines[i].rstrip(), lines[i + 1].rstrip()
        if (title.strip() and not _RST_UNDERLINE.match(title) and _RST_UNDERLINE.match(under)
                and len(under) >= len(title.strip())):
            over = i > 0 and lines[i - 1].rstrip() == under
            style = (under[0], over)
            if style not in styles:
                styles.append(style)
            start = i - 1 if over else i
            marks.append((start, i + 2, styles.index(style) + 1, title.strip()))
            i += 2
            continue
        i += 1
    return _split_at(lines, marks)


class _HtmlText(HTMLParser):
    """Collects text with line numbers and the heading marks of ``h1``..``h6``."""

    _SKIP = {"script", "style", "head", "noscript", "template"}
    _BLOCK = {"p", "div", "li", "br", "tr", "pre", "section", "article", "table", "ul", "ol",
              "dd", "dt", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pieces: list[tuple[int, str]] = []      # (line, text)
        self.marks: list[tuple[int, int, str]] = []  # (piece index, level, title)
        self._skip = 0
        self._heading: tuple[int, list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skip += 1
        elif tag in self._BLOCK:
            self.pieces.append((self.getpos()[0], "\n"))
        if len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._heading = (int(tag[1]), [])
            self.marks.append((len(self.pieces), int(tag[1]), ""))

    def handle_endtag(self, tag):
        if tag in self._SKIP and self._skip:
            self._skip -= 1
        elif self._heading and tag == f"h{self._heading[0]}":
            idx, level, _ = self.marks[-1]
            self.marks[-1] = (idx, level, " ".join("".join(self._heading[1]).split()))
            self._heading = None
            self.pieces.append((self.getpos()[0], "\n"))

    def handle_data(self, data):
        if self._skip:
            return
        self.pieces.append((self.getpos()[0], data))
        if self._heading:
            self._heading[1].append(data)


def _html_sections(text: str) -> list[Section]:
    parser = _HtmlText()
    parser.feed(text)
    parser.close()
    pieces, out, stack = parser.pieces, [], []
    bounds = [(0, 0, "")] + parser.marks
    for i, (start, level, title) in enumerate(bounds):
        if level:
            _push(stack, level, title or "(untitled)")
        end = bounds[i + 1][0] if i + 1 < len(bounds) else len(pieces)
        part = pieces[start:end]
        body = re.sub(r"\n\s*\n\s*", "\n\n", re.sub(r"[ \t]+", " ", "".join(t for _, t in part)))
        if body.strip():
            out.append(Section(body.strip(), _heading_path(stack), part[0][0], part[-1][0]))
    return out


def _python_sections(text: str, cap: int, path: Path) -> list[Section]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):   # not valid Python: index it as plain text
        return [Section(text, "", 1, text.count("\n") + 1)] if text.strip() else []
    lines = text.split("\n")
    module = path.stem

    def span(node) -> tuple[int, int]:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return first, node.end_lineno

    def piece(a: int, b: int, heading: str) -> Section | None:
        body = "\n".join(lines[a - 1:b])
        return Section(body, heading, a, b) if body.strip() else None

    out: list[Section | None] = []
    cursor = 1                       # first line not yet in a section
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if not isinstance(node, defs):
            continue
        a, b = span(node)
        if a > cursor:                # imports, constants, the module docstring
            out.append(piece(cursor, a - 1, module))
        name = node.name
        body_chars = sum(len(x) + 1 for x in lines[a - 1:b])
        methods = [n for n in node.body if isinstance(n, defs)] \
            if isinstance(node, ast.ClassDef) else []
        if body_chars > cap and methods:
            inner = a
            for m in methods:
                ma, mb = span(m)
                if ma > inner:
                    out.append(piece(inner, ma - 1, f"{module}.{name}"))
                out.append(piece(ma, mb, f"{module}.{name}.{m.name}"))
                inner = mb + 1
            if b >= inner:
                out.append(piece(inner, b, f"{module}.{name}"))
        else:
            out.append(piece(a, b, f"{module}.{name}"))
        cursor = b + 1
    if cursor <= len(lines):
        out.append(piece(cursor, len(lines), module))
    return [s for s in out if s is not None]


def _pdf_sections(path: Path) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, OSError) as e:
        raise DataError(f"'{path}' is not a readable PDF ({e}); fix or remove the file.") \
            from None
    return [Section(text, f"page {i}", 0, 0, page=i)
            for i, text in enumerate(pages, 1) if text.strip()]
