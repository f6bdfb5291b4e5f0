"""Quantization-aware training (QAT): train through the exact grid the model is served on.

Each targeted ``nn.Linear`` becomes a :class:`QATLinear`: it keeps an fp32 master weight
(the trainable parameter) and a frozen grid (``scale``, ``zero`` per group, the packed
format's own ``[out, G]`` tensors), and its forward uses

    ``Ŵ = dequantize_codes(quantize_codes(W, scale, zero))``

-- the packed format's encoder and decoder themselves (:mod:`slmkit.nn.packing`), so the
trained weight is bit for bit the weight a ``QuantLinear`` made from it computes with.
The gradient passes straight through the rounding (the straight-through estimator,
Bengio et al. 2013) and is zero where the code was clamped (a weight pushed past the grid's
end gets no more push that way).

The grid comes from a post-training quantization of the starting model (Liu et al. 2023,
"LLM-QAT", arXiv:2305.17888; torchao's QAT starts from PTQ too): ``rtn`` takes the round-
to-nearest grid of the original weights, which stay the masters; ``gptq`` runs
:func:`~slmkit.compress.quantize.quantize_model` (GPTQ) and starts the masters at GPTQ's
dequantized weights, so step 0 *is* the GPTQ model and training only improves on it.

At the end :func:`convert` replaces every ``QATLinear`` by a ``QuantLinear`` holding the
codes of the final masters on the same grid and marks the config as the ``quant`` format:
the output is a packed quantized model, no PTQ step after, and its logits equal the
trained fake-quantized logits (checked on a batch at the end of every run and in tests).
With ``slm distill --teacher <the unquantized model>`` the loss is KD from the full
precision model; ``--qat-data-free N`` trains on N sequences the model samples itself.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from slmkit.errors import ConfigError
from slmkit.nn.packing import compute_qparams, dequantize_codes, quantize_codes

#: ``--qat`` values and their code widths
QAT_BITS = {"int8": 8, "int4": 4}


class _FakeQuant(torch.autograd.Function):
    """The packed format's round trip forward, the straight-through gradient backward."""

    @staticmethod
    def forward(ctx, w, scale, zero, bits: int, group_size: int):
        codes = quantize_codes(w, scale, zero, bits, group_size)          # [out, in] uint8
        out = dequantize_codes(codes, scale, zero, group_size, w.dtype)
        g = w.shape[1] if group_size == -1 else group_size
        raw = (w.float().reshape(w.shape[0], -1, g) / scale[..., None]).round() \
            + zero[..., None]
        ctx.save_for_backward(((raw >= 0) & (raw <= 2 ** bits - 1)).reshape(w.shape))
        return out

    @staticmethod
    def backward(ctx, grad):
        inside, = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize_on_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          bits: int, group_size: int) -> torch.Tensor:
    """``[out, in]`` weight through the packed grid (STE gradient; see :class:`QATLinear`)."""
    return _FakeQuant.apply(w, scale, zero, bits, group_size)


