"""Every environment variable loraplex reads, in one place.

Names follow vLLM's where vLLM has one, so an operator's existing settings carry over.
Values are read when accessed (not at import), so tests and subprocesses can set them.
"""

from __future__ import annotations

import os
from pathlib import Path


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """Root of loraplex's on-disk caches (converted models, downloaded adapters)."""
    explicit = os.environ.get("LORAPLEX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "loraplex"


def cpu_kv_cache_space_bytes() -> int | None:
    """`VLLM_CPU_KVCACHE_SPACE`: KV cache size on CPU in GiB (vLLM's name and unit)."""
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if not value:
        return None
    return int(float(value) * (1 << 30))


def plugins_selection() -> list[str] | None:
    """`VLLM_PLUGINS`: None when unset (load all), [] when empty (load none), else the names."""
    value = os.environ.get("VLLM_PLUGINS")
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def allow_runtime_lora_updating() -> bool:
    """`VLLM_ALLOW_RUNTIME_LORA_UPDATING`: allow loading adapters (and resolving unknown ones) at run time."""
    return _flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def lora_resolver_cache_dir() -> str | None:
    """`VLLM_LORA_RESOLVER_CACHE_DIR`: the filesystem resolver's adapter tree."""
    return os.environ.get("VLLM_LORA_RESOLVER_CACHE_DIR") or None


def lora_resolver_hf_repo_list() -> list[str]:
    """`VLLM_LORA_RESOLVER_HF_REPO_LIST`: repos the Hub resolver may fetch from."""
    value = os.environ.get("VLLM_LORA_RESOLVER_HF_REPO_LIST", "")
    return [repo.strip() for repo in value.split(",") if repo.strip()]
