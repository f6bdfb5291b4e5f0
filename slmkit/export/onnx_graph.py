"""An export-friendly decoder graph with explicit KV-cache inputs and outputs.

ONNX Runtime has no notion of a ``transformers`` cache object, so the exported graph takes
the past keys/values as plain tensors and returns the extended ones::

    inputs:  input_ids [B, T] (int64),
             past_key_i, past_value_i [B, KVH, P, hd] for each layer i (P may be 0)
    outputs: logits [B, T, V],
             present_key_i, present_value_i [B, KVH, P + T, hd]

Positions continue from ``P`` (the past length), so prefill is a call with ``P = 0`` and
every decode step a call with ``T = 1``. All sequences of a batch share one length (no
padding mask); the runner decodes one sequence at a time.

:class:`ExportDecoder` reuses the loaded model's own modules (embedding, norms, linears),
so the weights are exactly the model's; only the attention and RoPE arithmetic is written
out here, in plain tensor ops that ``torch.onnx`` turns into standard ONNX operators. It
covers the Llama family (Llama, Mistral with its sliding window, Qwen2 with q/k/v biases):
RMSNorm, rotary embeddings in the Hugging Face "rotate half" convention (Su et al., 2021,
"RoFormer"), grouped-query attention (Ainslie et al., 2023) and a SiLU-gated MLP; and the
families of :mod:`slmkit.engine.families` (Qwen3, Phi-3, Granite, Gemma 2 / 3, Mixtral and
Qwen2-MoE), whose blocks it computes as ``FamilyRunner`` does, calling their norm and MLP
modules (a mixture as :meth:`ExportDecoder._moe`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.errors import ConfigError
from slmkit.models import arch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich, 2019) in float32, as Hugging Face Llama computes it."""
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """``cos, sin`` of shape ``[T, hd]`` for positions ``[T]`` and ``inv_freq`` ``[hd/2]``."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]   # [T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)                            # [T, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, hd]``: pairs ``(i, i + hd/2)`` (the NeoX / HF convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def causal_mask(positions: torch.Tensor, key_len: int, window: int | None) -> torch.Tensor:
    """Boolean ``[T, S]`` for query positions ``[T]`` (absolute, ``P .. P + T - 1``) over
    ``S = P + T`` keys: query at ``p`` may see key ``j`` iff ``j <= p`` (and ``p - j < window``
    with a sliding window)."""
    q_pos = positions[:, None]                            # [T, 1]
    k_pos = torch.arange(key_len)[None, :]                # [1, S]
    allowed = k_pos <= q_pos
    if window:
        allowed = allowed & (q_pos - k_pos < window)
    return allowed


class ExportDecoder(nn.Module):
    """A causal LM's forward pass with the KV cache as explicit tensors (see module doc).

    Args:
        model: a loaded ``*ForCausalLM`` of the Llama layout or a ``fast_decode`` family
            (dense linears).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.config
        facts = arch.arch_of(cfg.model_type)
        self.family = not facts.llama_layout
        if not (facts.llama_layout or facts.fast_decode):
            known = ", ".join(sorted(set(arch.supporting("llama_layout"))
                                     | {k for k, a in arch.ARCHS.items() if a.fast_decode}))
            raise ConfigError(f"ONNX export supports {known}, not '{cfg.model_type}'; "
                              f"slm generate / slm serve run '{cfg.model_type}' models as "
                              "they are.")
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        kinds = [v.get("rope_type", "default") for v in rope.values()
                 if isinstance(v, dict)] or [rope.get("rope_type", "default")]
        if any(k != "default" for k in kinds):
            raise ConfigError(f"ONNX export does not support RoPE scaling "
                              f"'{next(k for k in kinds if k != 'default')}' yet; use a model "
                              "with default RoPE.")
        self.model = model
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = arch.kv_heads(cfg)
        self.head_dim = arch.head_dim(cfg)
        self.eps = float(cfg.rms_norm_eps)
        window = getattr(cfg, "sliding_window", None)
        self.window = int(window) if window and getattr(cfg, "use_sliding_window", True) \
            else None
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        inv = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32)
                              / self.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        if self.family:
            self._family_setup(cfg)

    def _family_setup(self, cfg) -> None:
        """The per-layer facts of the other families, read from the model as
        :class:`~slmkit.engine.families.FamilyRunner` reads them: RoPE frequencies per layer
        type (partial rotary: fewer than the head dim), windows, scaling, caps, Granite's
        multipliers."""
        from slmkit.engine.runner import sliding_windows

        core = self.model.model
        rotary = core.rotary_emb
        types = getattr(cfg, "layer_types", None) or [None] * self.n_layers
        self.windows = sliding_windows(cfg, self.n_layers)
        self.rope_of = []
        for t in types:
            name = f"rope_{t or 'all'}"
            if not hasattr(self, name):
                inv = getattr(rotary, f"{t}_inv_freq", None) if t else None
                if inv is None:
                    inv = rotary.inv_freq
                scale = getattr(rotary, f"{t}_attention_scaling", None) if t else None
                scale = float(scale if scale is not None
                              else getattr(rotary, "attention_scaling", 1.0) or 1.0)
                self.register_buffer(name, inv.detach().float().clone(), persistent=False)
                setattr(self, name + "_scale", scale)
            self.rope_of.append(name)
        granite = cfg.model_type == "granite"
        self.embed_mult = float(cfg.embedding_multiplier) if granite else None
        self.residual_mult = float(cfg.residual_multiplier) if granite else None
        self.logits_div = float(cfg.logits_scaling) if granite else None
        self.attn_cap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_cap = getattr(cfg, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        """See the module docstring for shapes. Returns ``(logits, *present)``."""
        if self.family:
            return self._family_forward(input_ids, *past)
        core = self.model.model
        b, t = input_ids.shape
        p = past[0].shape[2]
        pos = torch.arange(t) + p                                     # [T]
        cos, sin = rope_cos_sin(pos, self.inv_freq)                   # [T, hd]
        mask = causal_mask(pos, p + t, self.window)                   # [T, P + T]
        h = core.embed_tokens(input_ids)                              # [B, T, D]
        present = []
        for i, layer in enumerate(core.layers):
            attn = layer.self_attn
            x = rms_norm(h, layer.input_layernorm.weight, self.eps)
            q = attn.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)   # [B, H|KVH, T, hd]
            k = torch.cat([past[2 * i], k], dim=2)                    # [B, KVH, P + T, hd]
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            h = h + attn.o_proj(self._attend(q, k, v, mask, b, t))
            x = rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        h = rms_norm(h, core.norm.weight, self.eps)
        return (self.model.lm_head(h), *present)

    def _family_forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        """The other families' blocks, as ``FamilyRunner.forward`` computes them: fused
        q/k/v (Phi-3), q/k head norms (Qwen3, Gemma 3), a RoPE table per layer type and
        partial rotary dims, per-layer windows and scaling, soft-capping and Gemma's four
        norms, Granite's multipliers; the norms, MLPs and embedding are the model's own
        modules."""
        core = self.model.model
        b, t = input_ids.shape
        p = past[0].shape[2]
        pos = torch.arange(t) + p                                     # [T]
        H, KVH, D = self.n_heads, self.n_kv, self.head_dim
        h = core.embed_tokens(input_ids)                              # [B, T, D]
        if self.embed_mult is not None:
            h = h * self.embed_mult
        present = []
        for i, layer in enumerate(core.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            if hasattr(attn, "qkv_proj"):
                y = attn.qkv_proj(x)
                q, k, v = y[..., :H * D], y[..., H * D:(H + KVH) * D], y[..., (H + KVH) * D:]
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q, k = q.view(b, t, H, D), k.view(b, t, KVH, D)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)               # [B, H|KVH, T, D]
            v = v.view(b, t, KVH, D).transpose(1, 2)
            name = self.rope_of[i]
            cos, sin = rope_cos_sin(pos, getattr(self, name))         # [T, R]
            scale = getattr(self, name + "_scale")
            cos, sin = cos * scale, sin * scale
            r = cos.shape[-1]
            if r == D:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            else:                                                     # partial rotary
                q = torch.cat([apply_rope(q[..., :r], cos, sin), q[..., r:]], dim=-1)
                k = torch.cat([apply_rope(k[..., :r], cos, sin), k[..., r:]], dim=-1)
            k = torch.cat([past[2 * i], k], dim=2)                    # [B, KVH, P + T, D]
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            mask = causal_mask(pos, p + t, self.windows[i])
            o = attn.o_proj(self._attend(q, k, v, mask, b, t, attn.scaling, self.attn_cap))
            sandwich = hasattr(layer, "pre_feedforward_layernorm")    # Gemma 2 / 3
            if sandwich:
                o = layer.post_attention_layernorm(o)
            h = h + (o if self.residual_mult is None else o * self.residual_mult)
            x = layer.pre_feedforward_layernorm(h) if sandwich else \
                layer.post_attention_layernorm(h)
            m = self._moe(layer.mlp, x) if hasattr(layer.mlp, "experts") else layer.mlp(x)
            if sandwich:
                m = layer.post_feedforward_layernorm(m)
            h = h + (m if self.residual_mult is None else m * self.residual_mult)
        logits = self.model.lm_head(core.norm(h))
        if self.logits_div is not None:
            logits = logits / self.logits_div
        if self.final_cap:
            logits = torch.tanh(logits / self.final_cap) * self.final_cap
        return (logits, *present)

    @staticmethod
    def _moe(block, x: torch.Tensor) -> torch.Tensor:
        """A mixture-of-experts block in traceable ops: the router's softmax and top k
        (renormalised where the router does) scattered into an ``[N, experts]`` weight
        matrix, every expert computed for every token and weighted by it (zero for the
        experts not chosen), plus Qwen2-MoE's sigmoid-gated shared expert. The same
        function as the block's per-expert loop, which the exporter cannot trace; it reads
        every expert, so ONNX Runtime runs a mixture at its total, not its active, size."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)                                       # [N, D]
        router = block.gate
        probs = F.linear(flat, router.weight).float().softmax(-1)     # [N, E]
        top, idx = torch.topk(probs, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            top = top / top.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(1, idx, top).to(flat.dtype)
        experts = block.experts
        gate, up = torch.einsum("nd,efd->nef", flat, experts.gate_up_proj).chunk(2, dim=-1)
        y = torch.einsum("nei,edi->ned", experts.act_fn(gate) * up, experts.down_proj)
        out = (y * weights[..., None]).sum(1)                         # [N, D]
        if hasattr(block, "shared_expert"):
            out = out + torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
        return out.reshape(b, t, d)

    def _attend(self, q, k, v, mask, b: int, t: int, scaling: float | None = None,
                cap: float | None = None) -> torch.Tensor:
        """Grouped-query attention: ``q`` ``[B, H, T, hd]``, ``k, v`` ``[B, KVH, S, hd]``
        -> ``[B, T, H * hd]`` (``scaling``: the query scale, default 1/sqrt(hd); ``cap``:
        scores soft-capped to ``cap * tanh(s / cap)``)."""
        group = self.n_heads // self.n_kv
        s = k.shape[2]
        q = q.reshape(b, self.n_kv, group * t, self.head_dim)         # heads of a group stacked
        if scaling is None:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)   # [B, KVH, G*T, S]
        else:
            scores = (q @ k.transpose(-1, -2)) * scaling
        if cap:
            scores = torch.tanh(scores / cap) * cap
        scores = scores.reshape(b, self.n_kv, group, t, s)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1).reshape(b, self.n_kv, group * t, s)
        out = (probs @ v).reshape(b, self.n_heads, t, self.head_dim)  # [B, H, T, hd]
        return out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)

    def empty_past(self, batch: int = 1) -> list[torch.Tensor]:
        """Past tensors of length 0 for a prefill call."""
        z = torch.zeros(batch, self.n_kv, 0, self.head_dim)
        return [z.clone() for _ in range(2 * self.n_layers)]

    def io_names(self) -> tuple[list[str], list[str]]:
        inputs = ["input_ids"] + [f"past_{kv}_{i}" for i in range(self.n_layers)
                                  for kv in ("key", "value")]
        outputs = ["logits"] + [f"present_{kv}_{i}" for i in range(self.n_layers)
                                for kv in ("key", "value")]
        return inputs, outputs
