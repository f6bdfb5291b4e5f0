"""``slm import FILE.gguf --out DIR``: a GGUF file (or a built-in model) as a standard
Hugging Face model dir, and the cache that lets every MODEL argument take a GGUF file.

The conversion is transformers' own GGUF reader (``from_pretrained(dir, gguf_file=...)``
for the model and the tokenizer, chat template included), which dequantizes every block
type the ``gguf`` package knows (F32, F16, BF16, Q4_0 ... Q8_0, Q2_K ... Q6_K, IQ*) for the
architectures it maps (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, ... see
:func:`mappable_architectures`). transformers marks such a model as quantized and will not
save it, so the dense model is rebuilt from its config, given the dequantized state dict
and saved with :func:`slmkit.models.io.save_model`: safetensors, config.json, tokenizer and
``slmkit.json``, whose ``import`` entry records the source file, its SHA-256, its tensor
types and the block types its weights went through (``weights_went_through``: a model
that was once Q4_1 is not an fp32 original, whatever its dtype says now).

Any MODEL argument (``slm quantize x.gguf``, ``slm generate builtin:smollm2-135m``) goes
through :func:`gguf_model_dir`: the file is imported once into
``$SLMKIT_CACHE_DIR/gguf/<sha256[:16]>`` and that dir is used from then on.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import Field

from slmkit.errors import ModelLoadError
from slmkit.models.gguf_file import (
    BUILTIN_PREFIX,
    GGUFHeader,
    builtin_file,
    cache_root,
    read_header,
    sha256_of,
)
from slmkit.step import StepConfig, StepResult, cli

_ENCODER_DECODER = {"t5", "umt5", "t5encoder"}


class ImportConfig(StepConfig):
    """Options of ``slm import`` and the ``import`` recipe step."""

    gguf: str = Field(description="The GGUF file to import (or a built-in name, "
                      "builtin:NAME).", json_schema_extra=cli(argument=True,
                                                              metavar="FILE.gguf"))
    dtype: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="dtype of "
                                                   "the weights written (dequantized).")


def mappable_architectures() -> list[str]:
    """GGUF ``general.architecture`` values this transformers version turns into a causal LM."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"} - _ENCODER_DECODER
    try:
        from transformers.integrations.gguf import GGUF_ARCHS  # the newer loader's table
        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def dequantizable_types() -> set[str]:
    """GGML tensor types the ``gguf`` package (and so transformers) can dequantize."""
    import gguf
    import gguf.quants

    traits = getattr(gguf.quants, "_type_traits", {})
    return {"F32", "F16"} | {t.name for t in traits}


def check_importable(header: GGUFHeader, ref: str) -> None:
    """Refuse, in one sentence, a GGUF whose architecture or tensor types cannot be read."""
    arch = header.architecture
    archs = mappable_architectures()
    # transformers reads llama.cpp's qwen2moe / qwen3moe as qwen2_moe / qwen3_moe
    if arch not in archs and arch.replace("-", "_") not in archs \
            and arch.replace("moe", "_moe") not in archs:
        import transformers

        why = ("is an encoder-decoder, not a causal LM" if arch in _ENCODER_DECODER else
               f"cannot be mapped to a transformers model (transformers "
               f"{transformers.__version__} maps {', '.join(archs)})")
        raise ModelLoadError(f"'{ref}' has GGUF architecture '{arch}', which {why}; import a "
                             "GGUF of a supported architecture or the original HF model.")
    if arch == "llama" and header.meta.get("llama.expert_count"):
        raise ModelLoadError(f"'{ref}' is a mixture of experts in llama.cpp's 'llama' graph "
                             "(Mixtral), which transformers' GGUF reader would load without its "
                             "experts; import the original HF model instead.")
    bad = sorted(set(header.tensor_types()) - dequantizable_types())
    if bad:
        raise ModelLoadError(f"'{ref}' stores tensors as {', '.join(bad)}, which the gguf "
                             "package cannot dequantize; use a GGUF with F32/F16/BF16, "
                             "Q4_0..Q8_0 or k-quant (Q2_K..Q6_K) tensors.")


def _source(ref: str) -> tuple[Path, str | None]:
    """The GGUF file behind ``ref`` (a path or ``builtin:NAME``) and a known SHA-256."""
    if ref.startswith(BUILTIN_PREFIX):
        return builtin_file(ref)
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelLoadError(f"GGUF file '{ref}' does not exist; check the path.")
    if path.is_dir():
        raise ModelLoadError(f"'{ref}' is a directory, not a GGUF file; it is already a model "
                             "dir, pass it to any step directly.")
    return path, None