class QATLinear(nn.Module):
    """An ``nn.Linear`` trained through a frozen quantization grid.

    Args:
        linear: the layer to wrap; its ``weight`` and ``bias`` become this layer's.
        scale, zero: ``[out, G]`` float32 grid (from :func:`compute_qparams` or a PTQ run).
        bits, group_size, sym: the scheme, as ``slm quantize`` spells it.
    """

    def __init__(self, linear: nn.Linear, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_size: int, sym: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("scale", scale.float().clone())
        self.register_buffer("zero", zero.float().clone())
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.lora_A = self.lora_B = None
        self.scaling = 0.0

    def add_lora(self, rank: int, alpha: float) -> None:
        """QAT + LoRA: freeze ``weight`` and train ``W + alpha/r · B A`` through the grid
        (``A [r, in]`` Kaiming-uniform, ``B [out, r]`` zero, as peft initializes them), so the
        adapter learns what survives quantization and merges into the packed model."""
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        a = torch.empty(rank, self.in_features, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(a, a=5 ** 0.5)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=self.weight.dtype))
        self.scaling = alpha / rank

    def merged_weight(self) -> torch.Tensor:
        """The master weight the grid quantizes: ``W``, plus ``alpha/r · B A`` with LoRA."""
        if self.lora_A is None:
            return self.weight
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize_on_grid(self.merged_weight(), self.scale, self.zero, self.bits,
                                     self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        return nn.functional.linear(x, w.to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))

    def to_quant(self):
        """The packed ``QuantLinear`` of the current masters on this grid."""
        from slmkit.nn.quant_linear import QuantLinear

        with torch.no_grad():
            codes = quantize_codes(self.merged_weight().detach(), self.scale, self.zero,
                                   self.bits, self.group_size)
            return QuantLinear.from_codes(codes, self.scale, self.zero, self.bits,
                                          self.group_size, self.sym, bias=self.bias,
                                          dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        lora = "" if self.lora_A is None else f", lora_rank={self.lora_A.shape[0]}"
        return (f"{self.in_features}, {self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}{lora}")


def scheme(cfg):
    """``QuantizeOptions`` of a training config's ``--qat*`` options (bits, group, sym)."""
    from slmkit.compress.quantize import make_config

    kw = dict(method="rtn", bits=QAT_BITS[cfg.qat], sym=cfg.qat_sym)
    if cfg.qat_group_size is not None:
        kw["group_size"] = cfg.qat_group_size
    return make_config(quantize_embeddings=False, **kw)   # QAT trains the linears only


def prepare(model: nn.Module, tok, cfg) -> dict:
    """Wrap ``model``'s linears (``slm quantize``'s default targets: all but the LM head) in
    :class:`QATLinear`, on the grid of ``cfg.qat_start`` (rtn or gptq). In place.

    Returns:
        A summary for the result table (layers, scheme, start).
    """
    from slmkit.compress.match import match_linears
    from slmkit.compress.quantize import make_config, quantize_model
    from slmkit.nn.quant_linear import QuantLinear
    from slmkit.nn.surgery import set_module

    opts = scheme(cfg)
    linears = match_linears(model, opts.targets, opts.ignore)
    if not linears:
        raise ConfigError("--qat found no linear layers to quantize in this model.")
    bad = [n for n, m in linears.items() if type(m) is not nn.Linear]
    if bad:
        raise ConfigError(f"--qat trains plain nn.Linear layers, but {bad[0]} is a "
                          f"{type(linears[bad[0]]).__name__}; start from a dense model "
                          "(`slm quantize --dequantize` a quantized one).")
    if opts.group_size is None:
        opts = make_config(**{**opts.model_dump(include={"method", "bits", "sym"}),
                              "group_size": _auto_group(linears, opts),
                              "quantize_embeddings": False})
    from slmkit.compress.quantize.ops import check_scheme

    for name, lin in linears.items():
        check_scheme(opts.bits, opts.group_size, lin.in_features, name)
    ptq = {}
    if cfg.qat_start == "gptq":
        ptq_model = copy.deepcopy(model).float().eval()
        kw = opts.model_dump(include={"bits", "group_size", "sym"})
        quantize_model(ptq_model, tok, make_config(method="gptq", **kw,
                                                   quantize_embeddings=False,
                                                   calib_data=cfg.qat_calib_data,
                                                   calib_samples=cfg.qat_calib_samples))
        ptq = {n: m for n, m in ptq_model.named_modules() if isinstance(m, QuantLinear)}
    for name, lin in linears.items():
        with torch.no_grad():
            if name in ptq:
                q = ptq[name]
                scale, zero = q.scales.float(), q.zero_points().float()
                lin.weight.copy_(q.dequantize_weight(lin.weight.dtype))   # start at GPTQ's
            else:
                scale, zero = compute_qparams(lin.weight.detach(), opts.bits, opts.group_size,
                                              opts.sym)
        set_module(model, name, QATLinear(lin, scale, zero, opts.bits, opts.group_size,
                                          opts.sym))
    return {"layers": len(linears), "bits": opts.bits, "group_size": opts.group_size,
            "sym": opts.sym, "start": cfg.qat_start}


def _auto_group(linears: dict, opts) -> int:
    from slmkit.compress.quantize.ops import auto_group_size

    return -1 if opts.bits == 8 else auto_group_size(m.in_features for m in linears.values())


def convert(model: nn.Module, info: dict) -> nn.Module:
    """Replace every :class:`QATLinear` by its packed ``QuantLinear`` and mark the config as
    the ``quant`` format (what ``slm quantize`` writes). In place; returns ``model``."""
    from slmkit.compress.quantize import make_config
    from slmkit.compress.quantize.api import _mark_config
    from slmkit.nn.surgery import set_module

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}
    total = n_params = 0
    for name, m in layers.items():
        q = m.to_quant()
        set_module(model, name, q)
        total += q.in_features * q.out_features * q.bits_per_weight
        n_params += q.in_features * q.out_features
    opts = make_config(method="rtn", bits=info["bits"], group_size=info["group_size"],
                       sym=info["sym"], quantize_embeddings=False)
    _mark_config(model, opts, layers, total / max(n_params, 1))
    model.config.slmkit["method"] = f"qat ({info['start']} start)"
    return model


