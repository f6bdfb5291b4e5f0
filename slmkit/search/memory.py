"""The serving-memory model: peak resident memory of the engine serving a searched model.

What a model costs to serve is not its size on disk. On slmkit's engine, measured here:

* a quantized layer keeps its stored codes *and* what its kernels prepared from them: the
  int8/int4 ``torch`` kernels' packed copies (prefill runs through them), the native
  step's VNNI panels (as many bytes as the codes again, plus float scales), and a 3-bit
  layer, which has no packed kernel, a dense copy of its weight (more than a dense layer);
* the KV cache, preallocated for ``streams`` slots of ``context`` tokens at every kept
  layer (fp16 once any layer is quantized, the model's dtype otherwise);
* everything else (the interpreter, torch, transformers, the tokenizer, buffers): one
  ``base`` term, fitted on the dense model served in a fresh process.

Per ``(shape, option)`` the resident bytes of one layer are measured by building it, running
a prefill-sized and a decode-sized product through its kernels, building its native panels
when the native step can run it, and counting every tensor the layer then holds (cached
with the sensitivities). The prediction is ``base + fixed tensors + sum(layer bytes) +
KV cache``; :func:`measure_serving` measures the real peak of the written model in a fresh
process (``VmHWM``, reset after loading, so the load's transient copies do not count),
which the search reports against the prediction.

Run as ``python -m slmkit.search.memory DIR --streams N --context C`` it prints the
measurement as JSON (the search runs it that way, in a fresh process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from slmkit.search.space import Option


def _tensor_bytes(obj, seen: set) -> int:
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return key[1]
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    return 0


@torch.no_grad()
def resident_bytes(out_f: int, in_f: int, option: Option, native_step: bool) -> int:
    """Bytes one layer of this shape and option holds while the engine serves it: its state
    plus everything its kernels prepared (measured on a built layer, not counted by hand)."""
    from slmkit.search.cost import _layer, native_capable

    layer = _layer(out_f, in_f, option)
    seen: set = set()
    total = _tensor_bytes(list(layer.state_dict().values()), seen)
    if option.dense:
        return total
    layer(torch.randn(4, in_f))           # prefill (torch kernels) ...
    layer(torch.randn(1, in_f))           # ... and a decode-sized product
    if native_step and native_capable(option):
        from slmkit.engine import native

        native.panels(layer)
    return total + _tensor_bytes(layer._cache, seen)


def kv_bytes(config, streams: int, context: int, quantized: bool, layers: int | None = None
             ) -> int:
    """The engine's preallocated KV cache: keys and values of every layer for ``streams``
    slots of ``context`` tokens (fp16 when the model holds quantized layers, see
    :func:`slmkit.engine.runner.kv_cache_dtype`; otherwise fp32, the search's dtype)."""
    from slmkit.models import arch

    n = layers if layers is not None else config.num_hidden_layers
    per = 2 if quantized else 4
    return 2 * n * streams * arch.kv_heads(config) * context * arch.head_dim(config) * per


def serving_context(model, cfg) -> int:
    """Tokens per stream the KV cache is sized for: ``--context``, else the engine's
    default (the model's context, at most 2048)."""
    from slmkit.models import arch

    return int(cfg.context or min(arch.context_length(model.config) or 2048, 2048))


def measure_serving(model_dir, streams: int, context: int, tokens: int = 16,
                    threads: int | None = None) -> dict:
    """Serve ``model_dir`` in a fresh process: load it, reset the peak-RSS mark, build the
    engine for ``streams`` slots of ``context`` tokens and decode ``tokens`` tokens on each
    of ``streams`` concurrent requests. Returns ``{"peak_bytes", "kv_bytes",
    "per_stream_tok_s", "aggregate_tok_s", "path"}``."""
    cmd = [sys.executable, "-m", "slmkit.search.memory", str(model_dir), "--streams",
           str(streams), "--context", str(context), "--tokens", str(tokens)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"measuring the serving memory of {model_dir} failed: "
                           f"{r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _serve_main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    from slmkit.eval.speed import peak_rss, reset_peak_rss
    from slmkit.models.io import load_model
    from slmkit.search.cost import measure_streams

    model, tok = load_model(a.model_dir)
    reset_peak_rss()
    out = measure_streams(model, tok, a.streams, a.tokens, max_seq_len=a.context,
                          threads=a.threads)
    out["peak_bytes"] = peak_rss()
    print(json.dumps(out))


@dataclass
class MemoryModel:
    """``peak = base + fixed + sum(layer bytes) + KV cache`` (bytes)."""

    layer_bytes: dict[str, int]            # "out x in|option|native" -> bytes
    base: float
    streams: int
    context: int
    native: bool
    reference: dict = field(default_factory=dict)

    @staticmethod
    def key(out_f: int, in_f: int, option: Option, native: bool) -> str:
        return f"{out_f}x{in_f}|{option.key}|{'native' if native else 'torch'}"

    def layer(self, info, option: Option) -> int:
        return self.layer_bytes[self.key(info.out_features, info.in_features, option,
                                         self.native)]

    fixed: int = 0                         # tensors outside the searched units
    kv: dict = field(default_factory=dict)  # "quantized"/"dense" -> KV cache bytes
    units: dict = field(default_factory=dict)   # unit name -> {option key: bytes}

    def unit(self, name: str, option: Option) -> int:
        return self.units[name][option.key]

    def predict(self, choice: dict[str, Option]) -> int:
        """Peak resident bytes of serving ``choice`` (the KV cache fp16 once a layer is
        quantized, as the engine stores it)."""
        quantized = any(not o.dense for o in choice.values())
        return int(self.base + self.fixed + self.kv["quantized" if quantized else "dense"]
                   + sum(self.unit(n, o) for n, o in choice.items()))

    def layer_budget(self, max_bytes: int, quantized: bool = True) -> int:
        """What the searched units may hold within ``max_bytes`` of serving memory."""
        return int(max_bytes - self.base - self.fixed
                   - self.kv["quantized" if quantized else "dense"])

    def to_json(self) -> dict:
        return {"base": self.base, "fixed": self.fixed, "kv": self.kv, "units": self.units,
                "streams": self.streams, "context": self.context, "native": self.native, "reference": self.reference,
                "layer_bytes": self.layer_bytes}


def memory_model(model, model_dir, layers, cfg) -> MemoryModel:
    """Per-unit resident bytes (measured on built layers, cached), the fixed tensors, the
    KV cache, and ``base`` from the dense model served in a fresh process (cached)."""
    from slmkit.engine import native
    from slmkit.search.sensitivity import cache_root, embedding_table, model_fingerprint

    use_native = native.unavailable_reason() is None
    streams, context = cfg.streams, serving_context(model, cfg)
    fp = model_fingerprint(model)
    path = cache_root(cfg) / f"memory-v1-{fp}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    table = embedding_table(model)
    mm = MemoryModel(saved.get("layer_bytes", {}), 0.0, streams, context, use_native)
    for name, info in layers.items():
        row = {}
        for o in info.options:
            if table and name == table[0]:
                row[o.key] = _table_bytes(info, o, table[2] is not None, mm, use_native)
                continue
            k = mm.key(info.out_features, info.in_features, o, use_native)
            if k not in mm.layer_bytes:
                mm.layer_bytes[k] = resident_bytes(info.out_features, info.in_features, o,
                                                   use_native)
            row[o.key] = mm.layer_bytes[k] + (info.out_features * 4 if info.bias else 0)
        mm.units[name] = row
    seen, fixed = set(), 0
    skip = {table[2]} if table and table[0] in layers and table[2] else set()
    for name, t in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if owner in layers or owner in skip:
            continue
        fixed += _tensor_bytes(t.data, seen)
    mm.fixed = fixed
    mm.kv = {"quantized": kv_bytes(model.config, streams, context, True),
             "dense": kv_bytes(model.config, streams, context, False)}
    ref_key = f"s{streams}-c{context}"
    ref = saved.get("references", {}).get(ref_key)
    if ref is None:
        ref = measure_serving(model_dir, streams, context, threads=cfg.threads)
    dense = {n: Option(0) for n in layers}
    mm.base = ref["peak_bytes"] - (mm.fixed + mm.kv["dense"]
                                   + sum(mm.unit(n, o) for n, o in dense.items()))
    mm.reference = {"dense_peak_bytes": ref["peak_bytes"], "kv_bytes": ref.get("kv_bytes")}
    path.parent.mkdir(parents=True, exist_ok=True)
    refs = {**saved.get("references", {}), ref_key: ref}
    path.write_text(json.dumps({"layer_bytes": mm.layer_bytes, "references": refs}))
    return mm


def _table_bytes(info, option: Option, tied: bool, mm: MemoryModel, use_native: bool) -> int:
    """The embedding table's resident bytes: dense (a tied head shares it), or int8 rows
    (codes + fp16 scales) with a tied head as an int8 ``QuantLinear`` holding its own codes
    and what its kernels prepare."""
    v, d = info.out_features, info.in_features
    if option.dense:
        return v * d * 4
    head = 0
    if tied:
        k = mm.key(v, d, option, use_native)
        if k not in mm.layer_bytes:
            mm.layer_bytes[k] = resident_bytes(v, d, option, use_native)
        head = mm.layer_bytes[k]
    return v * d + v * 2 + head


if __name__ == "__main__":
    _serve_main()
