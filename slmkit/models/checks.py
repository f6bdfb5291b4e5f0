"""Checks that run before transformers touches a model directory.

Each check raises :class:`~slmkit.errors.ModelLoadError` with one sentence naming the
input and the fix, instead of the stack traces transformers would give.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from slmkit.errors import ModelLoadError
from slmkit.models.arch import ENCODER_ONLY

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding a model's weights (single file or sharded index).

    Raises:
        ModelLoadError: no safetensors weights, or only pickle checkpoints (refused).
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"'{index}' is not a valid safetensors index ({e}); "
                                 "re-save the model or re-download it.") from None
        files = [model_dir / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"'{model_dir}' is missing weight shard {missing[0]} listed in "
                                 "model.safetensors.index.json; re-download or re-save the model.")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"'{model_dir}' holds only pickle checkpoints ({', '.join(pickles[:3])}), which can run "
            "arbitrary code when loaded, so slmkit refuses them; convert the model to safetensors "
            "in a trusted environment (model.save_pretrained(dir, safe_serialization=True)).")
    raise ModelLoadError(f"'{model_dir}' has no model.safetensors weights; point to a model "
                         "directory that contains them.")


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header and length without reading its tensors.

    Returns:
        The parsed header (tensor name -> {dtype, shape, data_offsets}, plus ``__metadata__``).

    Raises:
        ModelLoadError: the file is truncated, has a corrupt header, or has trailing garbage.
    """
    size = path.stat().st_size
    fix = "re-download or re-save the model."
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8 or header_len > 100_000_000:
                raise ValueError("header length points past the end of the file")
            header = json.loads(f.read(header_len).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            if not 0 <= start <= stop:
                raise ValueError(f"tensor {name} has invalid offsets")
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
        raise ModelLoadError(f"'{path}' is not a valid safetensors file ({e}); {fix}") from None
    if 8 + header_len + end != size:
        what = "truncated" if 8 + header_len + end > size else "longer than its header says"
        raise ModelLoadError(f"'{path}' is {what} ({size} bytes, expected "
                             f"{8 + header_len + end}); {fix}")
    return header


def check_causal(config, model_dir: Path) -> None:
    """Refuse architectures that are not decoder-only causal LMs (BERT, T5, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = getattr(config, "architectures", None) or []
    reason = None
    if getattr(config, "is_encoder_decoder", False):
        reason = "an encoder-decoder model"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        reason = f"a '{model_type}' model, which transformers has no causal-LM class for"
    elif archs and not any(a in causal_classes for a in archs):
        reason = f"a {archs[0]} (not a causal language model)"
    elif model_type in ENCODER_ONLY and not getattr(config, "is_decoder", False):
        reason = f"a '{model_type}' encoder (not a causal language model)"
    if reason:
        raise ModelLoadError(f"'{model_dir}' is {reason}; slmkit works with decoder-only causal "
                             "language models such as Llama, Qwen2, Mistral or GPT-2.")


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


#: Checkpoint tensors transformers itself drops on load (old buffers), whatever the model.
_ALWAYS_IGNORED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")


def expected_tensors(config, ref=None) -> tuple[list[dict[str, tuple]], set[str], set[str], str]:
    """What the config says the weights must be, from a model built on the meta device
    (shapes only: no memory, no initialisation cost).

    Returns:
        (forms, optional, ignored, prefix): ``forms`` are name -> shape dicts, the layout
        transformers saves (e.g. Mixtral's per-expert keys) and the model's own (fused
        experts); ``optional`` tied weights that may be left out of the file; ``ignored``
        regexes of stored tensors transformers drops on load; ``prefix`` the base-model
        prefix some checkpoints leave off.

    Raises:
        ModelLoadError: transformers cannot build a model from the config (``ref`` names it).
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    dense = copy.deepcopy(config)
    for attr in ("quantization_config", "slmkit"):  # a compressed format's dense skeleton
        if hasattr(dense, attr):
            delattr(dense, attr)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(dense, trust_remote_code=False)
    except Exception as e:  # inconsistent sizes surface as many exception types
        why = (str(e).splitlines() or [""])[0][:120]
        raise ModelLoadError(f"'{ref}' has a config.json that no model can be built from "
                             f"({type(e).__name__}: {why}); fix its sizes or re-download the "
                             "model.") from None
    state = model.state_dict()
    own = {k: tuple(v.shape) for k, v in state.items()}
    forms = [own]
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, state).items()}
        if saved != own:
            forms.insert(0, saved)
    except Exception:  # an older/newer transformers without (this) conversion API
        pass
    optional = set(getattr(model, "all_tied_weights_keys", None) or {})
    if getattr(dense, "tie_word_embeddings", False):
        optional.add("lm_head.weight")
    ignored = set(_ALWAYS_IGNORED) | set(getattr(model, "_keys_to_ignore_on_load_unexpected",
                                                  None) or ())
    optional_re = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    optional |= {k for k in own if any(re.search(p, k) for p in optional_re)}
    return forms, optional, ignored, model.base_model_prefix or ""


