"""Give memory back to the OS after weights are replaced (fused, quantized), and back
weights that decode streams with transparent huge pages.

Safetensors weights are memory-mapped copy-on-write from the file, so a replaced weight's
pages stay resident (and counted) as long as anything else keeps the mapping alive, e.g.
a tied embedding living in the same file. :func:`release_file_pages` drops such pages
safely; :func:`trim_heap` returns freed heap memory (quantization temporaries) that glibc
would otherwise keep. Both are no-ops where they do not apply. :func:`huge_page_empty`
allocates a buffer the kernel backs with 2 MB pages where it can (see there).
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch


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


def trim_heap() -> None:
    """``malloc_trim(0)``: hand freed heap pages back to the OS (glibc only; else a no-op)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


HUGE_PAGE = 2 << 20
#: storage address -> byte count of the buffers :func:`huge_page_empty` handed out
_HUGE_BUFFERS: dict[int, int] = {}


def huge_pages_available() -> bool:
    """Whether :func:`huge_page_empty` can get transparent huge pages here (Linux, the
    ``madvise`` call, and THP not ``never``)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_page_empty(nbytes: int) -> torch.Tensor:
    """An uninitialized ``uint8`` tensor of ``nbytes`` in memory backed by 2 MB pages.

    Decode at batch 1 streams every weight once per token. With 4 KB pages the walk
    through hundreds of MB misses the TLB every 4 KB and the hardware prefetcher restarts
    at each page boundary; transparent huge pages remove both (measured on the 135M shape,
    2 cores: 4-15% faster steps at 1 and 8 rows, fp32 and int8/int4). The buffer is a
    private anonymous mapping, 2 MB aligned, with ``MADV_HUGEPAGE`` on its whole 2 MB
    stretches and ``MADV_NOHUGEPAGE`` on the partial one at the end, so resident memory is
    what is touched, as with ``torch.empty``. Its storage is exactly ``nbytes`` (what
    ``torch.save`` writes) and keeps the mapping alive. Elsewhere than Linux, with THP off,
    or when the kernel refuses, this is ``torch.empty``. Made outside inference mode, so
    weights moved here can still be trained.
    """
    if nbytes < HUGE_PAGE or not huge_pages_available():
        return torch.empty(nbytes, dtype=torch.uint8)
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    try:
        mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with torch.inference_mode(False):
            off = -torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
            mm.madvise(mmap.MADV_HUGEPAGE, off, whole)
            if whole < nbytes:
                mm.madvise(mmap.MADV_NOHUGEPAGE, off + whole, HUGE_PAGE)
            buf = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=off)
    except (OSError, ValueError):
        return torch.empty(nbytes, dtype=torch.uint8)
    _HUGE_BUFFERS[buf.untyped_storage().data_ptr()] = nbytes
    return buf


def huge_page_slices(sizes: list[int]) -> list[torch.Tensor]:
    """``uint8`` buffers of ``sizes`` bytes, side by side at page-aligned offsets in one
    :func:`huge_page_empty` buffer (tensors under 2 MB get huge pages only together)."""
    spans = [-(-n // 4096) * 4096 for n in sizes]
    arena, at, out = huge_page_empty(sum(spans)), 0, []
    for n, span in zip(sizes, spans):
        out.append(arena[at:at + n])
        at += span
    return out


def in_huge_pages(t: torch.Tensor) -> bool:
    """Whether ``t`` lives in a buffer from :func:`huge_page_empty`."""
    st = t.untyped_storage()
    return _HUGE_BUFFERS.get(st.data_ptr()) == st.nbytes()


@torch.no_grad()
def move_to_huge_pages(params: list[torch.Tensor], chunk: int = 16 << 20) -> bool:
    """Move CPU tensors (parameters) side by side into one :func:`huge_page_empty` buffer,
    re-pointing each one's ``.data`` right after its copy.

    Each is copied ``chunk`` bytes at a time and the source chunk's clean file pages
    (safetensors weights) handed back at once (:func:`release_file_pages`); a source in
    plain memory is freed when its tensor is re-pointed (unless something else holds it).
    So resident memory grows by about one chunk or one tensor, not by a second copy of
    the weights. Nothing moves where huge pages are not available (it would only copy).
    The tensors then share one storage: ``save_pretrained`` / safetensors write each one's
    own bytes, but ``torch.save`` of a single one writes the whole buffer (clone it first).

    Returns:
        Whether the tensors were moved.
    """
    if not huge_pages_available():
        return False
    slices = huge_page_slices([p.numel() * p.element_size() for p in params])
    with torch.inference_mode(False):
        for p, dst in zip(params, slices):
            flat = p.data.contiguous().view(-1).view(torch.uint8)
            for a in range(0, flat.numel(), chunk):
                dst[a:a + chunk].copy_(flat[a:a + chunk])
                release_file_pages([flat[a:a + chunk]])
            del flat
            p.data = dst.view(p.dtype).view(p.shape)
    return True