@contextlib.contextmanager
def _silent():
    """Hide transformers' GGUF progress bar (plain tqdm on stderr) unless --debug."""
    from slmkit.console import log

    if log.isEnabledFor(10):                       # logging.DEBUG
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def llamacpp_config(header: GGUFHeader) -> dict:
    """Config fields a llama.cpp GGUF states (or its graph implies) that transformers'
    reader leaves at the class defaults: the head dim (``key_length``), Gemma's soft-caps
    and query scale, Phi-3's window, Qwen2-MoE's expert widths. Without them a Qwen3 with
    head_dim != hidden / heads does not load, and a Gemma 2 computes another attention."""
    from slmkit.export.gguf_meta import llamacpp_query_scalar

    arch, meta = header.architecture, header.meta

    def key(name):
        return meta.get(f"{arch}.{name}")

    fields = {}
    if key("attention.key_length") and arch in ("qwen3", "gemma2", "gemma3"):
        fields["head_dim"] = int(key("attention.key_length"))
    if arch in ("gemma2", "gemma3") and key("block_count") and key("attention.head_count"):
        hd = fields.get("head_dim") or key("embedding_length") // key("attention.head_count")
        fields["query_pre_attn_scalar"] = llamacpp_query_scalar(
            arch, key("block_count"), key("embedding_length"), key("attention.head_count"), hd)
    if arch == "gemma2":
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if key(name) is not None:
                fields[name] = float(key(name)) or None
    if arch == "phi3" and key("attention.sliding_window"):
        fields["sliding_window"] = int(key("attention.sliding_window"))
    if arch == "qwen2moe":      # the experts' widths; llama.cpp's graph: every block a
        if key("expert_feed_forward_length"):            # mixture, weights not renormalised
            fields["moe_intermediate_size"] = int(key("expert_feed_forward_length"))
        if key("expert_shared_feed_forward_length"):
            fields["shared_expert_intermediate_size"] = int(
                key("expert_shared_feed_forward_length"))
        fields.update(norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
    return fields


def read_with_transformers(path: Path, dtype: str, ref: str, config: dict | None = None,
                           byte_level: bool = False, space_prefix: bool | None = None):
    """``(model, tokenizer)`` from transformers' GGUF reader, dequantized to ``dtype``
    (``config``: fields set on the config it builds; ``byte_level``: the file's tokenizer
    is byte-level BPE, ``tokenizer.ggml.model`` ``gpt2``; ``space_prefix``: it is
    SentencePiece's (``llama``), with or without llama.cpp's ``add_space_prefix``)."""
    import tempfile

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from slmkit.models.io import resolve_dtype

    with tempfile.TemporaryDirectory(prefix="slmkit-gguf-") as tmp, _silent():
        # a dir of its own, so that no config.json or tokenizer beside the file is read
        os.symlink(path.resolve(), Path(tmp) / "model.gguf")
        kw = dict(gguf_file="model.gguf", local_files_only=True)
        try:
            tok = AutoTokenizer.from_pretrained(tmp, **kw)
            if byte_level:
                tok = _byte_level_tokenizer(tok, tmp, kw)
            if space_prefix is not None:
                _sentencepiece_text(tok, space_prefix)
            model = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=resolve_dtype(dtype), quantization_config=GgufConfig(dequantize=True),
                **kw, **(config or {}))
        except Exception as e:  # transformers raises many types here
            raise ModelLoadError(f"transformers {transformers.__version__} could not read "
                                 f"'{ref}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}"
                                 "); import the original HF model instead.") from None
    return model, tok


def _sentencepiece_text(tok, space_prefix: bool) -> None:
    """Prepare text as llama.cpp's SentencePiece tokenizer does (a ``' '`` before the text
    where the file says ``add_space_prefix``, then every space as ``▁``), in place of
    transformers' Metaspace, which adds no ``▁`` before a text that starts with a space and
    always adds one otherwise (measured on an exported tiny tokenizer: 333 and 102 of 435
    stdlib snippets tokenized as the source with and without the prefix; all 435 after)."""
    from tokenizers import decoders, normalizers

    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if space_prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))


def _byte_level_tokenizer(tok, tmp: str, kw: dict):
    """``tok``, or the generic fast tokenizer where the family's class does not keep a
    byte-level BPE vocabulary through save and load: in a Gemma GGUF (slmkit's export of a
    Gemma model with its own tokenizer) it becomes a ``GemmaTokenizer``, which, saved and
    loaded again, splits on ``▁`` and asks for an ``<unk>`` the vocabulary lacks."""
    import tempfile

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if type(tok) is PreTrainedTokenizerFast:
        return tok
    probe = "def add(a, b):\n    return a + b  # 42"
    want = tok(probe)["input_ids"]
    with tempfile.TemporaryDirectory(prefix="slmkit-tok-") as saved:
        tok.save_pretrained(saved)
        try:
            same = AutoTokenizer.from_pretrained(saved)(probe)["input_ids"] == want
        except Exception:  # the tokenizers library raises a bare Exception on a missing <unk>
            same = False
    return tok if same else PreTrainedTokenizerFast.from_pretrained(tmp, **kw)


