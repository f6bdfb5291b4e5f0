"""``slm prune --structured``: remove heads, MLP channels, hidden channels and whole layers.

Minitron / LLM-Pruner style structured pruning (arXiv:2407.14679, arXiv:2305.11627): one
calibration pass records activation-based importance (``structured_ops``), then the
least important heads (KV groups under GQA), MLP channels, hidden channels and layers
are cut out of the weights. The result is a genuinely smaller *dense* model: a smaller
``config.json`` whose weights match it, which loads in plain transformers and runs faster.

Width is cut uniformly across layers (every layer keeps the same number of heads and
channels, as HF configs require) but *which* heads/channels go is chosen per layer.

With ``--target-params 0.75`` the tool enumerates splits (layers dropped x heads x hidden,
with the MLP cut solved to reach the target), scores each by calibration loss and keeps
the best. Supported: Llama, Qwen2 and Mistral layouts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slmkit.compress.prune import structured_ops as sops
from slmkit.errors import ConfigError
from slmkit.models.arch import ARCHS, arch_of, head_dim, supporting
from slmkit.compress.prune.config import StructuredOptions


@dataclass
class Plan:
    """How much to remove: counts, uniform over layers."""

    heads: int = 0
    mlp_channels: int = 0
    hidden: int = 0
    drop_layers: int = 0
    experts: int = 0


@dataclass
class Importance:
    """Calibration importance of every prunable unit of the original model."""

    heads: torch.Tensor  # [L, H]
    mlp: torch.Tensor  # [L, I]
    hidden: torch.Tensor  # [D]
    layers: torch.Tensor  # [L] block influence
    experts: torch.Tensor | None = None  # [L, E] router probability mass (mixtures)


@dataclass
class StructuredResult:
    """The pruned model and what was measured."""

    model: nn.Module
    plan: Plan
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    candidates: int = 1

    def metrics(self) -> dict:
        return {"params": self.params_after, "params_before": self.params_before,
                "param_fraction": round(self.params_after / max(1, self.params_before), 4),
                "calib_loss_before": round(self.loss_before, 4),
                "calib_loss_after": round(self.loss_after, 4), "dropped_layers": self.dropped,
                "shape_before": self.before, "shape_after": self.after}

    def removed_rows(self) -> list[tuple]:
        rows = []
        for key in ("layers", "heads", "kv_heads", "mlp_channels", "hidden", "experts"):
            if key not in self.before:
                continue
            b, a = self.before[key], self.after[key]
            rows.append((key, b, a, b - a))
        return rows


def _shape(config) -> dict:
    shape = {"layers": config.num_hidden_layers, "heads": config.num_attention_heads,
             "kv_heads": config.num_key_value_heads, "mlp_channels": config.intermediate_size,
             "hidden": config.hidden_size}
    if _experts_key(config):
        shape["experts"] = getattr(config, _experts_key(config))
    return shape


def _experts_key(config) -> str | None:
    """The config field counting a mixture's experts (Mixtral's or Qwen-MoE's), or None."""
    for key in ("num_local_experts", "num_experts"):
        if getattr(config, key, None):
            return key
    return None


def check_supported(model: nn.Module) -> None:
    """The Llama layout and the ``fast_decode`` families: Qwen3, Granite, Gemma 2/3, Phi-3
    with its fused q/k/v and gate/up (the same q/k/v/o and gate/up/down shapes), and the
    mixtures of experts (whole experts, see :func:`check_plan`)."""
    kind = getattr(model.config, "model_type", "?")
    facts = arch_of(kind)
    if not (facts.llama_layout or facts.fast_decode):
        known = ", ".join(sorted(set(supporting("llama_layout"))
                                 | {k for k, a in ARCHS.items() if a.fast_decode}))
        raise ConfigError(f"Structured pruning supports {known} models, not "
                          f"'{kind}'; use unstructured pruning (--method wanda) instead.")


def scaled_embedding(config) -> bool:
    """Gemma multiplies its embedding by sqrt(hidden size) from the config: removing hidden
    channels would change that factor, so --hidden is refused there."""
    return bool(arch_of(config.model_type).norm_offset)


