"""Load and save models: Hugging Face directories with safetensors weights and lineage.

Every slmkit step reads a model dir and writes a new one (see DESIGN.md). This module is
the only place that turns a reference (local dir, hub id, GGUF file or built-in name) into
``(model, tokenizer)`` and the only place that writes a model dir, atomically.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from slmkit.errors import ModelLoadError, OutputError
from slmkit.models import checks, formats, lineage

_DTYPES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
}
# Only these files are ever fetched from the hub: never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def resolve_dtype(dtype: Any):
    """Map ``"bf16"``/``"fp32"``/``torch.dtype``/None (float32) to a torch dtype."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        from slmkit.errors import ConfigError

        raise ConfigError(f"Unknown dtype '{dtype}'; use one of fp32, bf16 or fp16.")
    return getattr(torch, name)


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` when a GPU is present, else ``"cpu"``."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        from slmkit.errors import ConfigError

        raise ConfigError(f"Device '{device}' was requested but no CUDA GPU is available; "
                          "use --device cpu.")
    return str(device)


def resolve_ref(ref: str | os.PathLike) -> Path:
    """Turn a local directory, a GGUF file, a built-in name or a hub id into a local
    directory path.

    ``builtin:NAME`` and a GGUF file (a ``.gguf`` path, or any file that starts with the
    GGUF magic) are imported once into the cache and that dir is used
    (:func:`slmkit.models.gguf_import.gguf_model_dir`). A directory that exists is used as
    is. Something that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.gguf``)
    but does not exist is an error. Otherwise it is taken as a hub id: the local cache is
    tried first, and the hub is contacted only when the id is not cached and
    ``HF_HUB_OFFLINE`` is not set. Only safetensors, JSON and tokenizer files are fetched.
    """
    from slmkit.models.gguf_file import BUILTIN_PREFIX, is_gguf

    text = os.fspath(ref)
    path = Path(text).expanduser()
    if text.startswith(BUILTIN_PREFIX) or path.is_file() and (
            path.suffix.lower() == ".gguf" or is_gguf(path)):
        from slmkit.models.gguf_import import gguf_model_dir

        return gguf_model_dir(text)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"'{text}' is a file, not a model directory; pass the directory "
                             "that holds config.json, or a .gguf file.")
    if path.suffix.lower() == ".gguf":
        raise ModelLoadError(f"GGUF file '{text}' does not exist; check the path.")
    looks_like_path = (text.startswith((".", "/", "~")) or text.count("/") > 1
                       or os.sep in text and os.sep != "/" or not _HUB_ID.match(text))
    if looks_like_path:
        raise ModelLoadError(f"Model directory '{text}' does not exist; check the path, or pass "
                             "a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M'.")
    return Path(_snapshot(text))


def _snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelLoadError(f"'{repo_id}' is neither a local directory nor a cached hub model, "
                             "and HF_HUB_OFFLINE is set; check the path or download it first.")
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelLoadError(f"'{repo_id}' is not a local directory and the Hugging Face hub has "
                             "no accessible model by that id; check the spelling or log in "
                             "with `hf auth login` for gated models.") from None
    except Exception as e:  # network failures come in many types
        raise ModelLoadError(f"'{repo_id}' is not a local directory and could not be downloaded "
                             f"from the Hugging Face hub ({type(e).__name__}); check the path or "
                             "your network connection.") from None


def load_config(ref: str | os.PathLike):
    """Resolve ``ref`` and load its transformers config, with the causal-LM check.

    Returns:
        (model_dir, config)
    """
    from transformers import AutoConfig

    model_dir = resolve_ref(ref)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"'{ref}' has no config.json; point to a Hugging Face model "
                             "directory (config.json, model.safetensors and tokenizer files).")
    _refuse_remote_code(ref, read_config_json(model_dir))
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except ValueError as e:
        kind = _model_type(model_dir)
        raise ModelLoadError(f"'{ref}' has architecture '{kind}', which this transformers "
                             f"version does not know ({str(e).splitlines()[0][:80]}); upgrade "
                             "transformers or use a supported architecture.") from None
    except OSError as e:
        raise ModelLoadError(f"'{ref}' has an unreadable config.json ({e}); fix or re-download "
                             "the model.") from None
    checks.check_causal(config, model_dir)
    return model_dir, config


def _refuse_remote_code(ref, data: dict) -> None:
    """Refuse a family whose code only ships with the checkpoint (OpenELM: ``auto_map``
    and no transformers class): slmkit never runs remote code."""
    from transformers import CONFIG_MAPPING

    from slmkit.models.arch import REMOTE_CODE_ONLY

    kind = str(data.get("model_type", "?"))
    if kind in REMOTE_CODE_ONLY or (data.get("auto_map") and kind not in CONFIG_MAPPING):
        name = REMOTE_CODE_ONLY.get(kind, kind)
        raise ModelLoadError(f"'{ref}' is a {name} model ('{kind}') whose code ships with the "
                             "checkpoint (auto_map) and has no built-in transformers class; "
                             "slmkit never runs remote code, so it cannot load it: use a "
                             "family transformers supports natively (Llama, Qwen2/3, Gemma, "
                             "Phi-3, Granite, ...).")


def read_config_json(model_dir: Path) -> dict:
    """The raw settings in ``model_dir/config.json``, which must be one JSON object.

    Raises:
        ModelLoadError: the file cannot be read, is not valid JSON, or holds a list, a string
            or a number instead of an object.
    """
    import json

    path = model_dir / "config.json"
    fix = "fix it or re-download the model."
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ModelLoadError(f"'{path}' cannot be read ({why}); {fix}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        where = f"line {e.lineno}, column {e.colno}: " if hasattr(e, "lineno") else ""
        raise ModelLoadError(f"'{path}' is not a JSON object (invalid JSON at {where}"
                             f"{getattr(e, 'msg', e)}); {fix}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"'{path}' is not a JSON object (it holds a JSON "
                             f"{_json_kind(data)}, not the model's settings as "
                             f"{{\"model_type\": ...}}); {fix}")
    return data


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _model_type(model_dir: Path) -> str:
    try:
        return str(read_config_json(model_dir).get("model_type", "?"))
    except ModelLoadError:
        return "?"


def open_model_dir(ref: str | os.PathLike):
    """Every check :func:`load_model` makes before it builds the model, from the files alone
    (config.json, the safetensors headers; no tensor is read): resolve ``ref``, load its
    config, find and validate its weight files, and match their tensor names and shapes
    against the config (:func:`checks.check_weights_match`).

    Returns:
        (model_dir, config, files, headers): the safetensors files and their parsed headers.

    Raises:
        ModelLoadError: anything that would stop :func:`load_model`, naming ``ref``.
    """
    model_dir, config = load_config(ref)
    files = checks.weight_files(model_dir)
    headers = [checks.check_safetensors(f) for f in files]
    checks.check_weights_match(ref, config, files, headers)
    return model_dir, config, files, headers


def check_loadable(ref: str | os.PathLike, tokenizer: bool = True) -> Path:
    """Refuse ``ref`` now, before any work, if :func:`load_model` would refuse it later:
    the checks of :func:`open_model_dir`, plus its tokenizer loading when ``tokenizer``.

    Returns:
        The model's local directory.
    """
    model_dir = open_model_dir(ref)[0]
    if tokenizer:
        load_tokenizer(ref)
    return model_dir


def load_tokenizer(ref: str | os.PathLike):
    """Load the tokenizer of a model dir (or hub id), with a clear error when it is missing."""
    from transformers import AutoTokenizer

    model_dir = resolve_ref(ref)
    if not checks.has_tokenizer(model_dir):
        raise ModelLoadError(f"'{ref}' has no tokenizer files (tokenizer.json); copy them from "
                             "the model it was made from, or train one with `slm tokenizer "
                             "train`.")
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # tokenizers raise a zoo of exception types
        raise ModelLoadError(f"'{ref}' has a tokenizer that cannot be loaded "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                             "re-save or replace the tokenizer files.") from None


