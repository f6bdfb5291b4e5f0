"""Token cache: tokenize a corpus split once into a memory-mapped file of token ids.

The file is one flat array of token ids, documents separated by the tokenizer's eos id::

    [doc0 tokens..., eos, doc1 tokens..., eos, ...]        # shape (n_tokens,), uint16/uint32

It is keyed by (corpus content hash, tokenizer hash, split, val fraction), so a second run
on the same data and tokenizer maps the existing file instead of tokenizing again, and any
change of a document or of the tokenizer makes a new file. Tokenization streams document
batches to disk, so memory stays bounded whatever the corpus size.

The cache lives in ``$SLMKIT_CACHE_DIR/tokens`` (default ``~/.cache/slmkit/tokens``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from slmkit.data.corpus import CorpusStats, iter_documents
from slmkit.data.split import check_split, check_val_fraction
from slmkit.errors import DataError

CACHE_VERSION = 1
_BATCH_DOCS = 64


def cache_root() -> Path:
    """Where slmkit keeps caches: ``$SLMKIT_CACHE_DIR`` or ``~/.cache/slmkit``."""
    return Path(os.environ.get("SLMKIT_CACHE_DIR") or Path.home() / ".cache" / "slmkit")


def tokenizer_hash(tokenizer) -> str:
    """A hash of everything that decides a tokenizer's output (model, specials, eos)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:  # slow tokenizer: its vocabulary and class
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(f"eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()[:16]


def corpus_hash(spec, stats: CorpusStats | None = None) -> str:
    """A hash of every document's id and text (one streamed pass over the corpus)."""
    h = hashlib.sha256()
    for doc in iter_documents(spec, split="all", stats=stats):
        h.update(doc.id.encode("utf-8", errors="replace"))
        h.update(b"\x00")
        h.update(doc.text.encode("utf-8", errors="replace"))
        h.update(b"\x01")
    return h.hexdigest()[:16]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def token_stream(spec, tokenizer, split: str = "train", val_fraction: float = 0.05,
                 stats: CorpusStats | None = None, progress: bool = True) -> np.memmap:
    """The token ids of one split of a corpus, tokenized once and cached on disk.

    Args:
        spec: corpus spec (see :func:`slmkit.data.corpus.iter_documents`).
        tokenizer: a transformers tokenizer with an eos token.
        split: ``"train"``, ``"val"`` or ``"all"``.
        val_fraction: share of documents held out for validation.
        stats: filled in with the corpus statistics of the hashing pass (whole corpus).
        progress: show a progress bar while tokenizing.

    Returns:
        A read-only ``numpy.memmap`` of shape ``(n_tokens,)``; documents are separated by
        eos. It carries ``.meta``: a dict with ``documents``, ``bytes`` (UTF-8 bytes of the
        split's text), ``tokens``, ``bytes_per_token``, ``key`` and ``path``.

    Raises:
        DataError: the corpus is unusable, or the split has no documents.
    """
    check_split(split)
    val_fraction = check_val_fraction(val_fraction)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("The tokenizer has no eos token, which separates documents in the "
                        "token stream; train one with `slm tokenizer train`.")
    stats = stats if stats is not None else CorpusStats()
    key = "-".join([corpus_hash(spec, stats), tokenizer_hash(tokenizer), split,
                    f"{val_fraction:g}", f"v{CACHE_VERSION}"])
    root = cache_root() / "tokens"
    bin_path, meta_path = root / f"{key}.bin", root / f"{key}.json"
    if not (bin_path.is_file() and meta_path.is_file()):
        _build(spec, tokenizer, split, val_fraction, bin_path, meta_path, key, progress)
    meta = json.loads(meta_path.read_text())
    if meta["tokens"] == 0:
        raise DataError(f"The '{split}' split of '{_short(spec)}' has no documents "
                        f"(val fraction {val_fraction:g}); add data or change --val-fraction.")
    arr = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r")
    arr.meta = {**meta, "path": str(bin_path)}
    return arr


def _short(spec) -> str:
    return spec if isinstance(spec, str) else ", ".join(map(str, spec))


def _build(spec, tokenizer, split, val_fraction, bin_path: Path, meta_path: Path, key: str,
           progress: bool) -> None:
    """Tokenize the split into ``bin_path`` (temp file + rename) and write ``meta_path``."""
    from slmkit.console import progress as progress_bar

    bin_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    n_tokens = n_docs = n_bytes = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=bin_path.parent)
    split_stats = CorpusStats()
    try:
        with os.fdopen(fd, "wb") as f, progress_bar(f"tokenizing {split}", None) as update:
            batch: list[str] = []

            def flush() -> None:
                nonlocal n_tokens
                ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
                flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
                f.write(flat.astype(dtype).tobytes())
                n_tokens += len(flat)
                if progress:
                    update(len(batch), info=f"{n_tokens:,} tokens")
                batch.clear()

            for doc in iter_documents(spec, split=split, val_fraction=val_fraction,
                                      stats=split_stats):
                batch.append(doc.text)
                n_docs += 1
                n_bytes += len(doc.text.encode("utf-8", errors="replace"))
                if len(batch) == _BATCH_DOCS:
                    flush()
            if batch:
                flush()
        os.replace(tmp, bin_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {"key": key, "split": split, "val_fraction": val_fraction,
            "dtype": np.dtype(dtype).name, "tokens": n_tokens, "documents": n_docs,
            "bytes": n_bytes, "bytes_per_token": n_bytes / max(n_tokens - n_docs, 1),
            "vocab_size": len(tokenizer)}
    fd, tmp_meta = tempfile.mkstemp(prefix=f".{key}.", suffix=".json", dir=bin_path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp_meta, meta_path)