def head_mode(config, remove: int) -> str:
    """``"groups"`` / ``"within"`` for removing ``remove`` query heads, or a ConfigError."""
    h, kv = config.num_attention_heads, config.num_key_value_heads
    group = h // kv
    if remove >= h:
        raise ConfigError(f"--heads {remove} would prune all {h} attention heads of each layer "
                          f"(or more); remove fewer than {h}.")
    if remove % group == 0:
        return "groups"
    if remove % kv == 0:
        return "within"
    raise ConfigError(f"--heads {remove} does not fit {h} heads in {kv} KV groups; remove a "
                      f"multiple of {group} (whole groups) or of {kv} (heads in every group).")


def check_plan(config, plan: Plan) -> None:
    """Refuse plans that remove everything (or more) of some dimension."""
    if plan.heads:
        head_mode(config, plan.heads)
    key = _experts_key(config)
    if key is None and plan.experts:
        raise ConfigError(f"--experts {plan.experts}: '{config.model_type}' is not a mixture "
                          "of experts; prune heads, MLP channels, hidden channels or layers.")
    if key is not None and (plan.mlp_channels or plan.hidden):
        raise ConfigError(f"'{config.model_type}' is a mixture of experts, whose fused experts "
                          "--mlp-channels and --hidden do not slice; remove whole experts "
                          "(--experts), heads or layers instead.")
    if key is not None and plan.experts and \
            getattr(config, key) - plan.experts < config.num_experts_per_tok:
        raise ConfigError(f"--experts {plan.experts} would leave fewer than the "
                          f"{config.num_experts_per_tok} experts each token uses of the "
                          f"{getattr(config, key)}; remove at most "
                          f"{getattr(config, key) - config.num_experts_per_tok}.")
    if plan.hidden and scaled_embedding(config):
        raise ConfigError(f"--hidden {plan.hidden} would change the sqrt(hidden size) factor "
                          f"'{config.model_type}' multiplies its embedding by; prune heads, "
                          "MLP channels or layers instead.")
    for flag, n, total in (("--mlp-channels", plan.mlp_channels, config.intermediate_size),
                           ("--hidden", plan.hidden, config.hidden_size),
                           ("--drop-layers", plan.drop_layers, config.num_hidden_layers)):
        if n >= total:
            raise ConfigError(f"{flag} {n} would remove all {total} (or more) of the model's "
                              f"{flag.lstrip('-').replace('-', ' ')}; remove fewer than {total}.")
    if not shape_ok(config, plan):
        heads = config.num_attention_heads - plan.heads
        raise ConfigError(f"keeping {config.hidden_size - plan.hidden} hidden channels and "
                          f"{heads} attention heads is not a valid shape (transformers needs "
                          "the hidden size divisible by the number of heads); change --hidden "
                          "or --heads.")


def shape_ok(config, plan: Plan) -> bool:
    """transformers requires hidden_size % num_attention_heads == 0 after pruning."""
    heads = config.num_attention_heads - (plan.heads or 0)
    return heads > 0 and (config.hidden_size - (plan.hidden or 0)) % heads == 0


# --------------------------------------------------------------------------- importance

