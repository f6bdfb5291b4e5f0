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
"RoFormer"), grouped-query attention (Ainslie et al., 2023) and a SiLU-gated MLP.
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
        model: a loaded Llama / Mistral / Qwen2 ``*ForCausalLM`` (dense linears).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.config
        if not arch.arch_of(cfg.model_type).llama_layout:
            known = ", ".join(arch.supporting("llama_layout"))
            raise ConfigError(f"ONNX export supports {known}, not '{cfg.model_type}'; use a "
                              "Llama-family model (slm generate / slm serve run "
                              f"'{cfg.model_type}' models as they are).")
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"ONNX export does not support RoPE scaling "
                              f"'{rope['rope_type']}' yet; use a model with default RoPE.")
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

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        """See the module docstring for shapes. Returns ``(logits, *present)``."""
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

    def _attend(self, q, k, v, mask, b: int, t: int) -> torch.Tensor:
        """Grouped-query attention: ``q`` ``[B, H, T, hd]``, ``k, v`` ``[B, KVH, S, hd]``
        -> ``[B, T, H * hd]``."""
        group = self.n_heads // self.n_kv
        s = k.shape[2]
        q = q.reshape(b, self.n_kv, group * t, self.head_dim)         # heads of a group stacked
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)   # [B, KVH, G*T, S]
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
