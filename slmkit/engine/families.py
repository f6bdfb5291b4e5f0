"""The static-KV-cache decoder loop for the families beyond the Llama layout.

:class:`~slmkit.engine.runner.FastRunner` walks Llama / Qwen2 / Mistral blocks (and hands
their decode steps to the native step). :class:`FamilyRunner` is the same runner, with the
same :class:`~slmkit.engine.cache.KVCache`, batching of rows at different positions and
KV-cache dtypes, over every block shape of the ``fast_decode`` families of
:data:`slmkit.models.arch.ARCHS`. What differs per family is read from the modules and the
config, never from class names:

* **attention input**: separate ``q_proj``/``k_proj``/``v_proj`` (fused into one matmul when
  plain) or Phi-3's fused ``qkv_proj``; ``q_norm``/``k_norm`` RMSNorms over each head
  before RoPE (Qwen3, Gemma 3);
* **RoPE**: one table per layer type (Gemma 3: 10k base on local layers, 1M on global
  ones), partial rotary dims (Phi-3 with ``partial_rotary_factor``);
* **attention**: the module's own ``scaling`` (Gemma's ``query_pre_attn_scalar``, Granite's
  ``attention_multiplier``), logit soft-capping ``cap * tanh(s / cap)`` (Gemma 2), a
  sliding window per layer from ``sliding_window`` and ``layer_types``, whose KV cache is a
  ring of ``window + RING_SPARE`` rows (row ``position % rows``) instead of a row per
  position, so a sliding layer's memory does not grow with the sequence (Gemma 3 270M:
  15 of its 18 layers, window 512);
* **block**: Gemma's four norms (``post_attention_layernorm`` on the attention *output*,
  ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the MLP), Granite's
  ``residual_multiplier``; the MLP module as is (GELU-tanh or SiLU gated, or a mixture of
  experts that routes each token to its top-k experts: Mixtral, Qwen2-MoE);
* **ends**: the embedding module as is (Gemma's scales by sqrt(hidden) itself), Granite's
  ``embedding_multiplier`` and ``logits_scaling``, final logit soft-capping (Gemma 2/3).

Like :class:`FastRunner`'s loop it only *calls* the model's modules, so quantized, low-rank
and LoRA layers run unchanged. Its greedy output equals ``transformers``' at fp32
(``tests/test_families.py``). Decode steps of every family here go through the native step
(:mod:`slmkit.engine.native`: q/k head norms, fused q/k/v and gate/up, the residual
multiplier, Gemma's norms and caps, sliding rings, partial rotary dims, MoE routing) where
the model's modules allow; otherwise ``native_reason`` says what it lacks.
"""

from __future__ import annotations

import inspect

import torch

from slmkit.engine import ops
from slmkit.engine.cache import KVCache
from slmkit.engine.fuse import fused_mlp, fused_qkv
from slmkit.engine.runner import FastRunner, _STATIC_ROPE, kv_cache_dtype, sliding_windows
from slmkit.models import arch


def family_reason(model) -> str | None:
    """None when :class:`FamilyRunner` can run ``model``; otherwise why not."""
    cfg = model.config
    if not arch.arch_of(cfg.model_type).fast_decode:
        return f"model_type '{cfg.model_type}' is not in the fast families"
    core = getattr(model, "model", None)
    if core is None or not all(hasattr(core, a) for a in ("embed_tokens", "layers", "norm",
                                                           "rotary_emb")):
        return "unexpected module layout"
    attn = core.layers[0].self_attn
    has_qkv = hasattr(attn, "qkv_proj") or all(hasattr(attn, a)
                                               for a in ("q_proj", "k_proj", "v_proj"))
    if not (has_qkv and hasattr(attn, "o_proj") and hasattr(attn, "scaling")):
        return "unexpected attention layout"
    for key in _rope_params(cfg):
        if key.get("rope_type", "default") not in _STATIC_ROPE:
            return f"RoPE type '{key['rope_type']}' depends on the sequence length"
    return None