def dense_copy(model, dtype: str):
    """A plain transformers model with ``model``'s config and weights, without the GGUF
    quantizer's marks (which make ``save_pretrained`` refuse)."""
    import copy

    from transformers import AutoModelForCausalLM

    from slmkit.models.io import resolve_dtype

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    config.__dict__.pop("_model_name_or_path", None)      # the GGUF's general.name
    dense = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    dense.load_state_dict(model.state_dict(), strict=True, assign=True)
    dense.tie_weights()
    return dense.eval()


def import_gguf(path: Path, out: str | os.PathLike, ref: str, *, dtype: str = "fp32",
                overwrite: bool = False, digest: str | None = None,
                header: GGUFHeader | None = None, params: dict | None = None) -> Path:
    """Convert the GGUF file ``path`` (named ``ref`` to the user) into the model dir ``out``.

    Returns:
        The final directory.
    """
    from slmkit.console import progress
    from slmkit.models.io import save_model
    from slmkit.models.lineage import external_entry

    header = header or read_header(path)
    check_importable(header, ref)
    with progress(f"importing {Path(path).name}", total=3) as update:
        digest = digest or sha256_of(path)
        update()
        model, tok = read_with_transformers(
            Path(path), dtype, ref, llamacpp_config(header),
            byte_level=header.meta.get("tokenizer.ggml.model") == "gpt2",
            space_prefix=bool(header.meta.get("tokenizer.ggml.add_space_prefix", True))
            if header.meta.get("tokenizer.ggml.model") == "llama" else None)
        update()
        dense = dense_copy(model, dtype)
        del model
        template = header.meta.get("tokenizer.chat_template")
        if template and not getattr(tok, "chat_template", None):
            tok.chat_template = template
        n_params = sum(p.numel() for p in dense.parameters())
        record = {"weights_went_through": header.quantization(), "source": ref,
                  "file": str(path), "sha256": digest, "architecture": header.architecture,
                  "tensor_types": header.tensor_types(), "gguf_version": header.version,
                  **(params or {})}
        dense.slmkit_lineage = [external_entry(ref)]
        final = save_model(dense, tok, out, step="import", params=record,
                           metrics={"params": n_params}, overwrite=overwrite)
        update()
    return final


def gguf_model_dir(ref: str) -> Path:
    """The model dir of a GGUF file or built-in name, imported into the cache on first use
    (``$SLMKIT_CACHE_DIR/gguf/<sha256[:16]>``, written atomically, fp32)."""
    from slmkit.console import log
    from slmkit.models.lineage import LINEAGE_FILE

    path, digest = _source(ref)
    header = None
    if digest is None:
        header = read_header(path)        # refuse what is not GGUF before hashing it
        digest = sha256_of(path)          # remembered per (path, size, mtime)
    out = cache_root() / digest[:16]
    if (out / LINEAGE_FILE).is_file():    # written last, atomically: a complete import
        return out
    header = header or read_header(path)
    check_importable(header, ref)
    with _import_lock(out):               # two processes started at once import it once
        if (out / LINEAGE_FILE).is_file():
            return out
        log.info(f"Importing {ref} into {out} (once; later uses read the cached dir).")
        extra = {"builtin": ref} if ref.startswith(BUILTIN_PREFIX) else {}
        return import_gguf(path, out, ref, overwrite=True, digest=digest, header=header,
                           params=extra)


@contextmanager
def _import_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out``'s import (a ``.lock`` file beside it; POSIX only, a
    no-op elsewhere): the second process waits, then finds the finished dir."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:                   # Windows: the atomic write still keeps it whole
        yield
        return
    with open(out.parent / f"{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_import(cfg: ImportConfig) -> StepResult:
    """Import ``cfg.gguf`` into ``cfg.out`` (see the module docstring)."""
    from slmkit.console import human_bytes, human_count
    from slmkit.models.info import dir_size
    from slmkit.models.lineage import read_record

    path, digest = _source(cfg.gguf)
    header = read_header(path)
    check_importable(header, cfg.gguf)
    cfg.check_output()
    cfg.apply_threads()
    t0 = time.perf_counter()
    final = import_gguf(path, cfg.output(), cfg.gguf, dtype=cfg.dtype, overwrite=cfg.overwrite,
                        digest=digest, header=header, params=cfg.lineage())
    seconds = time.perf_counter() - t0
    rec = read_record(final) or {}
    n = (rec.get("metrics") or {}).get("params", 0)
    size = dir_size(final)
    figures = {"params": n, "size_on_disk": size, "import_seconds": round(seconds, 2),
               "sha256": rec["params"]["sha256"]}
    types = ", ".join(f"{k} x{v}" for k, v in header.tensor_types().items())
    rows = [("source", f"{cfg.gguf} ({human_bytes(path.stat().st_size)})"),
            ("sha256", rec["params"]["sha256"][:16] + "…"),
            ("architecture", header.architecture), ("tensor types", types),
            ("weights went through", header.quantization()),
            ("parameters", f"{n:,} ({human_count(n)})"), ("dtype", cfg.dtype),
            ("size on disk", human_bytes(size)), ("time", f"{seconds:.1f} s"),
            ("written to", str(final))]
    return StepResult("import", str(final), figures, rows)