def check_weights_match(ref, config, files: list[Path], headers: list[dict]) -> None:
    """Refuse weights whose tensor names or shapes differ from what ``config`` implies (e.g.
    ``hidden_size`` edited after saving): the one check behind ``load_model`` and ``slm info``.

    Reads only the safetensors headers. For a compressed model (an slmkit format, or a
    ``quantization_config``), whose layers store other tensors, only the tensors the dense
    model also has are compared, by shape; the format's loader accounts for the rest.

    Raises:
        ModelLoadError: a shape differs, a weight is missing, or a weight has no place.
    """
    forms, optional, ignored, prefix = expected_tensors(config, ref)
    disk = {name: (tuple(info["shape"]), f.name) for f, header in zip(files, headers)
            for name, info in header.items() if name != "__metadata__"}

    def place(name: str, form: dict) -> str | None:
        if name in form:
            return name
        if prefix and f"{prefix}.{name}" in form:
            return f"{prefix}.{name}"
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in form:
            return name[len(prefix) + 1:]
        return None

    # the stored layout is whichever form places the most of the file's tensors
    form = max(forms, key=lambda f: sum(place(n, f) is not None for n in disk))
    placed = {name: place(name, form) for name in disk}
    wrong = [(n, disk[n], form[k]) for n, k in placed.items() if k and disk[n][0] != form[k]]
    # A stored tensor the model does not use is refused only when its module is missing too
    # (a layer the config does not have); a stray buffer of a module that exists (GPT-2's
    # old attn.masked_bias) is dropped on load, as transformers does.
    modules = {".".join(k.split(".")[:i]) for k in form for i in range(k.count(".") + 1)}
    unexpected = [n for n, k in placed.items() if k is None
                  and not any(re.search(p, n) for p in ignored)
                  and place(n.rpartition(".")[0], dict.fromkeys(modules)) is None]
    missing = sorted(set(form) - set(placed.values()) - optional,
                     key=lambda k: [(0, int(t), "") if t.isdigit() else (1, 0, t)
                                    for t in k.split(".")])
    if getattr(config, "slmkit", None) or getattr(config, "quantization_config", None):
        unexpected = missing = []  # compressed layers: names differ by design
    if wrong:
        name, (shape, fname), want = wrong[0]
        detail = (f"'{name}' is {_dims(shape)} in {fname}, but the config makes it "
                  f"{_dims(want)}")
        more = len(wrong) - 1
    elif missing:
        detail, more = f"'{missing[0]}' is missing from the weights", len(missing) - 1
    elif unexpected:
        name = unexpected[0]
        detail = f"{disk[name][1]} holds '{name}', which the config has no place for"
        more = len(unexpected) - 1
    else:
        return
    if more:
        detail += f", and {more} more tensor{'s differ' if more > 1 else ' differs'}"
    raise ModelLoadError(f"'{ref}' has weights that do not match its config.json ({detail}); "
                         "restore the config.json the weights were saved with, or re-save "
                         "or re-download the model.")


def _dims(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "a scalar"
