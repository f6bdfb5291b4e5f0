"""``slm export --format onnx``: a KV-cache decoder for ONNX Runtime, optionally int8.

The output is a directory::

    model.onnx          the decoder of :mod:`slmkit.export.onnx_graph` (incremental decode)
    onnx.json           input/output names and cache layout, read by the runner
    config.json, tokenizer files, slmkit.json (lineage, with the measured logit error)

The graph is exported with ``torch.onnx.export(dynamo=True)`` (``torch.export`` plus
onnxscript, the maintained exporter) with dynamic batch, sequence and past lengths, checked
with ``onnx.checker``, and then verified: ONNX Runtime's logits for a probe prompt (prefill
and cached decode steps) are compared with PyTorch's and the error is recorded. ``--int8``
applies ONNX Runtime's dynamic quantization (int8 weights, activations quantized per call).

A model quantized by slmkit is exported as its dequantized dense equivalent (ONNX Runtime
has its own int8 path: ``--int8``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit.errors import ConfigError
from slmkit.models import arch
from slmkit.nn.quant_linear import QuantLinear
from slmkit.nn.surgery import set_module

MODEL_FILE = "model.onnx"
META_FILE = "onnx.json"
OPSET = 18


@dataclass
class OnnxResult:
    """What :func:`export_onnx` wrote and measured."""

    out: Path
    arch: str
    int8: bool
    size_bytes: int
    max_logit_error: float
    greedy_match: bool
    dequantized: int = 0

    def rows(self) -> list[tuple[str, str]]:
        from slmkit.console import human_bytes

        rows = [("architecture", self.arch),
                ("weights", "int8 (ONNX Runtime dynamic)" if self.int8 else "float32"),
                ("inputs", "input_ids + past key/value per layer (incremental decode)"),
                ("max |Δlogit| vs PyTorch", f"{self.max_logit_error:.2e}"),
                ("greedy tokens vs PyTorch", "same" if self.greedy_match else "differ"),
                ("size", human_bytes(self.size_bytes)), ("written to", str(self.out))]
        if self.dequantized:
            rows.insert(1, ("note", f"{self.dequantized} slmkit-quantized layers exported "
                                    "dense"))
        return rows


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the onnx extra ({e.name} is missing); install "
                          "it with `pip install -e \".[onnx]\"`.") from None


def export_onnx(model_ref: str, out: str | os.PathLike, int8: bool = False,
                overwrite: bool = False, probe_tokens: int = 16) -> OnnxResult:
    """Export a model dir (the Llama layout or a `fast_decode` family) to an ONNX
    Runtime directory.

    Args:
        model_ref: model dir or hub id.
        out: output directory (written atomically; must not exist unless ``overwrite``).
        int8: apply ONNX Runtime dynamic int8 quantization to the matrices.
        probe_tokens: length of the verification prompt.

    Returns:
        An :class:`OnnxResult` with the measured logit error against PyTorch.
    """
    _require_onnx()
    from slmkit.export.onnx_graph import ExportDecoder
    from slmkit.models.io import atomic_dir, load_model, prepare_out_dir
    from slmkit.models.lineage import make_record, write_record

    prepare_out_dir(out, overwrite)[1].rmdir()   # fail fast on a bad --out
    model, tok = load_model(model_ref, dtype="fp32")
    dequantized = _to_dense(model)
    ExportDecoder(model)                          # refuses other architectures before writing
    if int8 and arch.arch_of(model.config.model_type).moe:
        raise ConfigError(f"--int8 on '{model.config.model_type}' would quantize only its "
                          "attention: ONNX Runtime's dynamic quantization leaves the experts' "
                          "fused weights (Einsum) fp32; export without --int8.")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_decoder(model, tmp, int8=int8, eos_token_id=tok.eos_token_id)
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        err, same = _verify(model, tmp, probe_tokens)
        params = {"format": "onnx", "int8": int8}
        metrics = {"max_logit_error": err, "greedy_match": same}
        write_record(tmp, make_record("export", params, metrics,
                                      list(getattr(model, "slmkit_lineage", []) or [])))
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    return OnnxResult(out=Path(out), arch=model.config.model_type, int8=int8,
                      size_bytes=size, max_logit_error=err, greedy_match=same,
                      dequantized=dequantized)


def write_decoder(model, out_dir: Path, int8: bool = False,
                  eos_token_id: int | None = None) -> dict:
    """Export ``model`` as ``model.onnx`` + ``onnx.json`` into an existing directory.

    Args:
        model: a dense Llama / Mistral / Qwen2 causal LM (float32).
        out_dir: where to write (the caller makes it atomic).
        int8: apply ONNX Runtime dynamic int8 quantization.

    Returns:
        The ``onnx.json`` contents (names and cache layout for :class:`OnnxRunner`).
    """
    from slmkit.export.onnx_graph import ExportDecoder

    decoder = ExportDecoder(model).eval()
    raw = out_dir / ("model.fp32.onnx" if int8 else MODEL_FILE)
    _export(decoder, raw)
    if int8:
        _quantize_int8(raw, out_dir / MODEL_FILE)
        raw.unlink()
    _check(out_dir / MODEL_FILE)
    inputs, outputs = decoder.io_names()
    meta = {"inputs": inputs, "outputs": outputs, "num_layers": decoder.n_layers,
            "num_kv_heads": decoder.n_kv, "head_dim": decoder.head_dim, "int8": int8,
            "opset": OPSET, "eos_token_id": eos_token_id,
            "model_type": model.config.model_type}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _to_dense(model) -> int:
    """Swap slmkit ``QuantLinear`` layers for dense ones (exported graphs use MatMul)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        set_module(model, name, model.get_submodule(name).to_dense())
    return len(names)