def self_generated_corpus(model, tok, n: int, seq_len: int, seed: int, path) -> str:
    """LLM-QAT's data-free set: ``n`` sequences the model samples itself (temperature 1),
    each from a random first token, written as a JSONL corpus; returns its path."""
    import json
    import random

    from slmkit.engine import Engine, SamplingParams

    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    engine = Engine(model, tok, max_batch=8, max_seq_len=seq_len + 2, background=False)
    handles = [engine.submit([rng.choice(vocab)], SamplingParams(
        max_tokens=seq_len, temperature=1.0, seed=seed * 100003 + i)) for i in range(n)]
    rows = [tok.decode(h.result().prompt_ids + h.result().token_ids, skip_special_tokens=True)
            for h in handles]
    engine.close()
    with open(path, "w", encoding="utf-8") as f:
        for text in rows:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


#: a fixed text whose logits each QAT run compares before and after packing
PROBE = "def mean(values):\n    return sum(values) / len(values)\n\nThe cat sat on the mat."


def qat_job(cfg, job):
    """Turn a training :class:`~slmkit.train.run.Job` into its QAT form: the model's linears
    train through the grid, and the job's ``finish`` ends with :func:`convert` plus the
    check that packed logits equal the fake-quantized ones on :data:`PROBE`."""
    from slmkit.nn.quant_linear import set_kernel_mode

    method = getattr(cfg, "method", "full")
    if method not in ("full", "lora"):
        raise ConfigError(f"--qat trains through its own grid; --method {method} already "
                          "quantizes the base. Use --method lora or full.")
    lora = None
    if method == "lora":             # the peft wrappers go; QATLinear carries the adapter
        peft_model = job.model
        lora = set(peft_model.peft_config["default"].target_modules)
        job.model = peft_model.unload()          # B = 0: nothing to merge yet
        if getattr(peft_model, "slmkit_lineage", None) is not None:
            job.model.slmkit_lineage = peft_model.slmkit_lineage
    val = job.val_batches[:cfg.qat_eval_batches] if job.val_batches else None
    before = _val_loss(job.model, job.objective, val)            # unquantized
    info = prepare(job.model, job.tok, cfg)
    info["val_loss_unquantized"] = before
    info["val_loss_start"] = _val_loss(job.model, job.objective, val)   # the PTQ start
    inner = job.finish
    if lora is not None:
        job.model.requires_grad_(False)
        adapted = [m for n, m in job.model.named_modules()
                   if isinstance(m, QATLinear) and n.rsplit(".", 1)[-1] in lora]
        for m in adapted:
            m.add_lora(cfg.rank, cfg.alpha)
        info["lora"] = {"rank": cfg.rank, "alpha": cfg.alpha, "layers": len(adapted),
                        "trainable_params": sum(p.numel() for p in job.model.parameters()
                                                if p.requires_grad)}
        inner = None                 # sft's finish writes a peft adapter; ours packs
        job.rows = [r for r in job.rows if r[0] not in ("output", "trainable")] + [
            ("trainable", f"{info['lora']['trainable_params']:,} (LoRA r={cfg.rank} on "
                          f"{len(adapted)} layers, trained through the grid)"),
            ("output", "packed quantized model (W + BA merged on the QAT grid)")]

    def finish(state):
        model, extra, rows = inner(state) if inner else (job.model, {}, [])
        ids = torch.tensor([job.tok(PROBE, add_special_tokens=False)["input_ids"]])
        model.eval()
        with torch.no_grad():
            trained = model(ids).logits.float()
            convert(model, info)
            set_kernel_mode("dequant")
            try:
                exact = float((model(ids).logits.float() - trained).abs().max())
            finally:
                set_kernel_mode("auto")
            kernel = float((model(ids).logits.float() - trained).abs().max())
        info.update(packed_vs_trained_max_diff=exact, kernel_vs_trained_max_diff=kernel,
                    val_loss_packed=_val_loss(model, job.objective, val))
        g = "per channel" if info["group_size"] == -1 else f"g{info['group_size']}"
        rows = [*rows,
                ("QAT", f"int{info['bits']} {g} {'sym' if info['sym'] else 'asym'}, "
                        f"{info['start']} start, {info['layers']} layers -> packed model"),
                ("packed vs trained logits", f"max |diff| {exact:.2g} (dequant kernel), "
                                             f"{kernel:.2g} (fast kernel)")]
        if val:
            fp, start, end = (math.exp(info[k]) for k in
                              ("val_loss_unquantized", "val_loss_start", "val_loss_packed"))
            info["recovered"] = (start - end) / (start - fp) if start > fp else None
            rows.append(("QAT val perplexity", f"unquantized {fp:.3f}, {info['start']} start "
                         f"{start:.3f}, packed output {end:.3f}"
                         + (f" ({info['recovered']:.0%} of the {info['start']} loss "
                            "recovered)" if info["recovered"] is not None else "")))
        return model, {**(extra or {}), "qat": dict(info)}, rows

    job.finish = finish
    job.rows = [*job.rows, ("QAT grid", f"{info['start']}, int{info['bits']}")]
    return job


