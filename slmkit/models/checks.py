"""Checks that run before transformers touches a model directory.

Each check raises :class:`~slmkit.errors.ModelLoadError` with one sentence naming the
input and the fix, instead of the stack traces transformers would give.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from slmkit.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
# Encoder-only families whose "causal" head only exists when the config says is_decoder.
ENCODER_ONLY = {
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "electra", "ernie", "camembert",
    "bert-generation", "data2vec-text", "rembert", "roc_bert", "megatron-bert", "big_bird",
    "roformer", "xmod", "nezha", "modernbert", "distilbert", "albert", "deberta", "deberta-v2",
}


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
