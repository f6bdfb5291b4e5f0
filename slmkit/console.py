"""Console output, progress bars, result tables and logging, configured in one place.

Library code reports through :func:`progress` and :func:`print_table`; the CLI decides
whether anything is shown (``--quiet``) and how logs look (``--debug``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

T = TypeVar("T")

def _width(stream) -> int | None:
    """Terminal width in a terminal; in logs and pipes, COLUMNS or a roomy 160 (not 80),
    so wide result tables do not wrap."""
    import os

    if stream.isatty() or os.environ.get("COLUMNS"):
        return None
    return 160


#: Results and tables go to stdout; progress, logs and errors go to stderr.
console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))
_state = {"quiet": False}

log = logging.getLogger("slmkit")


def configure(quiet: bool = False, debug: bool = False) -> None:
    """Set verbosity for the whole process. Called once by the CLI."""
    _state["quiet"] = quiet
    console.quiet = quiet
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    log.handlers.clear()
    handler = RichHandler(console=err_console, show_path=debug, show_time=debug, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    quiet_libraries()


def quiet_libraries() -> None:
    """Silence transformers/hub progress bars and advisories: slmkit shows its own."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def is_quiet() -> bool:
    return _state["quiet"]


def make_progress(transient: bool = False) -> Progress:
    """A rich progress bar with rate-independent columns: done/total, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err_console,
        transient=transient,
        # Live bars need a terminal; elsewhere they only leave blank lines behind.
        disable=is_quiet() or not err_console.is_terminal,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (hidden when quiet or when stderr is not a terminal)."""
    if total is None and isinstance(items, Sequence):
        total = len(items)
    with make_progress(transient=True) as prog:
        task = prog.add_task(description, total=total, info="")
        for item in items:
            yield item
            prog.advance(task)


@contextmanager
def progress(description: str, total: int | None):
    """Context manager yielding ``update(advance=1, **info)`` for a single-task bar."""
    with make_progress(transient=True) as prog:
        task = prog.add_task(description, total=total, info="")

        def update(advance: float = 1, info: str = "") -> None:
            prog.update(task, advance=advance, info=info)

        yield update


def print_table(title: str, rows: Sequence[tuple[str, Any]] | Sequence[Sequence[Any]],
                header: Sequence[str] | None = None) -> None:
    """Print a small result table to stdout (key/value pairs when ``header`` is None)."""
    table = Table(title=title, title_justify="left", show_header=header is not None)
    cols = header or ("", "")
    for i, name in enumerate(cols):
        numeric = header is not None and i > 0 and all(
            isinstance(row[i], (int, float)) or row[i] in (None, "")
            for row in rows if i < len(row))
        table.add_column(str(name), style="bold" if i == 0 and header is None else None,
                         justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
