"""``slm rag index``: build an index of local documents, or bring one up to date.

A new index is written into a temp directory and renamed into place when it is complete.
An existing index is updated: files are compared with what the index recorded (size and
modification time, then the SHA-256 of the content when those differ), and only the added
and edited files are parsed, chunked and embedded; deleted files are dropped. The update
is one SQLite transaction, so an interruption leaves the previous index as it was. The
index mirrors the DOCS of its latest run: a file it holds that is not among them any more
counts as deleted.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.data.corpus import _walk
from slmkit.errors import ConfigError, DataError, OutputError
from slmkit.rag.chunk import chunk_sections
from slmkit.rag.config import IndexConfig
from slmkit.rag.parse import SUFFIXES, read_sections
from slmkit.rag.store import MANIFEST, Lexical, Store, is_index, search_text
from slmkit.step import StepResult

#: Settings an index keeps; an update uses them unless the user sets a different value.
SETTINGS = ("chunk_chars", "overlap", "embedder")
#: New chunks embedded per batch of files (bounds memory on a large corpus).
_GROUP_CHUNKS = 512


@dataclass
class Changes:
    added: list[tuple[str, str]] = field(default_factory=list)     # (path, display)
    edited: list[tuple[str, str]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)               # "path (why)"


def find_files(docs: list[str]) -> list[tuple[str, str]]:
    """``(absolute path, display path)`` of the supported files under ``docs``.

    Folders are walked (hidden entries skipped) keeping the suffixes in
    :data:`~slmkit.rag.parse.SUFFIXES`; a file named on its own must have one of them.
    The display path, which citations show, is relative to the current directory when the
    file is below it.
    """
    found: dict[str, str] = {}
    cwd = Path.cwd()
    for spec in docs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = [p for p in _walk(path) if p.suffix.lower() in SUFFIXES]
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(f"'{spec}' is not a document slmkit can index; give text "
                                f"({', '.join(sorted(SUFFIXES))}) files or a folder.")
            files = [path]
        elif any(c in spec for c in "*?["):
            files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec),
                                                         recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in SUFFIXES)
            if not files:
                raise DataError(f"The glob '{spec}' matches no documents; check the pattern "
                                "(quote it so the shell does not expand it).")
        else:
            raise DataError(f"'{spec}' does not exist; give existing files or folders to "
                            "index.")
        for p in files:
            absolute = p.resolve()
            try:
                display = absolute.relative_to(cwd).as_posix()
            except ValueError:
                display = absolute.as_posix()
            found.setdefault(str(absolute), display)
    if not found:
        raise DataError(f"No documents to index in {', '.join(docs)}; slmkit reads "
                        f"{', '.join(sorted(SUFFIXES))} files.")
    return sorted(found.items())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def diff(store: Store | None, files: list[tuple[str, str]]) -> Changes:
    """What changed between the index and the files on disk."""
    known = store.files() if store is not None else {}
    changes = Changes()
    for path, display in files:
        st = os.stat(path)
        if path not in known:
            changes.added.append((path, display))
            continue
        file_id, size, mtime, sha = known[path]
        if size == st.st_size and mtime == st.st_mtime_ns:
            changes.unchanged += 1
        elif _sha256(path) == sha:
            store.touch_file(file_id, st.st_size, st.st_mtime_ns)
            changes.unchanged += 1
        else:
            changes.edited.append((path, display))
    current = {p for p, _ in files}
    changes.deleted = sorted(p for p in known if p not in current)
    return changes


def settings_for(cfg: IndexConfig, store: Store | None) -> dict:
    """The index settings: the config's for a new index; the index's own for an update,
    where a different value the user set explicitly is refused."""
    mine = {k: getattr(cfg, k) for k in SETTINGS}
    if store is None:
        return mine
    theirs = {k: store.setting(k) for k in SETTINGS}
    for key in sorted(cfg.model_fields_set & set(SETTINGS)):
        if mine[key] != theirs[key]:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"The index '{cfg.out}' was built with {flag} {theirs[key]}; "
                              f"pass --overwrite to rebuild it with {mine[key]}, or drop "
                              f"{flag}.")
    return theirs


def run_index(cfg: IndexConfig) -> StepResult:
    """Index ``cfg.docs`` into ``cfg.out`` (see the module docstring)."""
    from slmkit.models.io import commit_out_dir, discard_out_dir, prepare_out_dir

    start = time.perf_counter()
    out = Path(cfg.out).expanduser()
    files = find_files(cfg.docs)
    update = out.exists() and is_index(out) and not cfg.overwrite
    if out.exists() and not update and not cfg.overwrite:
        raise OutputError(f"'{cfg.out}' exists and is not a slmkit RAG index; choose a new "
                          "--out or pass --overwrite.")
    cfg.apply_threads()
    tmp = None
    replaced_server_index = cfg.overwrite and (out / MANIFEST).is_file()
    if update:
        store = Store.open(out, url=cfg.store)
        settings = settings_for(cfg, store)
    else:
        if cfg.store:                    # an unreachable server fails before any embedding
            from slmkit.rag.pgstore import check_server

            check_server(cfg.store)
        final, tmp = prepare_out_dir(out, overwrite=True)
        settings = settings_for(cfg, None)
        store = None
    try:
        changes = diff(store, files)
        todo = changes.added + changes.edited
        embedder = None
        if todo:
            from slmkit.rag.embed import Embedder

            embedder = Embedder(settings["embedder"], batch_size=cfg.batch_size)
        if store is None:
            store = Store.create(tmp, settings, dim=embedder.dim if embedder else 384,
                                 url=cfg.store)
        new_chunks = _apply(store, changes, settings, embedder)
        Lexical.build(store, store.setting("generation"))
        tuned = store.tune()
        n_files, n_chunks = store.count()
        location = store.location
    except BaseException:
        if tmp is not None:
            if store is not None:
                try:
                    store.drop()             # its schema in the server, if any
                except Exception:            # noqa: BLE001 -- keep the first error
                    pass
            discard_out_dir(tmp)
        raise
    finally:
        if store is not None:
            store.close()
    if replaced_server_index:
        from slmkit.rag.pgstore import drop_index

        drop_index(out)                  # the schema the replaced index had in its server
    if tmp is not None:
        commit_out_dir(tmp, final)
    seconds = time.perf_counter() - start
    rate = new_chunks / seconds if new_chunks else 0.0
    figures = {"files": n_files, "chunks": n_chunks, "added": len(changes.added),
               "edited": len(changes.edited), "deleted": len(changes.deleted),
               "unchanged": changes.unchanged, "skipped": len(changes.skipped),
               "new_chunks": new_chunks, "seconds": round(seconds, 2),
               "chunks_per_s": round(rate, 1)}
    rows = [("index", str(out)), ("action", "updated" if update else "built"),
            ("files", f"{n_files} ({len(changes.added)} added, {len(changes.edited)} edited, "
                      f"{len(changes.deleted)} deleted, {changes.unchanged} unchanged)"),
            ("chunks", f"{n_chunks} ({new_chunks} embedded now)"),
            ("embedder", settings["embedder"]), ("store", location),
            ("chunking", f"{settings['chunk_chars']} chars, {settings['overlap']} overlap"),
            ("time", f"{seconds:.1f} s" + (f" ({rate:.1f} chunks/s)" if new_chunks else ""))]
    notes = [tuned] if tuned else []
    notes += [f"skipped {s}" for s in changes.skipped[:10]]
    if len(changes.skipped) > 10:
        notes.append(f"... and {len(changes.skipped) - 10} more skipped files")
    return StepResult("rag index", out=str(out), figures=figures, rows=rows, notes=notes,
                      data={**figures, "out": str(out), "settings": settings,
                            "store": location,
                            "skipped_files": changes.skipped})


def _apply(store: Store, changes: Changes, settings: dict, embedder) -> int:
    """Write the changes in one transaction; returns how many chunks were embedded."""
    from slmkit.console import progress

    known = store.files()
    parsed = []                                  # (path, display, stat, sha, chunks)
    for path, display in changes.added + changes.edited:
        try:
            sections = read_sections(Path(path), settings["chunk_chars"])
        except DataError as e:
            changes.skipped.append(f"{display} ({e})")
            continue
        chunks = chunk_sections(sections, settings["chunk_chars"], settings["overlap"])
        parsed.append((path, display, os.stat(path), _sha256(path), chunks))
    total = sum(len(p[4]) for p in parsed)
    embedded = 0
    with store.transaction(), progress("embedding chunks", total=total) as advance:
        for path in changes.deleted + [p for p, _ in changes.edited]:
            if path in known:
                store.remove_file(known[path][0])
        group: list = []
        for i, item in enumerate(parsed):
            group.append(item)
            if sum(len(g[4]) for g in group) >= _GROUP_CHUNKS or i == len(parsed) - 1:
                texts = [search_text(g[1], c.heading, c.text) for g in group for c in g[4]]
                vectors = embedder.encode(texts, progress=advance) if texts else []
                pos = 0
                for path, display, st, sha, chunks in group:
                    store.add_file(path, display, st.st_size, st.st_mtime_ns, sha, chunks,
                                   vectors[pos:pos + len(chunks)])
                    pos += len(chunks)
                embedded += len(texts)
                group = []
        store.set_setting("generation", (store.setting("generation") or 0) + 1)
    return embedded
