"""``slm info``: what a model dir holds, read from its files without building the model."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from slmkit.models import formats, lineage
from slmkit.models.arch import context_length
from slmkit.models.io import open_model_dir

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
          "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


#: Subfolders that travel with a model dir but are not part of the model (training state,
#: ``slm search``'s report).
NOT_MODEL = {"checkpoints", "search"}


def dir_size(path: Path) -> int:
    """Bytes of the files that make up the model (training checkpoints excluded)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and not NOT_MODEL.intersection(f.relative_to(path).parts[:-1]))


#: input-embedding module names (models quantized before ``embedding_layers`` was recorded)
EMBEDDING_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings")


def model_info(ref: str | os.PathLike, sparsity: bool = True) -> dict[str, Any]:
    """Describe a model: architecture, parameters, dtypes, size, format and lineage.

    Parameters are counted from the safetensors headers (tied weights are stored once).
    Sparsity (fraction of exact zeros in 2-D weights) is measured by reading the tensors.
    """
    # the checks load_model makes, so info refuses what generate, prune, ... refuse
    model_dir, config, files, headers = open_model_dir(ref)
    fmt = formats.format_of(config)
    quant = getattr(config, "slmkit", None) or {}
    quant_bits = quant.get("bits") if quant.get("format") == "quant" else None
    grids = dict(quant.get("layer_grids") or {}) if quant_bits else {}   # mixed precision
    table = quant.get("embedding_layers")
    if table is None and quant_bits and quant.get("embeddings"):   # written before the record
        owners = {n.rpartition(".")[0] for h in headers for n in h if n.endswith(".qweight")}
        table = [o for o in owners if o.endswith(EMBEDDING_NAMES)
                 or (quant.get("tied_head") and o == "lm_head")]
    for name in table or [] if quant_bits else []:          # on the table's grid
        grids[name] = (quant.get("embedding_bits", quant_bits), quant.get("embedding_group_size"))
    # slm prune --compact: a layer's kept values stand for its dense out x in weights
    nm_layers = quant.get("layers") if quant.get("format") == "nm_sparse" else None
    nm_dense = {f"{k}.weight_nm_values": v[0] * v[1] for k, v in (nm_layers or {}).items()}
    dtypes: Counter[str] = Counter()
    n_params = 0
    weight_bytes = 0
    expert_params = 0
    for header in headers:
        for name, t in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            weight_bytes += n * _BYTES.get(t["dtype"], 4)
            if name in nm_dense:
                n = nm_dense[name]
            elif nm_layers and name.endswith(".weight_nm_mask"):
                n = 0
            else:
                bits, group = grids.get(name.rpartition(".")[0],
                                        (quant_bits, quant.get("group_size")))
                if bits == 3 and name.endswith(".qweight"):  # padded, or an older layout
                    n = _int3_params(t["shape"], header.get(name[:-len("qweight")] + "scales"),
                                     group)
                else:
                    n = _quant_params(name, n, bits)
            n_params += n
            dtypes[t["dtype"]] += n
            if ".experts" in name:
                expert_params += n
    n_exp = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    active = n_params - expert_params + expert_params * k // n_exp if (n_exp and k) else n_params
    info: dict[str, Any] = {
        "path": str(model_dir),
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "model_type": config.model_type,
        "params": n_params,
        "active_params": active,
        "dtype": dtypes.most_common(1)[0][0].lower() if dtypes else None,
        "dtypes": dict(dtypes),
        "weight_bytes": weight_bytes,
        "size_on_disk": dir_size(model_dir),
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "context": context_length(config),
        "format": fmt or "dense",
        "compression": getattr(config, "slmkit", None) or {},
        "quantization_config": _plain(getattr(config, "quantization_config", None)),
        "lineage": lineage.read_lineage(model_dir, ref=os.fspath(ref)),
    }
    if sparsity:
        info["sparsity"] = _sparsity(files, nm_dense)
    return info


def _quant_params(name: str, n: int, bits: int | None) -> int:
    """Parameters a tensor stands for: packed int4 codes hold two weights per byte (int3:
    :func:`_int3_params`), and a quantized layer's scales / zero points / input scales are
    not parameters."""
    if bits is None:
        return n
    if name.endswith(".qweight"):
        return n * 2 if bits == 4 else n
    if name.endswith((".scales", ".zeros", ".input_scale")):
        return 0
    return n


def _int3_params(shape, scales, group_size) -> int:
    """Weights a 3-bit ``qweight`` stands for: ``out x in``, ``in`` from its scales' group
    count when groups have a size; else from the packed width (eight per three bytes)."""
    out, cols = shape
    if scales is not None and group_size and group_size > 0:
        return out * scales["shape"][1] * group_size
    return out * cols * 8 // 3


def _plain(value):
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return json.loads(json.dumps(value, default=str))


def _sparsity(files: list[Path], compact: dict[str, int] | None = None) -> float:
    """Fraction of exact zeros over all floating 2-D weight matrices (``compact``: the kept
    values of an N:M layer -> the dense weights they stand for)."""
    import torch
    from safetensors import safe_open

    zeros = total = 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                if name in (compact or {}):
                    total += compact[name]
                    zeros += compact[name] - int((st.get_tensor(name) != 0).sum())
                    continue
                if not name.endswith("weight"):
                    continue
                t = st.get_slice(name)
                if len(t.get_shape()) != 2 or t.get_dtype() not in ("F32", "F16", "BF16"):
                    continue
                w = st.get_tensor(name)
                zeros += int((w == 0).sum())
                total += w.numel()
    return zeros / total if total else 0.0
