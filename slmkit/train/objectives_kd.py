"""The knowledge-distillation objective: a teacher's distribution as the training target.

:class:`KDObjective` plugs into the one loop (:class:`slmkit.train.loop.Trainer`) like
:class:`~slmkit.train.objectives.LMObjective`. Per micro-batch it

1. optionally (``on_policy_fraction``) replaces the second half of each sequence with a
   continuation the student samples itself, GKD-style (Agarwal et al. 2024);
2. runs the teacher in ``torch.inference_mode`` (bf16 autocast where enabled) or reads its
   top-K targets from a :class:`TopKCache` filled on the first visit of each chunk;
3. minimises ``alpha * LM + (1 - alpha) * KD`` with the vocabulary projection done in
   chunks (:func:`slmkit.train.kd_ops.chunked_kd_loss`).

In eval mode (the loop's validation) it returns the plain LM loss, so ``val_ppl`` and
``val_bpb`` are comparable with ``slm train`` runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.train.config import KDOptions
from slmkit.train.distributed import replicated
from slmkit.train.kd_ops import IGNORE_INDEX, chunked_kd_loss, teacher_topk


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind ``torch.compile`` and DistributedDataParallel wrappers."""
    from slmkit.train.distributed import unwrap as plain

    return plain(model)


def hidden_and_head(model: torch.nn.Module, input_ids: torch.Tensor):
    """Final hidden states ``[B, T, H]`` and the module mapping them to logits.

    Uses the HF base model (``model.base_model``, final norm included) and the output
    embedding, so the ``[B, T, V]`` logits are never built in one piece. Models whose logits
    get extra processing (soft-capping, logit scale) fall back to full logits and an
    identity head.
    """
    base = unwrap(model)
    cfg = base.config
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    special = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
    inner = getattr(base, "base_model", base)
    if head is None or special or inner is base:
        logits = model(input_ids=input_ids, use_cache=False).logits               # [B, T, V]
        return logits, torch.nn.Identity()
    if replicated(model):     # through DDP's forward, so it all-reduces this backward
        return model(hidden_only=True, input_ids=input_ids, use_cache=False), head
    return inner(input_ids=input_ids, use_cache=False)[0], head


@torch.no_grad()
def sample_continuation(model: torch.nn.Module, prompt: torch.Tensor, n_new: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """Ancestral sampling with a KV cache: ``[B, P]`` -> ``[B, P + n_new]`` token ids."""
    model = unwrap(model)
    out = model(input_ids=prompt, use_cache=True)
    ids = prompt
    for i in range(n_new):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)  # [B, V]
        nxt = torch.multinomial(probs, 1)                                         # [B, 1]
        ids = torch.cat([ids, nxt], dim=1)
        if i + 1 < n_new:
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return ids


