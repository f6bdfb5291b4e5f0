"""A preallocated KV cache with request slots.

The whole cache is allocated once: ``[layers, slots, kv_heads, max_seq_len, head_dim]``
for keys and the same for values. A request borrows one slot for its lifetime, writes its
keys/values in place at its own positions, and gives the slot back when it finishes or is
cancelled. Nothing is reallocated per token. The :class:`~slmkit.engine.engine.Engine`
hands out the lowest free slot, which keeps running slots contiguous most of the time, so
the batched decode step reads the cache through a view instead of a gather.

An int8 cache stores each cached row (one position of one KV head, ``head_dim`` values) as
int8 codes plus one float32 scale, ``max|x| / 127``: a quarter of fp32's bytes (plus 4 per
row), half of fp16's, which is what attention streams per step at long contexts.
"""

from __future__ import annotations

import torch

from slmkit.errors import ConfigError

#: fp16's largest finite value: fp16 cache entries saturate there instead of becoming inf.
FP16_MAX = 65504.0


class KVCache:
    """Static per-layer key/value storage for ``n_slots`` sequences of up to ``max_seq_len``.

    Args:
        n_layers, n_slots, n_kv_heads, max_seq_len, head_dim: the cache geometry.
        dtype: storage dtype (the model's activation dtype, or a narrower one; writes round
            to it, fp16 saturating at +-65504), or ``torch.int8`` (codes and row scales).
        device: where the cache lives.

    Attributes:
        k, v: lists (one per layer) of ``[n_slots, n_kv_heads, max_seq_len, head_dim]``.
        ks, vs: int8 caches only: lists of ``[n_slots, n_kv_heads, max_seq_len]`` float32
            row scales (empty lists otherwise).
        lengths: ``[n_slots]`` int64 tokens currently stored per slot (owned by the runner).
    """

    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        if n_slots < 1 or max_seq_len < 2:
            raise ConfigError(f"KV cache needs at least 1 slot and 2 positions, got {n_slots} "
                              f"slots of {max_seq_len}; raise max_batch / max_seq_len.")
        shape = (n_slots, n_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.dtype = dtype
        self.quantized = dtype == torch.int8
        n_scaled = n_layers if self.quantized else 0
        self.ks = [torch.zeros(shape[:3], device=device) for _ in range(n_scaled)]
        self.vs = [torch.zeros(shape[:3], device=device) for _ in range(n_scaled)]
        self.lengths = torch.zeros(n_slots, dtype=torch.long)
        self.max_seq_len = max_seq_len
        self.n_slots = n_slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.ks + self.vs)

    def write(self, layer: int, slots: torch.Tensor, starts: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store new keys/values.

        Args:
            layer: layer index.
            slots: ``[B]`` slot indices.
            starts: ``[B]`` position of each row's first new token.
            k, v: ``[B, Hkv, T, D]``.
        """
        if self.quantized:
            (k, sk), (v, sv) = quantize_rows(k), quantize_rows(v)
            self._put(self.ks[layer], self.vs[layer], slots, starts, sk, sv)
        self._put(self.k[layer], self.v[layer], slots, starts, k, v)

    @staticmethod
    def _put(ck: torch.Tensor, cv: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v ``[B, Hkv, T, ...]`` into ``ck``, ``cv`` at each row's slot and positions."""
        B, T = k.shape[0], k.shape[2]
        if ck.dtype != k.dtype:   # a narrower cache: round once here (fp16 saturates)
            if ck.dtype == torch.float16:
                k, v = k.clamp(-FP16_MAX, FP16_MAX), v.clamp(-FP16_MAX, FP16_MAX)
            k, v = k.to(ck.dtype), v.to(ck.dtype)
        if B == 1:
            s, p = int(slots[0]), int(starts[0])
            ck[s, :, p:p + T] = k[0]
            cv[s, :, p:p + T] = v[0]
        elif T == 1:
            ck[slots, :, starts] = k[:, :, 0]  # [B, Hkv, D] scattered at (slot, :, pos)
            cv[slots, :, starts] = v[:, :, 0]
        else:
            for b in range(B):
                s, p = int(slots[b]), int(starts[b])
                ck[s, :, p:p + T] = k[b]
                cv[s, :, p:p + T] = v[b]

    def read(self, layer: int, slots: torch.Tensor, key_len: int,
             first_slot: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of ``slots`` up to ``key_len``: two ``[B, Hkv, key_len, D]`` tensors.

        When the slots are the contiguous range ``first_slot .. first_slot + B - 1`` the
        result is a view (no copy); otherwise it is gathered. An int8 cache returns its
        values decoded to float32 (a copy).
        """
        def take(t: torch.Tensor) -> torch.Tensor:
            if first_slot is not None:
                return t[first_slot:first_slot + slots.shape[0], :, :key_len]
            return t[slots, :, :key_len]

        keys, values = take(self.k[layer]), take(self.v[layer])
        if not self.quantized:
            return keys, values
        # int8: codes x row scale, in float32
        return (keys.float() * take(self.ks[layer])[..., None],
                values.float() * take(self.vs[layer])[..., None])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 scales of the rows (last dim) of ``x``: scale ``max|x| / 127``,
    codes ``round(x * (127 / max|x|))`` (half to even; all zero for an all-zero row). The
    native step stores keys and values with the same arithmetic."""
    x = x.float()
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(x * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return codes, amax / 127.0