def _val_loss(model, objective, batches) -> float | None:
    """Token-weighted loss of ``objective`` in eval mode (the plain LM loss for train and
    distill) on ``batches``, fp32; None without batches."""
    from slmkit.train.ops import IGNORE_INDEX

    if not batches:
        return None
    was = model.training
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            loss, _ = objective(model, batch)
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            total, count = total + float(loss) * n, count + n
    model.train(was)
    return total / max(count, 1)


def data_free_corpus(cfg):
    """A copy of ``cfg`` whose ``data`` is ``cfg.qat_data_free`` sequences sampled by the
    full-precision model (the teacher of a distillation, else ``--model``), cached by
    model, count, length and seed."""
    import hashlib

    from slmkit.data.tokens import cache_root
    from slmkit.models import load_model

    source = getattr(cfg, "teacher", None) or cfg.model
    key = hashlib.sha256(f"{source}|{cfg.qat_data_free}|{cfg.seq_len}|{cfg.seed}".encode())
    path = cache_root() / "qat-self-data" / f"{key.hexdigest()[:16]}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model, tok = load_model(source)
        tmp = path.with_suffix(".tmp")
        self_generated_corpus(model, tok, cfg.qat_data_free, cfg.seq_len, cfg.seed, tmp)
        tmp.replace(path)
    return cfg.model_copy(update={"data": str(path)})
