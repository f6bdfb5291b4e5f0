"""Model runners: run a batch of rows, each continuing its own sequence in a cache slot.

Two runners share one interface, :meth:`forward(tokens, slots, starts) -> logits`:

* :class:`FastRunner` for the Llama-layout families (``llama_layout`` in
  :data:`slmkit.models.arch.ARCHS`: Llama, Qwen2, Mistral): our own decoder loop
  over the model's modules with a static :class:`~slmkit.engine.cache.KVCache`, one-pass
  prefill and batched decode of rows at different positions. Its torch loop only *calls*
  the model's modules (norms, projections, MLP, embedding, LM head), never reads their
  weights, so a ``QuantLinear``, a LoRA wrapper or a low-rank layer with the same call
  signature runs unchanged, in whatever activation dtype the model uses (e.g. bf16).
  Decode steps (one new token per row) go through :mod:`slmkit.engine.native`, one
  compiled call per step, when the model's layers are fp32 ``nn.Linear`` or int8/int4
  ``QuantLinear`` with fp32 activations; prefill and every other model use the torch loop.
* :class:`GenericRunner` for everything else (GPT-2, Phi-3, Mixtral, ...): the model's own
  ``forward`` with one transformers ``DynamicCache`` per slot, row by row. Slower, but it
  is exactly what ``generate()`` does, so it is never wrong.
"""

from __future__ import annotations

import torch

from slmkit.engine import ops
from slmkit.engine.cache import KVCache
from slmkit.engine.fuse import fused_mlp, fused_qkv
from slmkit.models import arch

#: RoPE variants whose tables do not depend on the sequence length (safe to precompute).
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


def fast_path_reason(model) -> str | None:
    """None when :class:`FastRunner` can run ``model``; otherwise why not (for logs)."""
    cfg = model.config
    if not arch.arch_of(cfg.model_type).llama_layout:
        return f"model_type '{cfg.model_type}' is not in the fast families"
    core = getattr(model, "model", None)
    if core is None or not all(hasattr(core, a) for a in ("embed_tokens", "layers", "norm",
                                                           "rotary_emb")):
        return "unexpected module layout"
    attn = core.layers[0].self_attn
    if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
        return "unexpected attention layout"
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _STATIC_ROPE:
        return f"RoPE type '{rope}' depends on the sequence length"
    return None


#: ``kv_cache`` choices of :func:`make_runner` / ``Engine`` (``"auto"``: see kv_cache_dtype).
KV_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                   "int8": torch.int8}


def kv_cache_dtype(model, choice: str = "auto") -> torch.dtype:
    """The dtype a :class:`FastRunner` stores keys and values in.

    ``"auto"``: fp16 when the model computes in fp32 but its layers are quantized (int8 and
    int4 weights already round far more than fp16 keys and values do, and the cache is half
    the bytes to read per step and to hold), otherwise the model's own activation dtype, so
    a dense model's greedy output stays token-for-token that of ``transformers``.
    ``"int8"`` (asked for, never automatic): int8 codes with one scale per cached row (see
    :class:`~slmkit.engine.cache.KVCache`), half of fp16's bytes for attention to read.
    """
    if choice != "auto":
        if choice not in KV_CACHE_DTYPES:
            from slmkit.errors import ConfigError

            raise ConfigError(f"Unknown KV cache dtype '{choice}'; use auto, "
                              f"{', '.join(KV_CACHE_DTYPES)}.")
        return KV_CACHE_DTYPES[choice]
    from slmkit.nn.quant_linear import QuantLinear

    dtype = model.model.norm.weight.dtype
    if dtype == torch.float32 and any(isinstance(m, QuantLinear) for m in model.modules()):
        return torch.float16
    return dtype


