"""Host memory that asks Linux for transparent huge pages: the CPU engine's weights and LoRA slots.

A decode step over many adapters reads a few hundred KiB of each adapter per layer, so each
wrapped linear touches thousands of distinct 4 KiB pages and misses the TLB on most of them; on
2 MiB pages the same bytes need 512 times fewer translations. A batch-1 step streams every
weight of the model once (benchmarks/bench_engine.py compares that read with one from ordinary
pages). Linux backs anonymous memory with
huge pages on its own only when THP is "always"; under "madvise" (the default of many
distributions) only memory that asks gets them, and this module asks. Where asking is not
possible (another OS, THP "never", a small tensor) the tensor is plain memory: the same values,
only slower to read.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap

import torch

HUGE_PAGE_BYTES = 2 << 20


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`torch.zeros(shape, dtype=dtype)` on the CPU, in memory advised to use huge pages.

    The tensor owns its mapping: it is unmapped when the last tensor viewing it is freed.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    # A huge page covers an aligned 2 MiB of addresses: map room to start the tensor on such a
    # boundary and to end the last (partial) huge page inside the mapping. Private and anonymous:
    # zero-filled and under THP's anonymous-memory policy (a shared mapping would be shmem, which
    # has its own policy and usually refuses huge pages).
    mapped = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES + HUGE_PAGE_BYTES
    region = mmap.mmap(-1, mapped, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel built without THP: plain pages, as documented
        region.madvise(mmap.MADV_HUGEPAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    offset = -address % HUGE_PAGE_BYTES
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)  # holds `region`
    return flat.view(dtype).view(shape)


def adopt_parameters(module: torch.nn.Module) -> None:
    """Move every CPU parameter of `module` into one huge-page mapping (values unchanged; tied
    parameters stay one tensor). Parameters on other devices, or too small in all, stay put."""
    unique: dict[int, torch.nn.Parameter] = {}
    for p in module.parameters():
        if p.device.type == "cpu" and p.is_contiguous():
            unique.setdefault(p.data_ptr(), p)
    nbytes = [p.numel() * p.element_size() for p in unique.values()]
    aligned = [-(-n // 64) * 64 for n in nbytes]  # each tensor on a cache-line boundary
    if sum(aligned) < HUGE_PAGE_BYTES:
        return
    arena = zeros((sum(aligned),), torch.uint8)
    moved: dict[int, torch.Tensor] = {}
    offset = 0
    for (ptr, p), n, step in zip(unique.items(), nbytes, aligned):
        view = arena[offset : offset + n].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        moved[ptr] = view
        offset += step
    for p in module.parameters():
        if p.data_ptr() in moved:
            p.data = moved[p.data_ptr()]

