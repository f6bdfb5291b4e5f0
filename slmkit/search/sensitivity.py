"""Per-layer sensitivities: what each option of each linear costs in next-token KL.

For linear ``l`` and option ``o`` the sensitivity is ``KL(P_dense || P_{l <- o})``: the mean
over calibration tokens of the KL divergence of the dense model's next-token distribution
to that of the model in which *only* ``l`` is compressed with ``o`` (EvoPress, Sieberling
et al., 2025, and HAQ score whole models; the additive model over such one-layer KLs is the
classic first-order search objective, e.g. HAWQ-V2's sum of per-layer sensitivities).

How it is computed, in one layer-by-layer pass (:func:`slmkit.compress.calibrate.
calibrate_layer_by_layer`) so that the model never runs twice over the calibration set:

* the KL windows' hidden states at the input of every block are cached (dense), and the
  dense log-probabilities come from the very same "tail" function (blocks ``i..N-1``, final
  norm, head), so an unchanged layer scores exactly 0;
* per block, one pass collects each group's Hessian ``H = 2XXᵀ`` on the dense inputs (the
  linears of a group share it); every option's weight is then made with the existing
  quantizers (:func:`~slmkit.compress.quantize.gptq_ops.gptq_quantize_weight` on the
  group's stacked rows, or RTN) and its Hessian-weighted output error ``tr(ΔW H ΔWᵀ)`` is
  recorded;
* ``exact``: each option's weight is swapped in and the tail from block ``i`` scores it;
  ``scaled``: only the layer's smallest option is scored, and the others get
  ``KL_ref · err_o / err_ref`` (a quadratic model: KL and the output error are both
  second order in the perturbation).

Results are cached in a JSON file keyed by the model's weights and every setting that
changes them, and written after every block, so an interrupted search resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slmkit.compress.calibrate import (BlockInputs, calibrate_layer_by_layer,
                                      calibration_batches, capture_block_inputs, feed_linears,
                                      find_blocks, sequential_groups)
from slmkit.compress.hessian import HessianAccumulator
from slmkit.compress.match import match_linears, set_weight_matrix, weight_matrix
from slmkit.compress.quantize.gptq_ops import gptq_quantize_weight
from slmkit.errors import ConfigError
from slmkit.nn.packing import dequantize_codes, quantize_rtn
from slmkit.nn.surgery import linear_shape
from slmkit.search.space import DENSE, Option, layer_options, option_bytes

CACHE_VERSION = 1


@dataclass
class LayerInfo:
    """One searchable linear: its shape, options, their bytes and measured KL / error."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    options: list[Option]
    bytes: dict[str, int]
    kl: dict[str, float] = field(default_factory=dict)
    err: dict[str, float] = field(default_factory=dict)
    measured: list[str] = field(default_factory=list)   # options whose KL was run, not scaled
    mem: dict[str, int] = field(default_factory=dict)   # resident bytes when served (memory)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": [self.out_features, self.in_features],
                "bias": self.bias, "options": [o.key for o in self.options],
                "bytes": self.bytes, "kl": self.kl, "err": self.err, "measured": self.measured}

    @classmethod
    def from_json(cls, d: dict) -> LayerInfo:
        return cls(d["name"], d["shape"][0], d["shape"][1], d["bias"],
                   [Option.parse(k) for k in d["options"]], d["bytes"], d["kl"], d["err"],
                   d.get("measured", []))


def cache_root(cfg) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    root = os.environ.get("SLMKIT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "slmkit")
    return Path(root) / "search"


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's config and a sample of every parameter (cheap, content-based)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        k = min(64, flat.numel())
        idx = torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)
        h.update(name.encode())
        h.update(flat[idx].float().numpy().tobytes())
    return h.hexdigest()[:16]


def sensitivity_key(model: nn.Module, cfg) -> str:
    """The cache key: the weights plus every option that changes a sensitivity."""
    settings = {k: getattr(cfg, k) for k in (
        "calib_data", "calib_samples", "calib_seq_len", "seed", "calib_precision", "method",
        "bits", "group_sizes", "keep_dense", "sym", "sensitivity", "kl_samples",
        "kl_seq_len")}
    blob = json.dumps([CACHE_VERSION, model_fingerprint(model), settings], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def final_head(model: nn.Module):
    """``hidden [.., H] -> logits [.., V]`` after the last block: final norm, LM head and
    the config's logit scaling / soft-capping, as the model's own forward applies them."""
    norm = None
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                 "model.final_layernorm", "model.decoder.final_layer_norm"):
        try:
            norm = model.get_submodule(path)
            break
        except AttributeError:
            continue
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise ConfigError(f"slm search cannot find the final norm and head of "
                          f"{type(model).__name__}; it supports decoder-only models of the "
                          "Llama, GPT-2 and GPT-NeoX layouts.")
    cfg = model.config
    scaling = getattr(cfg, "logits_scaling", None)
    cap = getattr(cfg, "final_logit_softcapping", None)

    def run(h: torch.Tensor) -> torch.Tensor:
        logits = head(norm(h)).float()
        if scaling:
            logits = logits / scaling
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
    return run


