"""Batch sources: deterministic, random-access batches from a token stream.

A batch source maps a micro-batch *index* to a batch, so the data order is a pure function
of (seed, index). Resuming at step ``s`` just continues at index ``s * grad_accum``: the
same batches in the same order, with no iterator state to save.

Packing: the token stream (documents separated by eos) is cut into non-overlapping chunks
of ``seq_len + 1`` tokens that share one token with their neighbour (that token is the last
label of one chunk and the first input of the next). Each epoch visits every chunk once in
a seeded random order.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from slmkit.errors import DataError


class BatchSource(Protocol):
    """``source.batch(index) -> dict`` with ``input_ids`` and ``labels`` (``[B, T]``)."""

    batch_size: int
    seq_len: int

    def batch(self, index: int) -> dict[str, torch.Tensor]: ...


def check_stream_length(tokens: np.ndarray, seq_len: int, what: str) -> int:
    """Number of ``seq_len`` chunks in ``tokens``, or a DataError if there is none."""
    n_chunks = (len(tokens) - 1) // seq_len
    if n_chunks < 1:
        raise DataError(f"The {what} split has only {len(tokens):,} tokens, fewer than "
                        f"--seq-len {seq_len} + 1; lower --seq-len or add data.")
    return n_chunks


class PackedBatches:
    """Shuffled fixed-length chunks of a token stream, batch ``index`` -> tensors.

    Args:
        tokens: 1-D token ids (e.g. the memmap from :func:`slmkit.data.tokens.token_stream`).
        seq_len: tokens per sequence ``T``.
        batch_size: sequences per micro-batch ``B``.
        seed: seeds the per-epoch permutation.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_chunks = check_stream_length(tokens, seq_len, "training")
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(self.n_chunks))
        return self._perm[1]

    def chunk_ids(self, index: int) -> list[int]:
        """The chunk numbers that micro-batch ``index`` reads (for tests and inspection)."""
        out = []
        for g in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, pos = divmod(g, self.n_chunks)
            out.append(int(self._order(epoch)[pos]))
        return out

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        T = self.seq_len
        rows = [np.asarray(self.tokens[c * T: c * T + T + 1], dtype=np.int64)
                for c in self.chunk_ids(index)]
        block = torch.from_numpy(np.stack(rows))             # [B, T + 1]
        return {"input_ids": block[:, :-1], "labels": block[:, 1:]}

    @property
    def epoch_batches(self) -> float:
        return self.n_chunks / self.batch_size


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
    """A fixed validation set: up to ``max_tokens`` tokens of chunks spread over the stream.

    Returns:
        A list of batches (``input_ids``/``labels`` ``[b, T]``), the same on every call.
    """
    n_chunks = check_stream_length(tokens, seq_len, "validation")
    want = n_chunks if max_tokens is None else max(1, min(n_chunks, max_tokens // seq_len))
    picks = np.linspace(0, n_chunks - 1, want).round().astype(np.int64)
    picks = np.unique(picks)
    batches = []
    for start in range(0, len(picks), batch_size):
        rows = [np.asarray(tokens[c * seq_len: c * seq_len + seq_len + 1], dtype=np.int64)
                for c in picks[start:start + batch_size]]
        block = torch.from_numpy(np.stack(rows))             # [b, T + 1]
        batches.append({"input_ids": block[:, :-1], "labels": block[:, 1:]})
    return batches
