"""Turning what a caller passed as `lora_request` into a LoRARequest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import LoRAAdapterNotFoundError
from .request import LoRARequest


def lora_request_from(
    value: LoRARequest | str,
    registered: dict[str, LoRARequest],
    resolve: Callable[[str], LoRARequest] | None = None,
) -> LoRARequest:
    """A LoRARequest as is; a string as an added adapter's name, a local directory, an adapter the
    resolvers find (`resolve`, given when resolution is enabled), or a Hub repo id."""
    if isinstance(value, LoRARequest):
        return value
    if not isinstance(value, str) or not value:
        raise LoRAAdapterNotFoundError(f"lora_request must be a LoRARequest or a non-empty string; got {value!r}")
    if value in registered:
        return registered[value]
    next_id = max((r.lora_int_id for r in registered.values()), default=0) + 1
    path = Path(value).expanduser()
    if path.is_dir():
        return LoRARequest(value, next_id, str(path))
    if resolve is not None:
        try:
            return resolve(value)
        except LoRAAdapterNotFoundError as miss:
            if not _is_repo_id(value):
                raise
            try:
                return LoRARequest(value, next_id, download_adapter(value))
            except LoRAAdapterNotFoundError as exc:
                raise LoRAAdapterNotFoundError(f"{miss}. Nor from the Hub: {exc}") from exc
    return LoRARequest(value, next_id, download_adapter(value))


def _is_repo_id(value: str) -> bool:
    parts = value.split("/")
    return not value.startswith((".", "/", "~")) and len(parts) >= 2 and all(parts)


def download_adapter(repo_id: str) -> str:
    """Fetch a PEFT adapter (`org/repo` or `org/repo/subpath`) from the Hugging Face Hub; the local path."""
    parts = repo_id.split("/")
    if repo_id.startswith((".", "/", "~")) or len(parts) < 2 or not all(parts):
        raise LoRAAdapterNotFoundError(
            f"LoRA adapter {repo_id!r} is neither a local directory nor an added adapter's name nor a Hub repo id "
            "('org/name' or 'org/name/subpath'); check the path or add the adapter first"
        )
    from huggingface_hub import snapshot_download

    repo, subpath = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [f"{subpath}/adapter_config.json", f"{subpath}/adapter_model.*"] if subpath else ["adapter_config.json", "adapter_model.*"]
    try:
        local = snapshot_download(repo, allow_patterns=patterns)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the caller
        raise LoRAAdapterNotFoundError(
            f"LoRA adapter {repo_id!r} is not a local directory and could not be downloaded from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}); check the name and your network, or pass a local path"
        ) from exc
    return str(Path(local) / subpath) if subpath else local