@torch.no_grad()
def collect_importance(model: nn.Module, batches: list[torch.Tensor]) -> Importance:
    """One pass over the calibration batches with hooks on every layer (full model)."""
    cfg = model.config
    layers = model.model.layers
    n_layers, n_heads = len(layers), cfg.num_attention_heads
    heads = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    mlp = torch.zeros(n_layers, cfg.intermediate_size, dtype=torch.float64)
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    influence = torch.zeros(n_layers, dtype=torch.float64)
    tokens = torch.zeros(n_layers, dtype=torch.float64)
    handles = []

    def flat(x):
        return x.reshape(-1, x.shape[-1])  # [B, T, C] -> [B*T, C]

    key = _experts_key(cfg)
    experts = torch.zeros(n_layers, getattr(cfg, key), dtype=torch.float64) if key else None
    for i, layer in enumerate(layers):
        def on_o(_m, args, i=i):
            heads[i] += sops.head_energy(flat(args[0]), n_heads)

        def on_router(m, args, i=i):      # the router's softmax mass per expert
            logits = torch.nn.functional.linear(flat(args[0]).float(), m.weight.float())
            experts[i] += logits.softmax(-1).sum(0).double()

        def on_down(_m, args, i=i):
            mlp[i] += sops.channel_abs_sum(flat(args[0]))

        def on_norm(_m, _args, out):
            hidden.add_(sops.channel_abs_sum(flat(out)))

        def on_block(_m, args, kwargs, out, i=i):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, (tuple, list)) else out
            s, n = sops.block_influence(flat(x_in), flat(x_out))
            influence[i] += s
            tokens[i] += n

        ffn = layer.mlp
        handles += [ffn.gate.register_forward_pre_hook(on_router) if hasattr(ffn, "experts")
                    else ffn.down_proj.register_forward_pre_hook(on_down),
                    layer.self_attn.o_proj.register_forward_pre_hook(on_o),
                    layer.input_layernorm.register_forward_hook(on_norm),
                    layer.post_attention_layernorm.register_forward_hook(on_norm),
                    layer.register_forward_hook(on_block, with_kwargs=True)]
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: on_norm(m, a, o)))
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return Importance(heads, mlp, hidden, influence / tokens.clamp_min(1), experts)


# --------------------------------------------------------------------------- slicing

def pruned_config(config, plan: Plan, kept_layers: list[int]):
    """A copy of ``config`` with the plan's smaller dimensions."""
    new = copy.deepcopy(config)
    h, kv = config.num_attention_heads, config.num_key_value_heads
    new.head_dim = head_dim(config)  # keep it explicit: hidden may shrink
    if plan.heads:
        if head_mode(config, plan.heads) == "groups":
            new.num_key_value_heads = kv - plan.heads // (h // kv)
        new.num_attention_heads = h - plan.heads
    new.intermediate_size = config.intermediate_size - plan.mlp_channels
    new.hidden_size = config.hidden_size - plan.hidden
    new.num_hidden_layers = len(kept_layers)
    if getattr(config, "layer_types", None):
        new.layer_types = [config.layer_types[i] for i in kept_layers]
    if hasattr(new, "max_window_layers"):
        new.max_window_layers = min(new.max_window_layers, len(kept_layers))
    if plan.experts:
        key = _experts_key(config)
        setattr(new, key, getattr(config, key) - plan.experts)
    return new


