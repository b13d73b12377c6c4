"""The KV cache's size in bytes: an option, the environment, or a default, checked against the
memory the device has left.

The block pool is allocated (and, on CPU, every page touched) when the engine starts, so a
budget larger than the memory available is refused up front with the fix, rather than ending in
an allocation error or the kernel's out-of-memory killer.
"""

from __future__ import annotations

import os

from .. import envs
from ..errors import ConfigError

__all__ = ["DEFAULT_CPU_KV_BYTES", "available_host_memory", "cpu_kv_budget", "gpu_kv_budget"]

DEFAULT_CPU_KV_BYTES = 4 << 30  # vLLM's default VLLM_CPU_KVCACHE_SPACE of 4 GiB
_GPU_ACTIVATION_RESERVE = 1 << 30  # left free on the GPU for activations


def available_host_memory() -> int | None:
    """Bytes of memory a new allocation can get: MemAvailable (Linux), else the machine's
    physical memory, else None when neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def cpu_kv_budget(explicit: int | None, available: int | None) -> int:
    """`explicit` (kv_cache_memory_bytes), else `VLLM_CPU_KVCACHE_SPACE`, else 4 GiB (at most half
    of `available`); a budget set by either of the first two must fit in `available` bytes."""
    if explicit is not None:
        budget, source = explicit, f"kv_cache_memory_bytes={explicit}"
        fix = f"lower kv_cache_memory_bytes to at most {available} bytes"
    else:
        budget = envs.cpu_kv_cache_space_bytes()
        if budget is None:
            # the default is not the operator's choice: it shrinks to fit rather than fail
            return DEFAULT_CPU_KV_BYTES if available is None else min(DEFAULT_CPU_KV_BYTES, available // 2)
        source = f"VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE', '').strip()}"
        fix = f"lower VLLM_CPU_KVCACHE_SPACE to at most {(available or 0) * 100 // (1 << 30) / 100:.2f} (GiB)"
    if available is not None and budget > available:
        raise ConfigError(
            f"the KV cache budget {source} ({_gib(budget)}) is more than the {_gib(available)} of memory this machine has "
            f"available; {fix}, or free memory"
        )
    return budget


def gpu_kv_budget(explicit: int | None, utilization: float, free: int, total: int) -> int:
    """`explicit`, which must fit in the GPU's `free` bytes; else `utilization` of the GPU less
    what is already used and 1 GiB for activations."""
    if explicit is None:
        return max(0, int(total * utilization) - (total - free) - _GPU_ACTIVATION_RESERVE)
    if explicit > free:
        raise ConfigError(
            f"the KV cache budget kv_cache_memory_bytes={explicit} ({_gib(explicit)}) is more than the {_gib(free)} free "
            f"on the GPU; lower kv_cache_memory_bytes to at most {free}, or leave it unset to use "
            "gpu_memory_utilization of the GPU"
        )
    return explicit


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"