class TopKCache:
    """The teacher's top-K log-probs per training position, memory-mapped on disk.

    Positions are addressed by packed chunk (``chunk``, ``t``): the chunk boundaries never
    change between epochs, so a position always has the same context and the same teacher
    distribution. Files under ``root``: ``logprobs.f16`` ``[n_chunks, T, K]``,
    ``ids.i32`` ``[n_chunks, T, K]``, ``filled.u8`` ``[n_chunks]`` and ``meta.json``; a
    cache whose ``meta.json`` differs (other teacher, K, temperature, data) is rebuilt.

    Args:
        root: folder for the cache files.
        n_chunks, seq_len, k: the array shape.
        meta: what the cached values depend on.
    """

    def __init__(self, root: str | Path, n_chunks: int, seq_len: int, k: int,
                 meta: dict[str, Any]):
        self.root, self.k = Path(root), k
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {**meta, "n_chunks": n_chunks, "seq_len": seq_len, "k": k}
        meta_path = self.root / "meta.json"
        fresh = not meta_path.is_file() or json.loads(meta_path.read_text()) != meta
        mode = "w+" if fresh else "r+"
        shape = (n_chunks, seq_len, k)
        self.log_probs = np.memmap(self.root / "logprobs.f16", np.float16, mode, shape=shape)
        self.ids = np.memmap(self.root / "ids.i32", np.int32, mode, shape=shape)
        self.filled = np.memmap(self.root / "filled.u8", np.uint8, mode, shape=(n_chunks,))
        if fresh:
            self.filled[:] = 0
            self.filled.flush()
            meta_path.write_text(json.dumps(meta, indent=1))
        self.hits = self.misses = 0

    def lookup(self, chunk_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(log_probs [B, T, K] fp16, ids [B, T, K] int32)`` if every chunk is cached."""
        if not all(self.filled[c] for c in chunk_ids):
            self.misses += 1
            return None
        self.hits += 1
        return (torch.from_numpy(np.stack([self.log_probs[c] for c in chunk_ids])),
                torch.from_numpy(np.stack([self.ids[c] for c in chunk_ids])))

    def store(self, chunk_ids: list[int], log_probs: torch.Tensor, ids: torch.Tensor) -> None:
        """Write ``[B, T, K]`` targets for ``chunk_ids``; data is flushed before the flags."""
        lp, ix = log_probs.cpu().numpy(), ids.cpu().numpy()
        for row, c in enumerate(chunk_ids):
            self.log_probs[c] = lp[row]
            self.ids[c] = ix[row]
        self.log_probs.flush()
        self.ids.flush()
        for c in chunk_ids:
            self.filled[c] = 1
        self.filled.flush()

    @property
    def coverage(self) -> float:
        return float(self.filled.mean()) if len(self.filled) else 0.0


class IndexedBatches:
    """A :class:`~slmkit.train.batches.PackedBatches` whose batches also carry
    ``chunk_ids`` (``[B]``), the packed chunk each row came from (the cache address)."""

    def __init__(self, inner):
        self.inner = inner
        self.batch_size, self.seq_len = inner.batch_size, inner.seq_len

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        b = self.inner.batch(index)
        b["chunk_ids"] = torch.tensor(self.inner.chunk_ids(index), dtype=torch.int64)
        return b


class KDObjective:
    """``loss = alpha * LM + (1 - alpha) * KD(teacher || student)``; see the module docs.

    Args:
        teacher: any causal LM with the student's tokenizer (frozen here).
        settings: loss options.
        vocab: the shared vocabulary size (``min`` of both embeddings' rows).
        cache: top-K cache (needs ``settings.topk_cache`` and batches from :class:`IndexedBatches`).
    """

    name = "kd"

    def __init__(self, teacher: torch.nn.Module, settings: KDOptions, vocab: int,
                 cache: TopKCache | None = None):
        self.teacher, self.s, self.vocab, self.cache = teacher, settings, vocab, cache
        teacher.eval()
        teacher.requires_grad_(False)
        self.on_policy_batches = 0

    # ------------------------------------------------------------------ teacher side

    def _teacher_autocast(self, device: torch.device):
        if self.s.teacher_precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=device.type, enabled=False)

    def teacher_targets(self, input_ids: torch.Tensor, chunk_ids: list[int] | None):
        """A ``target_of(start, end)`` over the flattened ``[B*T]`` rows of ``input_ids``.

        With a cache and known chunks, the top-K targets come from disk (first visit: the
        live teacher fills them); otherwise the teacher runs now.
        """
        B, T = input_ids.shape
        if self.cache is None or chunk_ids is None:
            return self._live_targets(input_ids)
        hit = self.cache.lookup(chunk_ids)
        if hit is None:
            live = self._live_targets(input_ids)
            parts = [live(a, min(a + self.s.chunk_size, B * T))
                     for a in range(0, B * T, self.s.chunk_size)]
            with torch.autocast(device_type=input_ids.device.type, enabled=False):
                lp = torch.cat([p[1] for p in parts])                             # [B*T, K]
                ids = torch.cat([p[2] for p in parts])                            # [B*T, K]
            self.cache.store(chunk_ids, lp.view(B, T, -1), ids.view(B, T, -1))
        else:
            lp, ids = hit[0].reshape(B * T, -1), hit[1].reshape(B * T, -1)      # [B*T, K]
        lp, ids = lp.to(input_ids.device), ids.to(input_ids.device)
        return lambda a, b: ("topk", lp[a:b], ids[a:b])

    def _live_targets(self, input_ids: torch.Tensor):
        """Teacher forward now; targets are projected to the vocabulary chunk by chunk."""
        B, T = input_ids.shape
        with torch.inference_mode(), self._teacher_autocast(input_ids.device):
            hidden, head = hidden_and_head(self.teacher, input_ids)
            hidden = hidden.reshape(B * T, -1)                                    # [B*T, H]
        topk, device = self.s.topk_cache, input_ids.device

        def target_of(a: int, b: int):
            with torch.inference_mode(), self._teacher_autocast(device):
                logits = head(hidden[a:b])[:, :self.vocab]                        # [c, V]
                if topk:
                    lp, ids = teacher_topk(logits, topk, self.s.temperature)
            if topk:
                return ("topk", lp.clone(), ids.clone())
            return ("dense", logits.float().clone())
        return target_of

    # ------------------------------------------------------------------ student side

    def _on_policy(self, model: torch.nn.Module,
                   batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Second half of each row sampled by the student; no LM loss on sampled tokens."""
        ids, labels = batch["input_ids"], batch["labels"]
        T = ids.shape[1]
        P = max(1, T // 2)
        new = sample_continuation(model, ids[:, :P], T - P)                       # [B, T]
        labels = labels.clone()
        labels[:, P - 1:] = IGNORE_INDEX
        kd_mask = torch.ones_like(labels, dtype=torch.bool)
        self.on_policy_batches += 1
        return {"input_ids": new, "labels": labels, "kd_mask": kd_mask}

    def __call__(self, model: torch.nn.Module,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        s = self.s
        training = unwrap(model).training
        chunk_ids = batch["chunk_ids"].tolist() if "chunk_ids" in batch else None
        if training and s.on_policy_fraction > 0 and \
                float(torch.rand(())) < s.on_policy_fraction:
            batch, chunk_ids = self._on_policy(model, batch), None   # fresh text: no cache
        ids, labels = batch["input_ids"], batch["labels"]
        B, T = ids.shape
        kd_mask = batch.get("kd_mask", labels != IGNORE_INDEX).reshape(B * T)
        hidden, head = hidden_and_head(model, ids)
        hidden = hidden.reshape(B * T, -1)                                        # [B*T, H]
        flat_labels = labels.reshape(B * T)
        target_of = self.teacher_targets(ids, chunk_ids) if training and s.alpha < 1 else None
        ce_sum, kd_sum = chunked_kd_loss(
            hidden, head, flat_labels, kd_mask, target_of, vocab=self.vocab, kind=s.loss,
            temperature=s.temperature, beta=s.beta, chunk_size=s.chunk_size)
        lm = ce_sum / (flat_labels != IGNORE_INDEX).sum().clamp_min(1)
        if target_of is None:
            return lm, {"loss": lm.detach()}
        kd = kd_sum / kd_mask.sum().clamp_min(1)
        loss = s.alpha * lm + (1 - s.alpha) * kd
        return loss, {"loss": loss.detach(), "lm_loss": lm.detach(), "kd_loss": kd.detach()}

    def describe(self) -> dict[str, Any]:
        return {**self.s.model_dump(), "vocab": self.vocab}