class Tail:
    """Runs the model from block ``i`` on the cached KL hidden states and scores the KL of
    the result against the dense next-token distribution."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor], precision: str = "fp32"):
        from slmkit.compress.calibrate import resolve_precision

        _, self.blocks = find_blocks(model)
        self.head = final_head(model)
        self.batches = batches
        self.precision = resolve_precision(precision)
        self.inputs: list[BlockInputs] = []
        inputs = capture_block_inputs(model, batches)
        inputs.precision = self.precision
        for block in self.blocks:
            self.inputs.append(inputs)
            inputs = inputs.with_hidden(inputs.run(block))
        self.ref: list[torch.Tensor] = []        # dense log-probabilities [T, V]
        self.p: list[torch.Tensor] = []          # and probabilities
        with torch.no_grad():
            for b in range(len(batches)):
                ref = torch.log_softmax(self._logits(len(self.blocks), inputs, b), -1)
                self.ref.append(ref.reshape(-1, ref.shape[-1]))
                self.p.append(self.ref[-1].exp())
        self.n_tokens = sum(p.shape[0] for p in self.p)

    def _logits(self, start: int, inputs: BlockInputs, b: int) -> torch.Tensor:
        from slmkit.compress.calibrate import block_precision

        h = inputs.hidden[b]
        with block_precision(self.precision):
            for j in range(start, len(self.blocks)):
                out = self.blocks[j](h, *inputs.args[b], **inputs.kwargs[b])
                h = out[0] if isinstance(out, (tuple, list)) else out
            return self.head(h)

    @torch.no_grad()
    def kl_model(self, model: nn.Module, batches: list[torch.Tensor] | None = None) -> float:
        """Mean KL(dense || ``model``) per token through the model's own forward (any
        change, the embedding table and the head included)."""
        total = 0.0
        for ids, ref, p in zip(batches or self.batches, self.ref, self.p):
            z = model(input_ids=ids, use_cache=False).logits.float()
            logq = torch.log_softmax(z.reshape(-1, z.shape[-1]), -1)
            total += float((p * (ref - logq)).sum(-1).double().sum())
        return max(total / self.n_tokens, 0.0)

    @torch.no_grad()
    def kl_skip(self, index: int) -> float:
        """Mean KL(dense || the model without block ``index``): block ``index``'s input
        goes straight to the next block (ShortGPT-style layer dropping)."""
        total = 0.0
        for b, (ref, p) in enumerate(zip(self.ref, self.p)):
            z = self._logits(index + 1, self.inputs[index], b).float()
            logq = torch.log_softmax(z.reshape(-1, z.shape[-1]), -1)
            total += float((p * (ref - logq)).sum(-1).double().sum())
        return max(total / self.n_tokens, 0.0)

    @torch.no_grad()
    def kl(self, start: int) -> float:
        """Mean KL(dense || current model) per token, running blocks ``start..`` only
        (an unchanged model scores exactly 0: the same code made the reference)."""
        total = 0.0
        for b, (ref, p) in enumerate(zip(self.ref, self.p)):
            z = self._logits(start, self.inputs[start], b).float()
            logq = torch.log_softmax(z.reshape(-1, z.shape[-1]), -1)        # [T, V]
            total += float((p * (ref - logq)).sum(-1).double().sum())
        return max(total / self.n_tokens, 0.0)


def _quantize(w: torch.Tensor, hessian: torch.Tensor, opt: Option, cfg):
    """``(codes, scale, zero)`` of ``w`` ``[out, in]`` under ``opt`` (the existing
    quantizers, with the quantize step's defaults; the 8-bit grid skips GPTQ's range
    search, which finds nothing to clip there and costs most of the time per channel)."""
    if cfg.method == "gptq":
        codes, scale, zero = gptq_quantize_weight(w, hessian, opt.bits, opt.group_size,
                                                  cfg.sym, damp=0.01,
                                                  clip_search=opt.bits < 8,
                                                  preserve_zeros=True)
    else:
        codes, scale, zero = quantize_rtn(w, opt.bits, opt.group_size, cfg.sym)
    return codes, scale, zero


class LayerStore:
    """Every (layer, option)'s codes and grid from the sensitivity pass, one safetensors
    file per block (EvoPress's database of layer variants): the chosen model is assembled
    from exactly the weights that were scored, without quantizing again.

    Codes are stored packed (:func:`~slmkit.nn.packing.pack_codes`), scales as fp16 (the
    grid's own precision), zero points as uint8."""

    def __init__(self, root: Path):
        self.root = root

    def _file(self, block_name: str) -> Path:
        return self.root / f"{block_name}.safetensors"

    def save_block(self, block_name: str, entries: dict) -> None:
        from safetensors.torch import save_file

        from slmkit.nn.packing import pack_codes

        self.root.mkdir(parents=True, exist_ok=True)
        state = {}
        for (name, key), (codes, scale, zero) in entries.items():
            bits = Option.parse(key).bits
            state[f"{name}|{key}|codes"] = pack_codes(codes, bits).contiguous()
            state[f"{name}|{key}|scale"] = scale.to(torch.float16).contiguous()
            state[f"{name}|{key}|zero"] = zero.to(torch.uint8).contiguous()
        tmp = self._file(block_name).with_suffix(".tmp")
        save_file(state, str(tmp))
        tmp.replace(self._file(block_name))

    def has(self, block_name: str) -> bool:
        return self._file(block_name).exists()

    def load(self, name: str, opt: Option, in_features: int):
        """``QuantizedLayer`` of ``name`` under ``opt``, or None when not stored."""
        from safetensors import safe_open

        from slmkit.compress.quantize.modifiers import QuantizedLayer
        from slmkit.nn.packing import unpack_codes

        for f in sorted(self.root.glob("*.safetensors")):
            if not name.startswith(f.stem + "."):
                continue
            with safe_open(str(f), framework="pt") as st:
                k = f"{name}|{opt.key}|"
                if k + "codes" not in st.keys():
                    return None
                codes = unpack_codes(st.get_tensor(k + "codes"), opt.bits, in_features)
                return QuantizedLayer(codes, st.get_tensor(k + "scale").float(),
                                      st.get_tensor(k + "zero").float())
        return None


def layer_store(model: nn.Module, cfg) -> LayerStore:
    """The store of the sensitivity pass for this model and these settings."""
    return LayerStore(cache_root(cfg) / f"layers-{sensitivity_key(model, cfg)}")


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``: the layer's summed squared output error on the calibration inputs
    (up to the factor 2 of ``H = 2XXᵀ / n``)."""
    d = (w.float() - w_hat.float())
    return float(((d @ hessian) * d).sum())


def layer_infos(model: nn.Module, cfg) -> dict[str, LayerInfo]:
    """Every searchable linear (all but the LM head) with its options and their bytes."""
    linears = match_linears(model)
    dtype_bytes = next(model.parameters()).element_size()
    out = {}
    for name, m in linears.items():
        o, i = linear_shape(m)
        bias = getattr(m, "bias", None) is not None
        options = layer_options(i, cfg.bits, cfg.group_sizes, cfg.keep_dense)
        if not [x for x in options if not x.dense]:
            options = [DENSE]
        out[name] = LayerInfo(name, o, i, bias, options,
                              {x.key: option_bytes(x, o, i, bias, cfg.sym, dtype_bytes)
                               for x in options})
    emb = embedding_unit(model, cfg)
    if emb is not None:
        out[emb.name] = emb
    return out


def embedding_table(model: nn.Module) -> tuple[str, nn.Module, str | None] | None:
    """``(name, module, tied head name or None)`` of a plain input embedding table."""
    emb = model.get_input_embeddings()
    if type(emb) is not nn.Embedding:
        return None
    name = next(n for n, m in model.named_modules() if m is emb)
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    head_name = next(n for n, m in model.named_modules() if m is head) if tied else None
    return name, emb, head_name


def embedding_unit(model: nn.Module, cfg) -> LayerInfo | None:
    """The token embedding table as one more unit (``--embeddings``): kept as it is, or
    int8 per row as ``slm quantize --quantize-embeddings --embedding-bits 8`` stores it (a
    tied LM head then holds the same codes, written a second time)."""
    if not getattr(cfg, "embeddings", False) or 8 not in cfg.bits:
        return None
    found = embedding_table(model)
    if found is None:
        return None
    name, emb, head = found
    v, d = emb.weight.shape
    copies = 2 if head else 1
    h = HEADER_BYTES
    return LayerInfo(name, v, d, False, [DENSE, Option(8, -1)],
                     {"dense": v * d * emb.weight.element_size() + h,
                      "q8": copies * (v * d + v * 2 + 2 * h)})


HEADER_BYTES = 120


def quantize_table(model: nn.Module):
    """Store the embedding table int8 per row (the quantize step's own code); returns a
    function that puts the dense table (and tied head) back."""
    from slmkit.compress.quantize.api import quantize_embeddings
    from slmkit.compress.quantize.config import QuantizeOptions
    from slmkit.nn.surgery import set_module

    name, emb, head = embedding_table(model)
    old_head = model.get_submodule(head) if head else None
    tied = model.config.tie_word_embeddings
    quantize_embeddings(model, QuantizeOptions(bits=8, quantize_embeddings=True,
                                               embedding_bits=8))

    def restore() -> None:
        set_module(model, name, emb)
        if head:
            set_module(model, head, old_head)
        model.config.tie_word_embeddings = tied
    return restore


@torch.no_grad()
def measure_sensitivities(model: nn.Module, tokenizer, cfg, deadline: float | None = None,
                          log=None) -> tuple[dict[str, LayerInfo], Path, bool]:
    """Per-(layer, option) KL and output error, from the cache or measured now.

    Returns:
        ``(layers, cache file, complete)``; ``complete`` is False when ``deadline``
        (``time.monotonic()``) stopped the pass (what was measured is cached).
    """
    key = sensitivity_key(model, cfg)
    path = cache_root(cfg) / f"sensitivity-{key}.json"
    store = LayerStore(cache_root(cfg) / f"layers-{key}")
    layers = layer_infos(model, cfg)
    done: set[str] = set()
    if path.exists():
        saved = json.loads(path.read_text())
        for d in saved["layers"]:
            if d["name"] in layers:
                layers[d["name"]] = LayerInfo.from_json(d)
        done = set(saved.get("blocks_done", []))
    _, blocks = find_blocks(model)
    table = embedding_table(model)
    unit = layers.get(table[0]) if table else None
    if unit is not None and "q8" not in unit.kl:
        # the table's KL: one full forward with it stored int8 (blocks see other inputs)
        kl_batches = calibration_batches(tokenizer, cfg.calib_data, "train", cfg.kl_samples,
                                         cfg.kl_seq_len, batch_size=4, seed=cfg.seed + 1)
        tail = Tail(model, kl_batches)
        restore = quantize_table(model)
        try:
            unit.kl = {"dense": 0.0, "q8": tail.kl_model(model, kl_batches)}
            unit.err = {"dense": 0.0, "q8": 0.0}
            unit.measured = ["q8"]
        finally:
            restore()
        if path.exists():
            saved = json.loads(path.read_text())
            saved["layers"] = [d for d in saved["layers"] if d["name"] != unit.name] + \
                [unit.to_json()]
            path.write_text(json.dumps(saved))
    if len(done) == len(blocks) and all(store.has(f"{bp}.{i}") for i in range(len(blocks))
                                        for bp in [find_blocks(model)[0]]):
        return layers, path, True

    kl_batches = calibration_batches(tokenizer, cfg.calib_data, "train", cfg.kl_samples,
                                     cfg.kl_seq_len, batch_size=4, seed=cfg.seed + 1)
    tail = Tail(model, kl_batches)
    batches = calibration_batches(tokenizer, cfg.calib_data, "train", cfg.calib_samples,
                                  cfg.calib_seq_len, seed=cfg.seed) \
        if cfg.method == "gptq" else None
    state = {"stopped": False}

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "blocks_done": sorted(done),
                                   "layers": [x.to_json() for x in layers.values()]}))
        tmp.replace(path)

    def on_block(index: int, block_name: str, block: nn.Module, inputs: BlockInputs | None):
        if (block_name in done and store.has(block_name)) or state["stopped"]:
            return None
        if deadline is not None and time.monotonic() > deadline:
            state["stopped"] = True
            raise _Stopped      # the blocks after it need no forward pass either
        linears = {n: m for n, m in match_linears(block).items()}
        linears = {f"{block_name}.{n}": m for n, m in linears.items()
                   if f"{block_name}.{n}" in layers}
        if inputs is not None:
            groups = sequential_groups(block, inputs, linears)
            heads = {g[0]: linears[g[0]] for g in groups}
            accs = {n: HessianAccumulator(weight_matrix(m).shape[1]) for n, m in heads.items()}
            feed_linears(block, inputs, heads, lambda n, x: accs[n].add(x))
            hess = {n: accs[g[0]].hessian for g in groups for n in g}
        else:   # RTN: no data; the output error is measured against an identity Hessian
            groups = [[n] for n in linears]
            hess = {n: torch.eye(weight_matrix(m).shape[1]) for n, m in linears.items()}
        entries = {}
        for group in groups:
            ws = {n: weight_matrix(linears[n]).detach().float().clone() for n in group}
            options = [o for o in layers[group[0]].options if not o.dense]
            rows = [ws[n].shape[0] for n in group]
            for opt in options:
                codes, scale, zero = _quantize(torch.cat([ws[n] for n in group]),
                                               hess[group[0]], opt, cfg)
                stacked = dequantize_codes(codes, scale, zero, opt.group_size)
                for n, c, sc, z in zip(group, codes.split(rows), scale.split(rows),
                                       zero.split(rows)):
                    entries[(n, opt.key)] = (c, sc, z)
                for n, w_hat in zip(group, stacked.split(rows)):
                    layers[n].err[opt.key] = output_error(ws[n], w_hat, hess[n])
                    if cfg.sensitivity == "exact" or opt == options[-1]:
                        set_weight_matrix(linears[n], w_hat)
                        layers[n].kl[opt.key] = tail.kl(index)
                        if opt.key not in layers[n].measured:
                            layers[n].measured.append(opt.key)
                        set_weight_matrix(linears[n], ws[n])
            for n in group:
                info = layers[n]
                info.kl["dense"] = 0.0
                info.err["dense"] = 0.0
                if cfg.sensitivity == "scaled" and options:
                    ref = options[-1].key
                    for opt in options[:-1]:
                        ratio = info.err[opt.key] / info.err[ref] if info.err[ref] > 0 else 0.0
                        info.kl[opt.key] = info.kl[ref] * ratio
        store.save_block(block_name, entries)
        done.add(block_name)
        save()
        if log:
            log(index + 1, len(blocks), layers)
        return None

    try:
        if batches is not None:
            calibrate_layer_by_layer(model, batches, on_block, desc="layer sensitivities",
                                     precision=cfg.calib_precision)
        else:
            from slmkit.console import track

            path_name, _ = find_blocks(model)
            for i in track(range(len(blocks)), "layer sensitivities"):
                on_block(i, f"{path_name}.{i}", blocks[i], None)
    except _Stopped:
        pass
    return layers, path, len(done) == len(blocks)


class _Stopped(Exception):
    """The deadline passed: the sensitivity pass ends at the next block."""


@torch.no_grad()
def drop_sensitivities(model: nn.Module, tokenizer, cfg) -> list[float]:
    """Per decoder block, the next-token KL of the model with only that block dropped
    (one tail per block on the KL windows), cached beside the per-layer sensitivities."""
    path = cache_root(cfg) / f"drops-{sensitivity_key(model, cfg)}.json"
    if path.exists():
        return json.loads(path.read_text())["kl"]
    batches = calibration_batches(tokenizer, cfg.calib_data, "train", cfg.kl_samples,
                                  cfg.kl_seq_len, batch_size=4, seed=cfg.seed + 1)
    tail = Tail(model, batches)
    kls = [tail.kl_skip(i) for i in range(len(tail.blocks))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kl": kls}))
    return kls


def drop_blocks(model: nn.Module, drop: list[int]) -> dict[str, str]:
    """Remove decoder blocks ``drop`` in place (the config's layer count and per-layer
    fields as :func:`~slmkit.compress.prune.structured.pruned_config` writes them, each
    attention's cache index renumbered). Returns ``{old module prefix: new prefix}``."""
    from slmkit.compress.prune.structured import Plan, pruned_config
    from slmkit.nn.surgery import set_module

    path, blocks = find_blocks(model)
    kept = [i for i in range(len(blocks)) if i not in set(drop)]
    set_module(model, path, nn.ModuleList([blocks[i] for i in kept]))
    for new_i, block in enumerate(model.get_submodule(path)):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_i
    new = pruned_config(model.config, Plan(drop_layers=len(drop)), kept)
    for key in ("num_hidden_layers", "layer_types", "max_window_layers"):
        if hasattr(new, key):
            setattr(model.config, key, getattr(new, key))
    return {f"{path}.{old}": f"{path}.{i}" for i, old in enumerate(kept)}