def sliding_windows(config, n_layers: int) -> list[int | None]:
    """Per-layer sliding-window size (None = full attention), as transformers decides it."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None and len(types) == n_layers:
        return [window if t == "sliding_attention" else None for t in types]
    if arch.arch_of(config.model_type).window_all_layers:
        return [window] * n_layers
    return [None] * n_layers


class FastRunner:
    """Decoder loop with a static KV cache for Llama-family models.

    Args:
        model: a ``LlamaForCausalLM``/``Qwen2ForCausalLM``/``MistralForCausalLM`` (possibly
            with compressed or adapted linear modules).
        n_slots: concurrent sequences the cache holds.
        max_seq_len: tokens per sequence (prompt plus output).
        kv_cache: the cache dtype, ``"auto"`` or a key of :data:`KV_CACHE_DTYPES` (see
            :func:`kv_cache_dtype`).
    """

    fast = True
    #: most rows of one slot a native call takes (a verify run): the step writes every row's
    #: keys before any row attends (FamilyRunner's sliding rings keep a bound)
    native_run = float("inf")
    #: with set_tap(n): each decode step (one token per row) leaves the rows' hidden states
    #: after n blocks (transformers' ``hidden_states[n]``) in ``tapped`` [B, hidden] fp32
    tap_after = 0
    tapped = None

    def set_tap(self, after: int) -> None:
        """Tap the hidden states after ``after`` blocks on decode steps (0: off)."""
        if not 0 <= after <= len(self.layers):
            raise ValueError(f"tap after {after} blocks: the model has {len(self.layers)}")
        self.tap_after = after
        if self.native is not None:
            self.native.tap_after = after

    def __init__(self, model, n_slots: int, max_seq_len: int, fuse: bool = True,
                 native: bool = True, kv_cache: str = "auto"):
        core = model.model
        self.model = model
        self.embed, self.layers, self.norm = core.embed_tokens, list(core.layers), core.norm
        self.lm_head = model.lm_head
        weight = self.norm.weight  # the embedding may be a QuantEmbedding (no .weight)
        self.dtype, self.device = weight.dtype, weight.device
        cfg = model.config
        self.head_dim = arch.head_dim(cfg)
        n_kv = cfg.num_key_value_heads
        self.windows = sliding_windows(cfg, len(self.layers))
        self.max_seq_len = max_seq_len
        self.n_slots = n_slots
        self.cache = KVCache(len(self.layers), n_slots, n_kv, max_seq_len, self.head_dim,
                             kv_cache_dtype(model, kv_cache), str(self.device))
        with torch.inference_mode():
            positions = torch.arange(max_seq_len, device=self.device)[None]  # [1, S]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = core.rotary_emb(probe, positions)                     # [1, S, D]
        self.cos, self.sin = cos[0], ops.signed_sin(sin[0])                   # [S, D]
        self.norms = [(_norm_fn(layer.input_layernorm), _norm_fn(layer.post_attention_layernorm))
                      for layer in self.layers]
        self.final_norm = _norm_fn(self.norm)
        # one matmul for q/k/v and one for gate/up where the linears are plain nn.Linear
        self.qkv = [fused_qkv(layer.self_attn) if fuse else None for layer in self.layers]
        self.mlps = [(fused_mlp(layer.mlp) if fuse else None) or layer.mlp
                     for layer in self.layers]
        # decode steps (T = 1) in one compiled call when the model and the machine allow
        self.native, self.native_reason = None, "disabled"
        if native:
            from slmkit.engine.native import NativeStep

            self.native, self.native_reason = NativeStep.create(self)

    def release(self, slot: int) -> None:
        """Forget a slot's sequence (its cache rows are simply overwritten later)."""
        self.cache.lengths[slot] = 0

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int],
                all_logits: bool = False) -> torch.Tensor:
        """Run new tokens through the model and return the logits of each row's last one.

        Args:
            tokens: ``[B, T]`` int64; row ``b`` continues the sequence in ``slots[b]`` whose
                cache already holds ``starts[b]`` tokens.
            slots: ``B`` distinct slot indices.
            starts: ``B`` start positions.
            all_logits: return ``[B, T, V]``, the logits of every token (torch loop only).

        Returns:
            ``[B, V]`` float32 logits.
        """
        B, T = tokens.shape
        native = self.native if not all_logits else None
        self.tapped = None
        if T == 1 and native is not None:
            h = (self.native.embed(tokens[:, 0]) if self.native.embed is not None
                 else self.embed(tokens.to(self.device))[:, 0])          # [B, hidden]
            logits = self.native(h, slots, starts)                       # [B, V]
            self.tapped = native.tapped
            self.cache.lengths[torch.tensor(slots)] = torch.tensor(starts) + 1
            return logits
        if B == 1 and native is not None and native.prefills:   # a prompt chunk
            rows = (self.native.embed(tokens[0]) if self.native.embed is not None
                    else self.embed(tokens.to(self.device))[0])           # [T, hidden]
            logits = self.native.prefill(rows, slots[0], starts[0])    # [1, V]
            self.cache.lengths[slots[0]] = starts[0] + T
            return logits
        key_len = max(starts) + T
        slot_t = torch.tensor(slots, dtype=torch.long)
        start_t = torch.tensor(starts, dtype=torch.long)
        first = slots[0] if slots == list(range(slots[0], slots[0] + B)) else None
        pos = start_t[:, None] + torch.arange(T)                     # [B, T]
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]    # [B, 1, T, D]
        aligned = T == 1 and all(s == key_len - 1 for s in starts)
        masks: dict[int | None, torch.Tensor | None] = {}
        for w in set(self.windows):
            if aligned and (w is None or key_len <= w):
                masks[w] = None  # every row attends to all of its keys
            else:
                masks[w] = ops.attention_mask(start_t, T, key_len, w).to(self.device)
        D = self.head_dim
        h = self.embed(tokens.to(self.device))                       # [B, T, hidden]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            norm_in, norm_post = self.norms[i]
            x = norm_in(h)
            if self.qkv[i] is not None:
                q, k, v = self.qkv[i](x)                             # [B, T, N*] views
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(B, T, -1, D).transpose(1, 2)                  # [B, H, T, D]
            k = k.view(B, T, -1, D).transpose(1, 2)                  # [B, Hkv, T, D]
            v = v.view(B, T, -1, D).transpose(1, 2)                  # [B, Hkv, T, D]
            q, k = ops.apply_rope_rolled(q, cos, sin), ops.apply_rope_rolled(k, cos, sin)
            self.cache.write(i, slot_t, start_t, k, v)
            keys, values = self.cache.read(i, slot_t, key_len, first)  # [B, Hkv, L, D]
            if keys.dtype != q.dtype:                                # a narrower cache
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            o = ops.attention(q, keys, values, masks[self.windows[i]], attn.scaling)
            o = o.transpose(1, 2).reshape(B, T, -1)                  # [B, T, H * D]
            h = h + attn.o_proj(o)
            h = h + self.mlps[i](norm_post(h))
            if T == 1 and i + 1 == self.tap_after:
                self.tapped = h[:, -1].float().clone()
        self.cache.lengths[slot_t] = start_t + T
        if all_logits:
            return self.lm_head(self.final_norm(h)).float()              # [B, T, V]
        last = self.final_norm(h[:, -1])                                 # [B, hidden]
        return self.lm_head(last).float()                            # [B, V]

    @torch.inference_mode()
    def forward_rows(self, rows: list[list[int]], slots: list[int],
                     starts: list[int]) -> list[torch.Tensor]:
        """Speculative verification: each request's run of tokens, logits of every token.

        Args:
            rows: per request, its tokens at positions ``starts[b] ..`` (its last token and
                the drafts after it).
            slots, starts: as in :meth:`forward`.

        Returns:
            per request, ``[len(rows[b]), V]`` float32 logits. On the native step all runs go
            through one call whose rows are computed exactly as decode steps are; the torch
            loop runs one forward per request.
        """
        if self.native is not None and max(map(len, rows)) <= self.native_run:
            flat = torch.tensor([t for run in rows for t in run])
            h = (self.native.embed(flat) if self.native.embed is not None
                 else self.embed(flat.to(self.device)))                  # [N, hidden]
            row_slots = [s for run, s in zip(rows, slots) for _ in run]
            positions = [p + j for run, p in zip(rows, starts) for j in range(len(run))]
            logits = self._native_rows(h, row_slots, positions)          # [N, V]
            for run, s, p in zip(rows, slots, starts):
                self.cache.lengths[s] = p + len(run)
            return list(logits.split([len(run) for run in rows]))
        return [self.forward(torch.tensor([run]), [s], [p], all_logits=True)[0]
                for run, s, p in zip(rows, slots, starts)]

    def _native_rows(self, h: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """The native verify call of :meth:`forward_rows` (families scale and cap around it)."""
        return self.native.verify(h, slots, positions)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` cached tokens of ``slot`` (rejected drafts after them
        are simply overwritten later)."""
        self.cache.lengths[slot] = length

    def draft_reason(self) -> str | None:
        """None: this path verifies drafts (see :meth:`forward_rows`)."""
        return None


def _norm_fn(module):
    """A norm as one fused ``F.rms_norm`` call when that is bit-identical, else the module.

    The transformers RMSNorm of these families is 6 kernels (cast, pow, mean, add, rsqrt,
    two muls); ``F.rms_norm`` is one. In fp32 the two agree exactly; for other dtypes the
    module runs as is (it rounds at a different point).
    """
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if (type(module).__name__ in arch.RMS_NORMS and weight is not None and eps is not None
            and weight.dtype == torch.float32):
        shape = (weight.shape[0],)
        return lambda x: torch.nn.functional.rms_norm(x, shape, weight, eps)
    return module


class GenericRunner:
    """Any causal LM through its own ``forward`` and one ``DynamicCache`` per slot.

    Rows are run one at a time, so batching brings no speed-up here, but the result is
    exactly what transformers computes.
    """

    fast = False
    tap_after = 0
    tapped = None       # no hidden-state taps on transformers' own forward

    def set_tap(self, after: int) -> None:
        self.tap_after = after

    def __init__(self, model, n_slots: int, max_seq_len: int):
        self.model = model
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len
        self.device = next(model.parameters()).device
        self._caches: list = [None] * n_slots
        self._keep_arg = True

    def release(self, slot: int) -> None:
        self._caches[slot] = None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """Same contract as :meth:`FastRunner.forward`; returns ``[B, V]`` float32."""
        from transformers import DynamicCache

        out = []
        for b, slot in enumerate(slots):
            if starts[b] == 0 or self._caches[slot] is None:
                self._caches[slot] = DynamicCache(config=self.model.config)
            ids = tokens[b:b + 1].to(self.device)                    # [1, T]
            kwargs = dict(input_ids=ids, past_key_values=self._caches[slot], use_cache=True)
            if self._keep_arg:
                try:
                    result = self.model(**kwargs, logits_to_keep=1)
                except TypeError:
                    self._keep_arg = False
                    result = self.model(**kwargs)
            else:
                result = self.model(**kwargs)
            self._caches[slot] = result.past_key_values
            out.append(result.logits[0, -1].float())
        return torch.stack(out)                                      # [B, V]

    @torch.inference_mode()
    def forward_rows(self, rows: list[list[int]], slots: list[int],
                     starts: list[int]) -> list[torch.Tensor]:
        """Same contract as :meth:`FastRunner.forward_rows` (one forward per request)."""
        from transformers import DynamicCache

        out = []
        for run, slot, start in zip(rows, slots, starts):
            if start == 0 or self._caches[slot] is None:
                self._caches[slot] = DynamicCache(config=self.model.config)
            result = self.model(input_ids=torch.tensor([run], device=self.device),
                                past_key_values=self._caches[slot], use_cache=True)
            self._caches[slot] = result.past_key_values
            out.append(result.logits[0].float())                     # [T, V]
        return out

    def truncate(self, slot: int, length: int) -> None:
        """Drop cached tokens of ``slot`` after the first ``length`` (rejected drafts)."""
        cache = self._caches[slot]
        if cache is not None and cache.get_seq_length() > length:
            cache.crop(length - cache.get_seq_length())   # a negative count: tokens to drop

    def draft_reason(self) -> str | None:
        """Why drafts cannot be verified on this path (None when they can): a sliding-window
        cache layer keeps only its window, so rejected drafts could not be dropped."""
        cfg = self.model.config
        types = getattr(cfg, "layer_types", None) or []
        if getattr(cfg, "sliding_window", None) or any("sliding" in t for t in types):
            return ("speculative decoding on the generic path needs full attention in every "
                    f"layer; this {cfg.model_type} model has sliding-window layers")
        return None


def make_runner(model, n_slots: int, max_seq_len: int, fast: bool | None = None,
                kv_cache: str = "auto"):
    """The fastest runner that is correct for ``model``.

    Args:
        fast: None picks automatically; False forces the generic path; True requires the
            fast path (raises ConfigError when the model is not supported).
        kv_cache: KV cache dtype of the fast path (see :func:`kv_cache_dtype`); the generic
            path keeps transformers' own cache.
    """
    from slmkit.errors import ConfigError

    if kv_cache != "auto":
        kv_cache_dtype(model, kv_cache)   # a bad name is an error on every path
    reason = fast_path_reason(model)
    family = None
    if reason is not None and fast is not False:   # Gemma, Qwen3, Phi-3, Granite, MoE
        from slmkit.engine.families import FamilyRunner, family_reason

        family = FamilyRunner if family_reason(model) is None else None
        if family is None and arch.arch_of(model.config.model_type).fast_decode:
            reason = family_reason(model)
    if fast is True and reason is not None and family is None:
        raise ConfigError(f"The fast engine path cannot run this model ({reason}); drop "
                          "--fast or use the generic path.")
    if family is not None:
        return family(model, n_slots, max_seq_len, kv_cache=kv_cache)
    if reason is None and fast is not False:
        return FastRunner(model, n_slots, max_seq_len, kv_cache=kv_cache)
    return GenericRunner(model, n_slots, max_seq_len)
