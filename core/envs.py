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


def cpu_kernel_enabled() -> bool:
    """`LORAPLEX_CPU_KERNEL`: build and use the native CPU kernels, the LoRA one and the decoder ones
    (norms, rotary, decode attention, small-batch linears; default on; 0 = torch operations only)."""
    return _flag("LORAPLEX_CPU_KERNEL", default=True)


def cpu_kv_cache_space_bytes() -> int | None:
    """`VLLM_CPU_KVCACHE_SPACE`: KV cache size on CPU in GiB (vLLM's name and unit); None when unset.

    A value that is not a finite number of GiB above zero (or is under one byte) is a ConfigError.
    """
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if value is None or not value.strip():
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = float("nan")
    size = int(gib * (1 << 30)) if gib > 0 and gib != float("inf") else 0  # NaN fails `gib > 0`
    if size < 1:
        from .errors import ConfigError

        raise ConfigError(f"VLLM_CPU_KVCACHE_SPACE={value!r} is not a positive, finite number of GiB; set it to e.g. 4 "
                          "(the KV cache's size on CPU in GiB) or unset it for the default")
    return size


def plugins_selection() -> list[str] | None:
    """`VLLM_PLUGINS`: None when unset (load all), [] when empty (load none), else the names."""
    value = os.environ.get("VLLM_PLUGINS")
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def allow_runtime_lora_updating() -> bool:
    """`VLLM_ALLOW_RUNTIME_LORA_UPDATING`: allow loading adapters (and resolving unknown ones) at run time."""
    return _flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def api_key() -> str | None:
    """`VLLM_API_KEY`: the key `loraplex serve` requires as `Authorization: Bearer <key>` (--api-key wins)."""
    return os.environ.get("VLLM_API_KEY") or None


def lora_resolver_cache_dir() -> str | None:
    """`VLLM_LORA_RESOLVER_CACHE_DIR`: the filesystem resolver's adapter tree."""
    return os.environ.get("VLLM_LORA_RESOLVER_CACHE_DIR") or None


def lora_resolver_hf_repo_list() -> list[str]:
    """`VLLM_LORA_RESOLVER_HF_REPO_LIST`: repos the Hub resolver may fetch from."""
    value = os.environ.get("VLLM_LORA_RESOLVER_HF_REPO_LIST", "")
    return [repo.strip() for repo in value.split(",") if repo.strip()]


def plugins_strict() -> bool:
    """`LORAPLEX_PLUGINS_STRICT`: a plugin that fails to load (or an unknown name in
    `VLLM_PLUGINS`) is an error instead of a logged warning (for CI)."""
    return _flag("LORAPLEX_PLUGINS_STRICT")


def lora_resolver_timeout() -> float:
    """`LORAPLEX_LORA_RESOLVER_TIMEOUT`: seconds one resolver may take to answer (default 30)."""
    return _seconds("LORAPLEX_LORA_RESOLVER_TIMEOUT", 30.0, allow_zero=False)


def lora_resolver_miss_ttl() -> float:
    """`LORAPLEX_LORA_RESOLVER_MISS_TTL`: seconds a name no resolver found is remembered as
    missing (default 10; 0 disables the memory)."""
    return _seconds("LORAPLEX_LORA_RESOLVER_MISS_TTL", 10.0, allow_zero=True)


def _seconds(name: str, default: float, *, allow_zero: bool) -> float:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 or (allow_zero and seconds == 0)) or seconds == float("inf"):
        from .errors import ConfigError

        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} is not a number of seconds {bound}; set it to e.g. {default:g} or unset it")
    return seconds


def image_fetch_timeout() -> float:
    """`VLLM_IMAGE_FETCH_TIMEOUT`: seconds the server may take to fetch one image URL (default 5, as vLLM)."""
    return _seconds("VLLM_IMAGE_FETCH_TIMEOUT", 5.0, allow_zero=False)


def max_image_bytes() -> int:
    """`LORAPLEX_MAX_IMAGE_BYTES`: the largest image (encoded bytes) a chat message may carry or point
    at (default 20 MiB)."""
    return _positive_bytes("LORAPLEX_MAX_IMAGE_BYTES", "20971520 (20 MiB) or unset it for the default") or 20 << 20


# ---- the S3 resolver package (loraplex-resolver-s3) ------------------------------------------------


def lora_s3_uri() -> str | None:
    """`LORAPLEX_S3_LORA_URI`: where the S3 resolver finds adapters, a template such as
    `s3://bucket/loras/{lora_name}` or `s3://bucket/loras/{base_model_name}/{lora_name}`."""
    return os.environ.get("LORAPLEX_S3_LORA_URI", "").strip() or None


def lora_s3_cache_dir() -> Path:
    """`LORAPLEX_S3_LORA_CACHE_DIR`: where downloaded S3 adapters are kept (default: `<cache_dir()>/s3-loras`)."""
    explicit = os.environ.get("LORAPLEX_S3_LORA_CACHE_DIR", "").strip()
    return Path(explicit).expanduser() if explicit else cache_dir() / "s3-loras"


def lora_s3_max_bytes() -> int | None:
    """`LORAPLEX_S3_LORA_MAX_BYTES`: the largest adapter (total listed size) the S3 resolver downloads; unset = no limit."""
    return _positive_bytes("LORAPLEX_S3_LORA_MAX_BYTES", "1073741824 (1 GiB) or unset it for no limit")


def aws_endpoint_url_s3() -> str | None:
    """`AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`: an S3-compatible endpoint (MinIO, moto, ...), as the AWS SDKs read them."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _positive_bytes(name: str, fix: str) -> int | None:
    """The byte count in variable `name`, None when unset; anything but a positive whole number is
    a ConfigError whose fix is "set it to e.g. <fix>"."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        from .errors import ConfigError

        raise ConfigError(f"{name}={value!r} is not a positive whole number of bytes; set it to e.g. {fix}")
    return limit
