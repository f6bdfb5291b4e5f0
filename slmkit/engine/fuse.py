"""Fused QKV and gate-up projections without extra memory.

At batch 1 a decode step is one matrix-vector product per linear; three small ones (q, k,
v) cost more than one of the same total size, and each call has fixed dispatch overhead.
Fusing concatenates the weights into one ``[Nq + Nk + Nv, hidden]`` matrix and makes the
original ``q_proj.weight`` etc. *views* into it, so the model keeps working (and saving)
exactly as before while using no extra memory. Weights loaded from safetensors are
memory-mapped from the file: the concatenation copies them, and the pages of the file that
held the originals are then handed back to the OS (:func:`release_file_pages`), so they are
not counted twice in the process's resident memory.

Only plain ``nn.Linear`` modules are fused. Anything else (``QuantLinear``, LoRA wrappers,
low-rank layers) is left alone and called as a module, so compressed models run unchanged.
Measured on the team machine (2 cores, loaded): 30 layers of SmolLM2-135M shape, batch 1,
fused 64-87 ms vs separate 68-92 ms per step, about 5% (``bench/decode.py`` for the whole
model).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable

import torch
from torch import nn


def _plain(*modules) -> bool:
    """All are exact ``nn.Linear`` with one dtype/device and all or none with bias."""
    if not all(type(m) is nn.Linear for m in modules):
        return False
    w0 = modules[0].weight
    same = all(m.weight.dtype == w0.dtype and m.weight.device == w0.device for m in modules)
    biases = {m.bias is None for m in modules}
    return same and len(biases) == 1


def _file_mappings() -> list[tuple[int, int]]:
    """``[(start, end)]`` address ranges of this process's file mappings."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            # address perms offset dev inode [path]; a path starting with "/" is a file
            if len(parts) >= 6 and parts[5].startswith("/"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    return ranges


def _all_file_pages(lo: int, hi: int, page: int) -> bool:
    """True when no page of ``[lo, hi)`` has become private anonymous memory (written to).

    ``/proc/self/pagemap`` holds one 64-bit entry per page: bit 63 = present, bit 61 = a
    file page (or shared). A written page of a private file mapping is a copy-on-write
    anonymous page: present with bit 61 clear.
    """
    import numpy as np

    n = (hi - lo) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo // page * 8)
        entries = np.frombuffer(f.read(n * 8), dtype=np.uint64)
    present = (entries >> np.uint64(63)) & np.uint64(1)
    file_page = (entries >> np.uint64(61)) & np.uint64(1)
    return len(entries) == n and not bool(np.any(present & (file_page ^ np.uint64(1))))


def release_file_pages(tensors: list[torch.Tensor]) -> int:
    """Drop this process's resident pages of tensors that are still plain file pages.

    Safetensors weights are memory-mapped copy-on-write from the file. Once a tensor has
    been copied (fused) and is no longer used, its pages still count in the resident set.
    ``madvise(MADV_DONTNEED)`` unmaps them; for pages that were never written the data stays
    in the file and is faulted back in unchanged if anything reads the tensor again, so
    this is safe. A tensor with any written (copy-on-write) page, or in anonymous memory,
    is left alone: there ``MADV_DONTNEED`` would discard data. Linux only; else a no-op.

    Returns:
        Bytes released.
    """
    if not sys.platform.startswith("linux") or not tensors:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ranges = _file_mappings()
    except OSError:
        return 0
    page, released = mmap.PAGESIZE, 0
    for t in tensors:
        ptr = t.data_ptr()
        end = ptr + t.numel() * t.element_size()
        if not any(a <= ptr and end <= b for a, b in ranges):
            continue
        lo, hi = -(-ptr // page) * page, end // page * page  # whole pages inside the tensor
        try:
            clean = hi > lo and _all_file_pages(lo, hi, page)
        except OSError:
            clean = False
        if clean and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) == 0:
            released += hi - lo                                # 4 = MADV_DONTNEED
    return released


def _fuse_weights(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate weights (and biases) and re-point each module's tensors at its rows."""
    originals = [m.weight.data for m in modules]
    weight = torch.cat(originals)  # [sum(N_i), K]
    bias = torch.cat([m.bias.data for m in modules]) if modules[0].bias is not None else None
    row = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight.data = weight[row:row + n]
        if bias is not None:
            m.bias.data = bias[row:row + n]
        row += n
    release_file_pages(originals)
    return weight, bias


def fused_qkv(attn) -> Callable[[torch.Tensor], tuple] | None:
    """``x -> (q, k, v)`` through one matmul, or None when the projections are not plain.

    Args:
        attn: a Llama-family attention module with ``q_proj``, ``k_proj``, ``v_proj``.
    """
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    if not _plain(*mods):
        return None
    existing = getattr(attn, "_slmkit_qkv", None)
    if existing is None or existing[0].data_ptr() != mods[0].weight.data_ptr():
        existing = _fuse_weights(mods)
        attn._slmkit_qkv = existing
    weight, bias = existing
    nq, nk = mods[0].weight.shape[0], mods[1].weight.shape[0]

    def qkv(x: torch.Tensor):
        y = nn.functional.linear(x, weight, bias)       # [..., Nq + 2 Nk]
        return y[..., :nq], y[..., nq:nq + nk], y[..., nq + nk:]

    return qkv


def fused_mlp(mlp) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> down(act(gate(x)) * up(x))`` with gate and up in one matmul, or None."""
    if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    mods = [mlp.gate_proj, mlp.up_proj]
    if not _plain(*mods):
        return None
    existing = getattr(mlp, "_slmkit_gate_up", None)
    if existing is None or existing[0].data_ptr() != mods[0].weight.data_ptr():
        existing = _fuse_weights(mods)
        mlp._slmkit_gate_up = existing
    weight, bias = existing
    n = mods[0].weight.shape[0]
    act, down = mlp.act_fn, mlp.down_proj

    def run(x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, weight, bias)       # [..., 2 I]
        return down(act(y[..., :n]) * y[..., n:])

    return run
