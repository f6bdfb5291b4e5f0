"""Cut sections into chunks: at paragraphs, then lines, then characters, with overlap.

A section (a heading's body, a function, a PDF page) that fits the cap is one chunk. A
longer one is packed greedily from its paragraphs (blank-line separated); a paragraph
longer than the cap is packed from its lines, and a line longer than the cap is cut into
pieces. Each new chunk starts with the tail of the previous one, up to ``overlap``
characters of whole units, so a sentence that straddles a boundary is found from both
sides. Every chunk keeps the 1-based line range it covers.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmkit.rag.parse import Section


@dataclass
class Chunk:
    """One retrievable piece of a document (what the store keeps and a citation names)."""

    text: str
    heading: str
    start_line: int
    end_line: int
    page: int = 0

    def location(self, path: str) -> str:
        """``path:12-30 (Heading)`` or ``path p.3`` for PDF pages."""
        where = f"{path} p.{self.page}" if self.page else (
            f"{path}:{self.start_line}" + (f"-{self.end_line}"
                                           if self.end_line > self.start_line else ""))
        heading = self.heading if not self.page else ""
        return f"{where} ({heading})" if heading else where


def _units(section: Section, cap: int) -> list[tuple[int, int, str]]:
    """``(first_line, last_line, text)`` units no longer than ``cap``: paragraphs, or the
    lines of an over-long paragraph, or pieces of an over-long line."""
    lines = section.text.split("\n")
    base = section.start_line or 1
    paragraphs, current = [], []
    for i, line in enumerate(lines):
        if line.strip():
            current.append((base + i, line))
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    out = []
    for para in paragraphs:
        text = "\n".join(t for _, t in para)
        if len(text) <= cap:
            out.append((para[0][0], para[-1][0], text))
            continue
        for n, line in para:
            for k in range(0, len(line), cap):
                out.append((n, n, line[k:k + cap]))
    return out


def _sep(a: tuple[int, int, str], b: tuple[int, int, str]) -> str:
    """What stood between two consecutive units in the file: nothing (pieces of one
    line), a newline, or a blank line."""
    return "" if b[0] == a[1] else "\n" if b[0] == a[1] + 1 else "\n\n"


def _join(units: list[tuple[int, int, str]]) -> str:
    return units[0][2] + "".join(_sep(a, b) + b[2] for a, b in zip(units, units[1:]))


def chunk_section(section: Section, cap: int, overlap: int) -> list[Chunk]:
    """The chunks of one section (see the module docstring)."""
    page = section.page

    def make(units: list[tuple[int, int, str]]) -> Chunk:
        first, last = (0, 0) if page else (units[0][0], units[-1][1])
        return Chunk(_join(units), section.heading, first, last, page)

    if len(section.text) <= cap:
        text = section.text.strip("\n")
        return [Chunk(text, section.heading, section.start_line, section.end_line, page)] \
            if text.strip() else []
    chunks, pack = [], []
    for unit in _units(section, cap):
        if pack and len(_join(pack + [unit])) > cap:
            chunks.append(make(pack))
            tail = []
            for u in reversed(pack):
                if len(_join([u] + tail)) > overlap or len(_join([u] + tail + [unit])) > cap:
                    break
                tail.insert(0, u)
            pack = tail
        pack.append(unit)
    if pack:
        chunks.append(make(pack))
    return chunks


def chunk_sections(sections: list[Section], cap: int, overlap: int) -> list[Chunk]:
    """All chunks of a document, in reading order."""
    return [c for s in sections for c in chunk_section(s, cap, overlap)]
