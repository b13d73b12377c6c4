"""`loraplex.huge_pages.zeros`: the CPU slot buffers' memory.

Zero-filled, writable, aligned to a huge page, backed by huge pages where Linux's THP policy lets
memory ask for them, and unmapped when the last tensor on it is freed.
"""

from __future__ import annotations

import gc
import mmap
import re
import sys
from pathlib import Path

import pytest
import torch

from loraplex import huge_pages

MiB = 1 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_policy() -> str | None:
    """The bracketed THP mode ("always", "madvise", "never"), or None where there is none."""
    try:
        match = re.search(r"\[(\w+)\]", THP_SETTING.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def _mapping_of(address: int) -> dict[str, int] | None:
    """The kB fields of the /proc/self/smaps entry holding `address` (None: not mapped)."""
    entry: dict[str, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            if entry is not None:
                return entry
            start, end = (int(x, 16) for x in span.groups())
            entry = {} if start <= address < end else None
        elif entry is not None and (line.endswith(" kB") or line.startswith("THPeligible:")):
            key, value = line.split(":")
            entry[key] = int(value.split()[0])
    return entry


def _thp_fallbacks() -> int:
    """How many page faults so far wanted a huge page and got small ones (no free 2 MiB block)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("thp_fault_fallback "):
            return int(line.split()[1])
    return 0


CAN_ADVISE = hasattr(mmap, "MADV_HUGEPAGE")  # Linux: elsewhere every tensor is plain torch.zeros


@pytest.mark.skipif(not CAN_ADVISE, reason="this OS has no MADV_HUGEPAGE")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensor_is_zero_writable_and_aligned(dtype: torch.dtype) -> None:
    t = huge_pages.zeros((3, 2 * MiB), dtype)
    assert t.shape == (3, 2 * MiB) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert not t.any()
    assert t.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
    t[1].fill_(2.5)
    t[2, -1] = 1.0
    assert t[1].eq(2.5).all() and t[0].eq(0).all() and t[2, -1].item() == 1.0 and t[2, :-1].eq(0).all()


def test_small_tensor_is_zeros_and_writable() -> None:
    t = huge_pages.zeros((4, 5), torch.float32)
    assert t.shape == (4, 5) and not t.any()
    t += 1
    assert t.eq(1).all()


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/smaps is Linux's")
@pytest.mark.skipif(_thp_policy() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_memory_is_backed_by_huge_pages() -> None:
    # the kernel gives a huge page on first touch when it has a free (or compactable) 2 MiB
    # block: 16 MiB asks for 8, and one is enough to show the advice took effect
    t = huge_pages.zeros((16 * MiB,), torch.uint8)
    fallbacks = _thp_fallbacks()
    t.fill_(1)
    mapping = _mapping_of(t.data_ptr())
    assert mapping is not None
    assert mapping.get("THPeligible", 1) == 1, mapping  # the advice took: this mapping may have huge pages
    if _thp_fallbacks() > fallbacks and mapping.get("AnonHugePages", 0) == 0:
        pytest.skip("the kernel had no free 2 MiB block for these faults (thp_fault_fallback rose)")
    assert mapping.get("AnonHugePages", 0) >= huge_pages.HUGE_PAGE_BYTES // 1024, mapping


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/smaps is Linux's")
def test_memory_is_unmapped_with_its_last_tensor() -> None:
    t = huge_pages.zeros((4, MiB), torch.float32)
    view = t[2:]  # a view keeps the mapping alive
    address = t.data_ptr()
    del t
    gc.collect()
    assert _mapping_of(address) is not None and not view.any()
    del view
    gc.collect()
    assert _mapping_of(address) is None