def _rope_params(cfg) -> list[dict]:
    """The RoPE parameter sets of a config (Gemma 3 keeps one per layer type)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params]


class FamilyRunner(FastRunner):
    """Decoder loop with a static KV cache for the ``fast_decode`` families.

    Args: as :class:`~slmkit.engine.runner.FastRunner`.
    """

    fast = True

    def __init__(self, model, n_slots: int, max_seq_len: int, fuse: bool = True,
                 native: bool = True, kv_cache: str = "auto"):
        core = model.model
        cfg = model.config
        self.model = model
        self.embed, self.layers, self.norm = core.embed_tokens, list(core.layers), core.norm
        self.lm_head = model.lm_head
        weight = self.norm.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.head_dim = arch.head_dim(cfg)
        self.windows = sliding_windows(cfg, len(self.layers))
        self.max_seq_len, self.n_slots = max_seq_len, n_slots
        kv_dtype, n_kv = kv_cache_dtype(model, kv_cache), arch.kv_heads(cfg)
        # a layer whose window is shorter than a sequence keeps a ring of its last keys;
        # every other layer a row per position (self.cache, which also keeps the lengths)
        self.where: list[tuple[int | None, int]] = []   # (ring rows or None, index)
        counts: dict[int | None, int] = {}
        for w in self.windows:
            rows = w + RING_SPARE if w and w + RING_SPARE < max_seq_len else None
            self.where.append((rows, counts.get(rows, 0)))
            counts[rows] = counts.get(rows, 0) + 1
        self.cache = KVCache(counts.get(None, 0), n_slots, n_kv, max_seq_len, self.head_dim,
                             kv_dtype, str(self.device))
        self.rings = {rows: KVCache(n, n_slots, n_kv, rows, self.head_dim, kv_dtype,
                                    str(self.device))
                      for rows, n in counts.items() if rows is not None}
        self.rope = self._rope_tables(core, cfg, max_seq_len)          # per layer (cos, sin)
        self.cos, self.sin = self.rope[0]
        self.qkv = [fused_qkv(layer.self_attn) if fuse and not hasattr(layer.self_attn,
                    "qkv_proj") else None for layer in self.layers]
        self.mlps = [(fused_mlp(layer.mlp) if fuse else None) or layer.mlp
                     for layer in self.layers]
        kind = cfg.model_type
        granite = kind == "granite"
        self.embed_mult = float(cfg.embedding_multiplier) if granite else None
        self.residual_mult = float(cfg.residual_multiplier) if granite else None
        self.logits_div = float(cfg.logits_scaling) if granite else None
        self.attn_cap = getattr(cfg, "attn_logit_softcapping", None)
        self.final_cap = getattr(cfg, "final_logit_softcapping", None)
        self.n_heads, self.n_kv = cfg.num_attention_heads, arch.kv_heads(cfg)
        self.native, self.native_reason = None, "disabled"
        if self.rings:
            # the native step writes a chunk's keys before its rows attend: past RING_SPARE
            # + 1 rows the ring would drop keys the chunk's first rows still see
            self.native_run = RING_SPARE + 1
        if native:
            self.native, self.native_reason = self._native()

    def _native(self):
        """The compiled decode step for these blocks, or why not: it covers blocks with
        q/k norms (Qwen3), fused q/k/v and gate/up (Phi-3), Granite's multipliers, Gemma's
        sandwich norms and per-layer RoPE, Gemma 2's attention soft-capping (in the step;
        the final cap is applied to its logits, :meth:`_logits`), partial rotary dims (RoPE
        on the first dims of each head), sliding-window rings (a layer's ring rows go to the
        step; prompt chunks of rings stay short, see :meth:`forward`) and MoE blocks with a
        Mixtral or Qwen-MoE router (top-k routing in the step)."""
        from slmkit.engine.native import NativeStep

        if self.cos.shape[-1] % 2:
            return None, f"{self.cos.shape[-1]} rotary dims (odd) have no native step"
        return NativeStep.create(self)

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's output as the model returns it: Granite's division, soft-capping."""
        if self.logits_div is not None:
            logits = logits / self.logits_div
        if self.final_cap is not None:
            logits = torch.tanh(logits / self.final_cap) * self.final_cap
        return logits.float()

    def _native_rows(self, h: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Draft verification on the native step (:meth:`FastRunner.forward_rows`), so each
        row's logits are a decode step's, bit for bit; the torch loop verifies otherwise."""
        if self.embed_mult is not None:
            h = h * self.embed_mult
        return self._logits(self.native.verify(h, slots, positions))

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV cache held: the full layers' and the sliding rings'."""
        return self.cache.nbytes + sum(r.nbytes for r in self.rings.values())

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` cached tokens of ``slot`` (speculative rollback). A
        ring keeps ``RING_SPARE`` rows beyond its window, so rolling back that many tokens
        never loses a key the window still needs."""
        if self.rings and int(self.cache.lengths[slot]) - length > RING_SPARE:
            raise RuntimeError(f"a sliding-window cache rolls back at most {RING_SPARE} "
                               "tokens")
        self.cache.lengths[slot] = length

    def _rope_tables(self, core, cfg, max_seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(cos, signed sin)`` ``[S, rotary dims]`` for every layer, from the model's own
        rotary module (one call per layer type where it takes one)."""
        rotary = core.rotary_emb
        per_type = "layer_type" in inspect.signature(rotary.forward).parameters
        types = getattr(cfg, "layer_types", None) or [None] * len(self.layers)
        tables: dict = {}
        with torch.inference_mode():
            positions = torch.arange(max_seq_len, device=self.device)[None]   # [1, S]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            for t in set(types) if per_type else {None}:
                cos, sin = rotary(probe, positions, t) if per_type else rotary(probe, positions)
                tables[t] = (cos[0], ops.signed_sin(sin[0]))                  # [S, R]
        return [tables[t if per_type else None] for t in types]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int],
                all_logits: bool = False) -> torch.Tensor:
        """Same contract as :meth:`FastRunner.forward`: ``[B, V]`` float32 logits of each
        row's last token (``[B, T, V]`` of every token with ``all_logits``)."""
        B, T = tokens.shape
        native = self.native if not all_logits else None
        self.tapped = None
        if native is not None and (T == 1 or (B == 1 and native.prefills)):
            ids = tokens[:, 0] if T == 1 else tokens[0]                      # [B] or [T]
            h = native.embed(ids) if native.embed is not None else \
                self.embed(ids.to(self.device))                              # [*, hidden]
            if self.embed_mult is not None:
                h = h * self.embed_mult
            if T == 1:
                logits = native(h, slots, starts)                            # [B, V]
                self.tapped = native.tapped
                self.cache.lengths[torch.tensor(slots)] = torch.tensor(starts) + 1
            else:       # a prompt chunk, in pieces of native_run rows (sliding rings)
                step = int(min(T, self.native_run))
                for t in range(0, T, step):
                    logits = native.prefill(h[t:t + step], slots[0], starts[0] + t)  # [1, V]
                self.cache.lengths[slots[0]] = starts[0] + T
            return self._logits(logits)
        key_len = max(starts) + T
        slot_t = torch.tensor(slots, dtype=torch.long)
        start_t = torch.tensor(starts, dtype=torch.long)
        first = slots[0] if slots == list(range(slots[0], slots[0] + B)) else None
        pos = start_t[:, None] + torch.arange(T)                             # [B, T]
        aligned = T == 1 and all(s == key_len - 1 for s in starts)
        masks: dict = {}
        for w, (rows, _) in zip(self.windows, self.where):
            if rows is not None:
                masks[rows] = ring_mask(start_t, T, rows, w).to(self.device)
            elif aligned and (w is None or key_len <= w):
                masks[w] = None
            else:
                masks[w] = ops.attention_mask(start_t, T, key_len, w).to(self.device)
        D, H, Hkv = self.head_dim, self.n_heads, self.n_kv
        h = self.embed(tokens.to(self.device))                               # [B, T, hidden]
        if self.embed_mult is not None:
            h = h * self.embed_mult
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            if self.qkv[i] is not None:
                q, k, v = self.qkv[i](x)
            elif hasattr(attn, "qkv_proj"):                                  # Phi-3
                y = attn.qkv_proj(x)
                q, k, v = y[..., :H * D], y[..., H * D:(H + Hkv) * D], y[..., (H + Hkv) * D:]
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q, k = q.view(B, T, -1, D), k.view(B, T, -1, D)                  # [B, T, H*, D]
            if hasattr(attn, "q_norm"):                                      # Qwen3, Gemma 3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)                      # [B, H*, T, D]
            v = v.view(B, T, -1, D).transpose(1, 2)
            cos, sin = self.rope[i]
            q, k = _rope(q, cos[pos][:, None], sin[pos][:, None]), \
                _rope(k, cos[pos][:, None], sin[pos][:, None])
            rows, j = self.where[i]
            if rows is None:
                self.cache.write(j, slot_t, start_t, k, v)
                keys, values = self.cache.read(j, slot_t, key_len, first)    # [B, Hkv, L, D]
                mask = masks[self.windows[i]]
            else:   # the ring's keys (read before this call's are written), then the new
                keys, values = self.rings[rows].read(j, slot_t, rows, first)  # [B, Hkv, R, D]
                keys = torch.cat([keys.to(k.dtype), k], dim=2)                # [B, Hkv, R+T, D]
                values = torch.cat([values.to(v.dtype), v], dim=2)
                mask = masks[rows]
            if keys.dtype != q.dtype:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            o = ops.attention(q, keys, values, mask, attn.scaling, softcap=self.attn_cap)
            if rows is not None:
                ring_write(self.rings[rows], j, slot_t, start_t, k, v)
            o = attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))            # [B, T, hidden]
            sandwich = hasattr(layer, "pre_feedforward_layernorm")          # Gemma 2 / 3
            if sandwich:
                o = layer.post_attention_layernorm(o)
            h = h + (o if self.residual_mult is None else o * self.residual_mult)
            x = layer.pre_feedforward_layernorm(h) if sandwich else layer.post_attention_layernorm(h)
            m = self.mlps[i](x)
            if sandwich:
                m = layer.post_feedforward_layernorm(m)
            h = h + (m if self.residual_mult is None else m * self.residual_mult)
            if T == 1 and i + 1 == self.tap_after:
                self.tapped = h[:, -1].float().clone()
        self.cache.lengths[slot_t] = start_t + T
        return self._logits(self.lm_head(self.norm(h if all_logits else h[:, -1])))


#: Rows a sliding-window ring holds beyond its window (room for a speculative rollback).
RING_SPARE = 32


def ring_positions(starts: torch.Tensor, rows: int) -> torch.Tensor:
    """Position held by each row of a ring of ``rows`` rows after ``starts[b]`` tokens:
    row ``j`` holds the latest ``p < start`` with ``p % rows == j``, or -1 when none.
    ``[B]`` -> ``[B, rows]`` int64."""
    back = starts[:, None] - 1 - torch.arange(rows)                          # [B, R]
    pos = torch.arange(rows) + rows * torch.div(back, rows, rounding_mode="floor")
    return torch.where(back >= 0, pos, torch.full_like(pos, -1))


def ring_mask(starts: torch.Tensor, new_tokens: int, rows: int, window: int) -> torch.Tensor:
    """Attention mask over a ring's keys followed by the ``new_tokens`` new ones: a query at
    ``p`` sees key position ``j`` when ``p - window < j <= p`` (the window) and the row
    holds a position. ``[B, 1, T, rows + T]`` bool."""
    q_pos = starts[:, None] + torch.arange(new_tokens)                       # [B, T]
    k_pos = torch.cat([ring_positions(starts, rows), q_pos], dim=1)          # [B, R + T]
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    return ((kp >= 0) & (kp <= qp) & (kp > qp - window))[:, None]


def ring_write(ring: KVCache, layer: int, slots: torch.Tensor, starts: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor) -> None:
    """Store new keys/values ``[B, Hkv, T, D]`` at rows ``position % rows`` of a ring (only
    the last ``rows`` of them can matter), in at most two contiguous pieces per row."""
    rows, T = ring.max_seq_len, k.shape[2]
    if T == 1:
        ring.write(layer, slots, starts % rows, k, v)
        return
    first = max(0, T - rows)
    for b in range(k.shape[0]):
        t = first
        while t < T:
            at = (int(starts[b]) + t) % rows
            n = min(T - t, rows - at)
            ring.write(layer, slots[b:b + 1], torch.tensor([at]), k[b:b + 1, :, t:t + n],
                       v[b:b + 1, :, t:t + n])
            t += n


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dims of each head (all of them, or a partial
    rotary fraction), the rest passed through. ``x`` ``[B, heads, T, D]``."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return ops.apply_rope_rolled(x, cos, sin_signed)
    return torch.cat([ops.apply_rope_rolled(x[..., :r], cos, sin_signed), x[..., r:]], dim=-1)