def load_model(ref: str | os.PathLike, dtype: Any = None, device: str | None = "cpu",
               tokenizer: bool = True):
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    Args:
        ref: model directory, or hub id (cache first; the hub only when not cached).
        dtype: ``"fp32"`` (default), ``"bf16"``, ``"fp16"`` or a ``torch.dtype``.
        device: ``"cpu"`` (default), ``"cuda"`` or ``"auto"``.
        tokenizer: load the tokenizer too (it must exist).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and carries ``slmkit_ref`` and
        ``slmkit_lineage`` (the chain so far, used by :func:`save_model`).

    Raises:
        ModelLoadError: missing dir, no config.json, non-causal architecture, pickle-only,
            truncated/corrupt safetensors, or a missing tokenizer.
    """
    from transformers import AutoModelForCausalLM

    from slmkit.console import quiet_libraries

    quiet_libraries()
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    model_dir, config, _, _ = open_model_dir(ref)
    tok = load_tokenizer(model_dir) if tokenizer else None
    fmt = formats.format_of(config)
    if fmt is not None:
        model = formats.loader_for(fmt, ref)(model_dir, config, torch_dtype, dev)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, config=config, dtype=torch_dtype, use_safetensors=True,
                local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise ModelLoadError(f"'{ref}' could not be loaded ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160]}); its weights do not match its "
                                 "config.json, re-save or re-download the model.") from None
        model.to(dev)
    model.eval()
    model.slmkit_ref = os.fspath(ref)
    model.slmkit_lineage = lineage.read_lineage(model_dir, ref=os.fspath(ref))
    return model, tok


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Check an output dir and make a temp dir beside it to write into.

    Returns:
        (final_dir, temp_dir). Write everything into ``temp_dir`` and then call
        :func:`commit_out_dir`; on failure call :func:`discard_out_dir`.
    """
    final = Path(out_dir).expanduser()
    if final.exists() and not overwrite:
        raise OutputError(f"Output directory '{out_dir}' already exists; choose a new --out or "
                          "pass --overwrite.")
    if final.exists() and not final.is_dir():
        raise OutputError(f"Output '{out_dir}' is an existing file; choose a directory path.")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot create the parent of '{out_dir}' ({_reason(e)}); choose a "
                          "writable location.") from None
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:  # /proc, a read-only mount, no write permission, ...
        raise OutputError(f"Cannot write to '{out_dir}' (creating a directory in "
                          f"'{final.parent}' failed: {_reason(e)}); choose a writable "
                          "location.") from None
    return final, tmp


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def commit_out_dir(tmp: Path, final: Path) -> None:
    """Atomically put ``tmp`` in place of ``final`` (replacing an old one if present)."""
    old = None
    try:
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as e:
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)  # put the previous output back
        discard_out_dir(tmp)
        raise OutputError(f"Cannot move the finished output into '{final}' ({_reason(e)}); "
                          "choose a writable location.") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_out_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