@torch.no_grad()
def apply_plan(model: nn.Module, imp: Importance, plan: Plan) -> tuple[nn.Module, list[int]]:
    """Build the smaller dense model (a new module; ``model`` is untouched).

    Returns:
        ``(pruned_model, dropped_layer_indices)``.
    """
    from transformers import AutoModelForCausalLM

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    drop = sorted(torch.topk(imp.layers, plan.drop_layers, largest=False).indices.tolist()) \
        if plan.drop_layers else []
    kept_layers = [i for i in range(n_layers) if i not in drop]
    new_cfg = pruned_config(cfg, plan, kept_layers)
    d = head_dim(cfg)
    hid = sops.keep_top(imp.hidden, cfg.hidden_size - plan.hidden) if plan.hidden else None
    mode = head_mode(cfg, plan.heads) if plan.heads else None
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in sd:
            out[name] = sops.take(sd[name], cols=hid)
    out["model.norm.weight"] = sops.take(sd["model.norm.weight"], rows=hid)
    for new_i, old_i in enumerate(kept_layers):
        src, dst = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        q_rows = kv_rows = None
        if plan.heads:
            q_heads, kv_heads = sops.heads_to_keep(imp.heads[old_i], cfg.num_key_value_heads,
                                                   plan.heads, mode)
            q_rows = sops.head_channels(q_heads, d)
            kv_rows = sops.head_channels(kv_heads, d) if mode == "groups" else None
        m_rows = sops.keep_top(imp.mlp[old_i], cfg.intermediate_size - plan.mlp_channels) \
            if plan.mlp_channels else None
        cuts = {"self_attn.q_proj": (q_rows, hid), "self_attn.k_proj": (kv_rows, hid),
                "self_attn.v_proj": (kv_rows, hid), "self_attn.o_proj": (hid, q_rows),
                "mlp.gate_proj": (m_rows, hid), "mlp.up_proj": (m_rows, hid),
                "mlp.down_proj": (hid, m_rows),
                # Phi-3's fused linears: rows q | k | v and gate | up
                "self_attn.qkv_proj": (_fused_rows([(q_rows, cfg.num_attention_heads * d),
                                                    (kv_rows, cfg.num_key_value_heads * d),
                                                    (kv_rows, cfg.num_key_value_heads * d)]),
                                       hid),
                "mlp.gate_up_proj": (_fused_rows([(m_rows, cfg.intermediate_size)] * 2), hid)}
        kept_experts = None
        if plan.experts and imp.experts is not None:
            kept_experts = sops.keep_top(imp.experts[old_i],
                                         imp.experts.shape[1] - plan.experts)
        for key, value in sd.items():
            if not key.startswith(src):
                continue
            local = key[len(src):]
            module, _, kind = local.rpartition(".")
            if kept_experts is not None and (local == "mlp.gate.weight"
                                             or module == "mlp.experts"):
                out[dst + local] = value.index_select(0, kept_experts).clone()  # router rows,
                continue                                                      # expert slices
            if module in cuts:
                rows, cols = cuts[module]
                out[dst + local] = sops.take(value, rows=rows, cols=cols if kind == "weight"
                                             else None)
            elif module.endswith("layernorm"):
                out[dst + local] = sops.take(value, rows=hid)
            else:
                out[dst + local] = value.clone()
    dtype = next(model.parameters()).dtype
    new = AutoModelForCausalLM.from_config(new_cfg, dtype=dtype)
    missing, unexpected = new.load_state_dict(out, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and new_cfg.tie_word_embeddings)]
    if missing or unexpected:  # a layout this module does not know: a bug, not user input
        raise RuntimeError(f"structured pruning produced mismatched weights: "
                           f"missing={missing[:3]} unexpected={unexpected[:3]}")
    new.tie_weights()
    return new.eval(), drop


def _fused_rows(parts: list[tuple[torch.Tensor | None, int]]) -> torch.Tensor | None:
    """Rows kept of a fused linear whose outputs are ``parts`` side by side, each
    ``(rows kept or None for all, its width)``; None when every row is kept."""
    if all(rows is None for rows, _ in parts):
        return None
    out, off = [], 0
    for rows, width in parts:
        out.append((torch.arange(width) if rows is None else rows) + off)
        off += width
    return torch.cat(out)


# --------------------------------------------------------------------------- search