def _export(decoder, path: Path) -> None:
    """``torch.onnx.export`` (dynamo) with dynamic batch / sequence / past lengths."""
    from torch.export import Dim

    from slmkit.console import progress

    batch, seq, past_len = Dim("batch", max=64), Dim("seq", max=1 << 16), \
        Dim("past", min=0, max=1 << 16)
    example_ids = torch.zeros(1, 4, dtype=torch.long)
    example_past = tuple(torch.zeros(1, decoder.n_kv, 3, decoder.head_dim)
                         for _ in range(2 * decoder.n_layers))
    shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in example_past))
    inputs, outputs = decoder.io_names()
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with progress("exporting ONNX graph", total=None), warnings.catch_warnings(), \
            torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(decoder, (example_ids, *example_past), None,
                                    input_names=inputs, output_names=outputs,
                                    dynamic_shapes=shapes, dynamo=True, opset_version=OPSET,
                                    verbose=False)
        program.save(str(path))


def _quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights for MatMul, per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from slmkit.console import progress

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # onnxruntime logs a pre-processing hint on the root logger
    try:
        with progress("int8 dynamic quantization", total=None):
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


@torch.no_grad()
def _verify(model, export_dir: Path, n: int) -> tuple[float, bool]:
    """Max |logit error| of ONNX Runtime vs PyTorch on a probe (prefill + 4 cached steps),
    and whether 8 greedy tokens agree."""
    from slmkit.export.onnx_runner import OnnxRunner

    runner = OnnxRunner(export_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
    want = model(ids).logits[0].numpy()                          # [n, V]
    got = runner.logits(ids[0].tolist(), prefill=n - 4)          # [n, V]
    err = float(abs(got - want).max())
    prompt = ids[0, : n // 2].tolist()
    ours = list(runner.stream_tokens(prompt, 8, stop_at_eos=False))
    theirs = model.generate(ids[:, : n // 2], max_new_tokens=8, do_sample=False,
                            min_new_tokens=8, pad_token_id=0)[0, n // 2:].tolist()
    return err, ours == theirs