class atomic_dir:
    """``with atomic_dir(out) as tmp:`` write into ``tmp``; it becomes ``out`` only on success."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.final, self.tmp = prepare_out_dir(out_dir, overwrite)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            commit_out_dir(self.tmp, self.final)
        else:
            discard_out_dir(self.tmp)
        return False


def save_model(model, tokenizer, out_dir: str | os.PathLike, step: str,
               params: dict | None = None, metrics: dict | None = None,
               parent: str | os.PathLike | None = None, overwrite: bool = False,
               extra_files: dict[str, bytes | str] | None = None,
               state_dict: dict | None = None) -> Path:
    """Write a model dir atomically: safetensors weights, config, tokenizer, ``slmkit.json``.

    Args:
        model: a transformers ``PreTrainedModel`` (dense or with slmkit modules).
        tokenizer: its tokenizer (saved beside it), or None.
        out_dir: the directory to create. It must not exist unless ``overwrite``.
        step: the name of the step that made this model (``"init"``, ``"train"``, ...).
        params: the step's options, recorded in the lineage.
        metrics: figures measured on the result.
        parent: the model this one was made from; defaults to where ``model`` was loaded
            from (``model.slmkit_lineage``), or none for a model built from scratch.
        extra_files: more files to write into the dir (name -> content; a name may hold
            a subfolder).
        state_dict: tensors to write instead of the model's own (a compact on-disk format
            whose loader is named in ``model.config.slmkit``).

    Returns:
        The final directory.
    """
    from slmkit.console import quiet_libraries

    quiet_libraries()
    if parent is not None:
        chain = lineage.read_lineage(resolve_ref(parent), ref=os.fspath(parent))
    else:
        chain = list(getattr(model, "slmkit_lineage", []) or [])
    final, tmp = prepare_out_dir(out_dir, overwrite)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)   # "search/pareto.json"
            with open(tmp / name, mode) as f:
                f.write(content)
        record = lineage.make_record(step, params, metrics, chain)
        lineage.write_record(tmp, record)
        commit_out_dir(tmp, final)
    except BaseException:
        discard_out_dir(tmp)
        raise
    own = {k: record.get(k) for k in ("step", "params", "metrics", "parent", "created_utc",
                                      "slmkit_version")}
    model.slmkit_lineage = chain + [{**own, "ref": os.fspath(out_dir)}]
    model.slmkit_ref = os.fspath(out_dir)
    return final