def count_params(config) -> int:
    """Parameters of a model built from ``config`` (shared tensors once), without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def calib_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    total, n = 0.0, 0
    for ids in batches:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        total += float(out.loss) * ids.numel()
        n += ids.numel()
    return total / max(1, n)


def candidate_plans(config, target: int) -> list[Plan]:
    """Splits that reach ``target`` parameters: layers x heads x hidden, MLP cut solved."""
    h, kv, n_layers = config.num_attention_heads, config.num_key_value_heads, \
        config.num_hidden_layers
    group = h // kv
    head_opts = sorted({0} | {r for r in (group, kv, 2 * kv) if r < h and
                              (r % group == 0 or r % kv == 0)})
    d = config.hidden_size
    # Kept sizes stay multiples of 32 where the model allows, so the pruned model still
    # quantizes with groups of 32 (int4 kernels, GGUF Q4_0/Q8_0 blocks).
    step_h = 32 if d % 32 == 0 else 8
    step_m = 32 if config.intermediate_size % 32 == 0 else 8
    hidden_opts = [0] if scaled_embedding(config) else \
        sorted({0} | {int(d * f) // step_h * step_h for f in (0.125, 0.25)})
    plans = []
    for drop in range(0, n_layers // 2 + 1):
        for heads in head_opts:
            for hidden in hidden_opts:
                base = Plan(heads=heads, hidden=hidden, drop_layers=drop)
                if not shape_ok(config, base):
                    continue
                kept = list(range(n_layers - drop))
                p0 = count_params(pruned_config(config, base, kept))
                if p0 <= target:
                    if p0 >= 0.97 * target:
                        plans.append(base)
                    continue
                per_channel = 3 * (d - hidden) * (n_layers - drop)
                need = math.ceil((p0 - target) / per_channel)
                need = math.ceil(need / step_m) * step_m
                if need <= 0.75 * config.intermediate_size:
                    plans.append(Plan(heads, need, hidden, drop))
    return plans


def structured_prune(model: nn.Module, tokenizer, settings: StructuredOptions) -> StructuredResult:
    """Prune ``model`` structurally (see module docstring); returns a new, smaller model.

    Raises:
        ConfigError: unsupported architecture, conflicting or impossible targets.
    """
    from slmkit.compress.calibrate import block_precision, calibration_batches, resolve_precision
    from slmkit.console import log, track

    from slmkit.compress.prune.modifier import refuse_compressed

    settings.check_target()
    refuse_compressed(model, "prune")
    check_supported(model)
    cfg = model.config
    if settings.explicit():
        plans = [Plan(settings.heads or 0, settings.mlp_channels or 0, settings.hidden or 0,
                      settings.drop_layers or 0, settings.experts or 0)]
        check_plan(cfg, plans[0])
    batches = calibration_batches(tokenizer, settings.calib_data, n_samples=settings.calib_samples,
                                  seq_len=settings.calib_seq_len, seed=settings.seed)
    held_out = calibration_batches(tokenizer, settings.calib_data, n_samples=8,
                                   seq_len=settings.calib_seq_len, seed=settings.seed + 1)
    precision = resolve_precision(settings.calib_precision)
    with block_precision(precision):
        imp = collect_importance(model, list(track(batches, "importance")))
    params_before = count_params(cfg)
    if not settings.explicit() and _experts_key(cfg):
        raise ConfigError(f"--target-params is not searched for '{cfg.model_type}' (a mixture "
                          "of experts) yet; give --experts, --heads or --drop-layers.")
    if not settings.explicit():
        plans = candidate_plans(cfg, int(settings.target_params * params_before))
        if not plans:
            raise ConfigError(f"--target-params {settings.target_params} cannot be reached "
                              "by removing at most half the layers and 3/4 of the MLP "
                              "channels; use a larger fraction or explicit --drop-layers.")
    best = None
    for plan in track(plans, "scoring splits"):
        pruned, dropped = apply_plan(model, imp, plan)
        with block_precision(precision):
            loss = calib_loss(pruned, held_out)
        log.debug("plan %s: loss %.4f", plan, loss)
        if best is None or loss < best[0]:
            best = (loss, plan, pruned, dropped)
    loss, plan, pruned, dropped = best
    with block_precision(precision):
        loss_before = calib_loss(model, held_out)
    return StructuredResult(
        model=pruned, plan=plan, before=_shape(cfg), after=_shape(pruned.config),
        dropped=dropped, params_before=params_before, params_after=count_params(pruned.config),
        loss_before=loss_before, loss_after=loss, candidates=len(plans))


def decode_speeds(before: nn.Module, after: nn.Module, tokenizer, tokens: int = 32) -> dict:
    """Batch-1 decode tokens/s of the dense and the pruned model, measured side by side.

    Both run the plain transformers KV-cache loop (:func:`slmkit.models.timing.decode_tok_s`,
    the engine sits above this layer) after a 32-token prompt of this module's source; the
    runs are interleaved to share the machine's noise and the best of two is kept.
    """
    from pathlib import Path

    from slmkit.models.timing import decode_tok_s

    ids = tokenizer(Path(__file__).read_text(encoding="utf-8"),
                    add_special_tokens=False)["input_ids"][:32]
    runs = {name: [] for name in ("before", "after")}
    for _ in range(2):
        for name, model in (("before", before), ("after", after)):
            runs[name].append(decode_tok_s(model, ids, tokens) or 0.0)
    b, a = max(runs["before"]), max(runs["after"])
    return {"decode_tok_s_before": round(b, 2), "decode_tok_s": round(a, 2),
            "decode_speedup": round(a / b, 3) if b else None}
