"""``slm export --format gguf``: one GGUF file for llama.cpp and Ollama.

The file is written with the ``gguf`` package from PyPI (the same writer llama.cpp's own
converter uses); the tensor data is packed by :mod:`slmkit.export.ggml_blocks` and, for
models already quantized by slmkit, by :mod:`slmkit.export.quant_map`. The metadata
(hyperparameters, tokenizer, chat template) comes from :mod:`slmkit.export.gguf_meta`.

The file appears at ``--out`` only when it is complete (temp file + rename); ``--ollama``
adds a ``Modelfile`` beside it for ``ollama create NAME -f Modelfile``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slmkit.errors import ConfigError, OutputError
from slmkit.export import ggml_blocks, gguf_meta, quant_map
from slmkit.models import arch
from slmkit.nn.experts import SplitExperts
from slmkit.nn.quant_linear import QuantLinear

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16",
               "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}


@dataclass
class GGUFResult:
    """What :func:`export_gguf` wrote."""

    path: Path
    arch: str
    quant: str
    pre_tokenizer: str
    n_tensors: int
    params: int
    size_bytes: int
    types: Counter = field(default_factory=Counter)
    from_quantized: int = 0     # layers carried over from a slmkit-quantized model
    requantized: int = 0        # of those, layers re-rounded (AWQ input_scale kept)
    modelfile: Path | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_bytes / max(1, self.params)

    def rows(self) -> list[tuple[str, str]]:
        from slmkit.console import human_bytes

        rows = [("architecture", self.arch), ("quant", self.quant),
                ("tensors", ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))),
                ("pre-tokenizer", self.pre_tokenizer),
                ("size", f"{human_bytes(self.size_bytes)} ({self.bits_per_weight:.2f} bits "
                         "per weight)")]
        if self.from_quantized:
            rows.append(("calibrated layers kept", f"{self.from_quantized - self.requantized}"
                         f" of {self.from_quantized} exactly"
                         + (f" ({self.requantized} re-rounded: AWQ input scale)"
                            if self.requantized else "")))
        rows.append(("written to", str(self.path)))
        if self.modelfile:
            rows.append(("ollama", f"ollama create NAME -f {self.modelfile}"))
        return rows


def check_output_file(out: Path, overwrite: bool) -> None:
    """Refuse an output file path that cannot be written cleanly."""
    if out.is_dir():
        raise OutputError(f"Output '{out}' is a directory; pass a file path such as "
                          f"'{out / 'model.gguf'}'.")
    if not out.parent.is_dir():
        raise OutputError(f"The directory of output '{out}' does not exist; create "
                          f"'{out.parent}' first or choose another --out.")
    if out.exists() and not overwrite:
        raise OutputError(f"Output '{out}' already exists; choose a new --out or pass "
                          "--overwrite.")
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"Cannot write into '{out.parent}'; choose a writable --out.")


def export_gguf(model_ref: str, out: str | os.PathLike, quant: str | None = None,
                ollama: bool = False, overwrite: bool = False) -> GGUFResult:
    """Export a Llama/Qwen2/Mistral model directory to one GGUF file.

    Args:
        model_ref: model dir or hub id (dense, or quantized by ``slm quantize``).
        out: the ``.gguf`` file to write; its directory must exist.
        quant: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0`` or ``q4_1`` for the matrices
            (1-D norms and biases stay f32). Default: ``f16``; for a slmkit-quantized model,
            the block type its layers map to (used for its remaining dense matrices).
        ollama: also write ``Modelfile`` beside ``out``.
        overwrite: replace an existing ``out`` (and ``Modelfile``).

    Returns:
        A :class:`GGUFResult`.
    """
    import gguf

    from slmkit.console import progress
    from slmkit.models.io import load_config, load_model

    if quant is not None and quant not in QUANTS:
        raise ConfigError(f"--quant '{quant}' is not a GGUF type slmkit writes; use one of "
                          f"{', '.join(QUANTS)}.")
    out = Path(out).expanduser()
    check_output_file(out, overwrite)
    modelfile = out.parent / "Modelfile" if ollama else None
    if modelfile is not None and modelfile.exists() and not overwrite:
        raise OutputError(f"'{modelfile}' already exists; remove it or pass --overwrite.")
    model_dir, config = load_config(model_ref)
    arch, permute = gguf_meta.gguf_architecture(config, model_ref)
    model, tok = load_model(model_ref, dtype="fp32")
    meta = gguf_meta.tokenizer_meta(model_dir, tok, config.vocab_size, model_ref)
    quant = quant or _default_quant(model, model_ref)

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(model_dir.name)
    gguf_meta.write_hparams(writer, config, arch)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[quant]).value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_meta.write_tokenizer(writer, meta)

    result = GGUFResult(path=out, arch=arch, quant=quant, pre_tokenizer=meta.pre,
                        n_tensors=0, params=0, size_bytes=0)
    sources = list(_source_tensors(model, config))
    name_map = gguf_meta.tensor_name_map(arch, config.num_hidden_layers)
    with progress("packing tensors", total=len(sources)) as update:
        for hf_name, value in sources:
            name = gguf_meta.gguf_tensor_name(name_map, hf_name)
            value = gguf_meta.llamacpp_tensor(arch, hf_name, value)
            # a mixture's router stays f32, as llama.cpp's converter keeps ffn_gate_inp: a
            # rounded router flips which experts a token gets
            data, qtype, n = _encode(value, "f32" if name.endswith("ffn_gate_inp.weight")
                                     else quant, model_ref, result)
            heads = _rope_heads(hf_name, config) if permute else None
            if heads:
                data = gguf_meta.permute_rope_rows(torch.from_numpy(data), heads).numpy()
            raw = getattr(gguf.GGMLQuantizationType, qtype.upper())
            if qtype in ("f32", "f16"):
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=raw)
            result.types[qtype] += 1
            result.n_tensors += 1
            result.params += n
            update(1, info=name)
    _write_atomically(writer, out)
    result.size_bytes = out.stat().st_size
    if modelfile is not None:
        _write_text_atomically(modelfile, modelfile_text(out.name, meta))
        result.modelfile = modelfile
    return result


def _default_quant(model, model_ref: str) -> str:
    """``f16`` for dense models; the mapped block type for slmkit-quantized ones."""
    from slmkit.nn.quant_embedding import QuantEmbedding

    layers = [m for m in _quant_layers(model).values() if not isinstance(m, QuantEmbedding)]
    if not layers:
        return "f16"
    first = layers[0]                     # the linears' grid (a table may be int8 per row)
    return quant_map.ggml_type_for(first.bits, first.group_size, first.sym, model_ref)


def _quant_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _source_tensors(model, config):
    """``(hf_name, tensor or QuantLinear)`` for every weight the GGUF file needs."""
    quant = _quant_layers(model)
    tied = getattr(config, "tie_word_embeddings", False) or _same_codes(model)
    split = {n: m for n, m in model.named_modules() if isinstance(m, SplitExperts)}
    for name, value in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        prefix = next((p for p in split if name.startswith(p + ".")), None)
        if prefix is not None:            # quantized experts, one linear each: stacked
            if name == f"{prefix}.gate_up.0.{name.rsplit('.', 1)[1]}" and \
                    name.endswith((".qweight", ".weight")):
                experts = split[prefix]
                inter = experts.down[0].in_features
                yield prefix + ".gate_proj.weight", ExpertStack(
                    [_rows(m, 0, inter) for m in experts.gate_up])
                yield prefix + ".up_proj.weight", ExpertStack(
                    [_rows(m, inter, 2 * inter) for m in experts.gate_up], halves=True)
                yield prefix + ".down_proj.weight", ExpertStack(list(experts.down))
            continue
        if tied and (name == "lm_head.weight" or owner == "lm_head"):
            continue                      # llama.cpp reuses token_embd when output is absent
        if "rotary_emb" in name:
            continue
        if name.endswith(".experts.gate_up_proj"):     # fused [E, 2 I, H]: gate | up
            gate, up = value.chunk(2, dim=1)
            yield owner + ".gate_proj.weight", gate
            yield owner + ".up_proj.weight", up
            continue
        if name.endswith(".experts.down_proj"):
            yield name + ".weight", value
            continue
        if name.endswith(".shared_expert_gate.weight"):  # [1, hidden]: llama.cpp's is 1-D
            yield name, value.reshape(-1)
            continue
        if owner in quant and owner.endswith(".shared_expert_gate"):
            if name.endswith(".qweight"):     # llama.cpp reads this gate 1-D, as f32
                yield owner + ".weight", quant[owner].dense_weight().reshape(-1)
            continue
        if owner in quant:
            if name.endswith(".qweight"):
                yield owner + ".weight", quant[owner]
            elif name.endswith(".bias"):
                yield name, value
            continue                      # scales / zeros / input_scale live in the blocks
        yield name, value


class ExpertStack(list):
    """The experts' linears (``QuantLinear``, or dense weights) of one stage, written as one
    ``[experts, out, in]`` GGUF tensor: each expert's blocks one after another. ``halves``:
    the second halves of linears already counted (gate|up written as gate and up)."""

    def __init__(self, parts, halves: bool = False):
        super().__init__(parts)
        self.halves = halves


def _rows(layer, lo: int, hi: int):
    """Output rows ``lo:hi`` of a linear: a dense weight, or a ``QuantLinear`` holding
    those rows' codes and grid (exact: rows are quantized independently)."""
    if not isinstance(layer, QuantLinear):
        return layer.weight.detach()[lo:hi]
    part = QuantLinear(layer.in_features, hi - lo, layer.bits, layer.group_size, layer.sym,
                       input_scale=layer.input_scale is not None)
    part.load_state_dict({k: v[lo:hi] if k != "input_scale" else v
                          for k, v in layer.state_dict().items()})
    return part


