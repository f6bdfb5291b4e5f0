"""A preallocated KV cache with request slots.

The whole cache is allocated once: ``[layers, slots, kv_heads, max_seq_len, head_dim]``
for keys and the same for values. A request borrows one slot for its lifetime, writes its
keys/values in place at its own positions, and gives the slot back when it finishes or is
cancelled. Nothing is reallocated per token. The :class:`~slmkit.engine.engine.Engine`
hands out the lowest free slot, which keeps running slots contiguous most of the time, so
the batched decode step reads the cache through a view instead of a gather.
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
            to it, fp16 saturating at +-65504).
        device: where the cache lives.

    Attributes:
        k, v: lists (one per layer) of ``[n_slots, n_kv_heads, max_seq_len, head_dim]``.
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
        self.lengths = torch.zeros(n_slots, dtype=torch.long)
        self.max_seq_len = max_seq_len
        self.n_slots = n_slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slots: torch.Tensor, starts: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store new keys/values.

        Args:
            layer: layer index.
            slots: ``[B]`` slot indices.
            starts: ``[B]`` position of each row's first new token.
            k, v: ``[B, Hkv, T, D]``.
        """
        B, _, T, _ = k.shape
        ck, cv = self.k[layer], self.v[layer]
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
        result is a view (no copy); otherwise it is gathered.
        """
        ck, cv = self.k[layer], self.v[layer]
        if first_slot is not None:
            end = first_slot + slots.shape[0]
            return ck[first_slot:end, :, :key_len], cv[first_slot:end, :, :key_len]
        return ck[slots, :, :key_len], cv[slots, :, :key_len]