def _same_codes(model) -> bool:
    """A quantized table whose LM head holds the very same codes (``slm quantize`` unties a
    tied head into a copy): llama.cpp then reuses ``token_embd``, so ``output`` is left out."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, QuantLinear) or not isinstance(head, QuantLinear):
        return False
    a, b = emb.state_dict(), head.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _encode(value, quant: str, model_ref: str, result: GGUFResult) -> tuple[np.ndarray, str, int]:
    """One tensor -> ``(array for the writer, ggml type name, parameter count)``."""
    if isinstance(value, ExpertStack):
        before = (result.from_quantized, result.requantized)
        parts = [_encode(v, quant, model_ref, result) for v in value]
        if value.halves:
            result.from_quantized, result.requantized = before
        if len({qtype for _, qtype, _ in parts}) != 1:
            raise ConfigError(f"'{model_ref}' has experts of one layer on different "
                              "quantization grids, which one GGUF tensor cannot hold; "
                              "re-quantize them alike or export the dense parent.")
        return np.stack([d for d, _, _ in parts]), parts[0][1], sum(n for _, _, n in parts)
    if not isinstance(value, torch.Tensor):           # a QuantLinear
        data, qtype, exact = quant_map.encode_quant_linear(value, model_ref)
        result.from_quantized += 1
        result.requantized += 0 if exact else 1
        return data, qtype, value.in_features * value.out_features
    t = value.detach().to(torch.float32)
    n = t.numel()
    if t.dim() == 1 or quant == "f32":
        return t.numpy().copy(), "f32", n
    if quant == "bf16":
        return ggml_blocks.to_bf16_bytes(t), "bf16", n
    if quant == "f16" or t.shape[-1] % ggml_blocks.QK:
        return ggml_blocks.to_f16(t), "f16", n     # rows not a whole number of blocks
    rows = ggml_blocks.QUANTIZERS[quant](t.reshape(-1, t.shape[-1]))   # experts: 3-D
    return rows.reshape(*t.shape[:-1], rows.shape[-1]), quant, n


def _rope_heads(hf_name: str, config) -> int | None:
    """Heads whose rows need the RoPE permutation, for q_proj / k_proj weights and biases."""
    if ".q_proj." in hf_name:
        return config.num_attention_heads
    if ".k_proj." in hf_name:
        return arch.kv_heads(config)
    return None


def _write_atomically(writer, out: Path) -> None:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def modelfile_text(gguf_name: str, meta: gguf_meta.TokenizerMeta) -> str:
    """An Ollama ``Modelfile``: ``FROM`` the file, a Go ``TEMPLATE``, ``PARAMETER stop``.

    ChatML chat templates (slmkit's own, Qwen2's) become Ollama's equivalent template;
    other models get a plain completion template.
    """
    chatml = bool(meta.chat_template) and "<|im_start|>" in meta.chat_template
    if chatml:
        template = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                    "{{ end }}<|im_start|>assistant\n")
    else:
        template = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
    stops = []
    for i in (meta.eot_id, meta.eos_id):
        if i is not None and meta.tokens[i] not in stops:
            stops.append(meta.tokens[i])
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
