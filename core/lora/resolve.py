"""Turning what a caller passed as `lora_request` into a LoRARequest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidLoRAAdapterError, LoRAAdapterNotFoundError
from .adapter_dir import name_parts, name_problem
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
    path = _local_dir(value)
    if path is not None:
        return LoRARequest(value, next_id, str(path))
    if resolve is not None:
        try:
            return resolve(value)
        except LoRAAdapterNotFoundError as miss:
            if hub_id_problem(value) is not None:
                raise
            try:
                return LoRARequest(value, next_id, download_adapter(value))
            except LoRAAdapterNotFoundError as exc:
                raise LoRAAdapterNotFoundError(f"{miss}. Nor from the Hub: {exc}") from exc
    return LoRARequest(value, next_id, download_adapter(value))


def _local_dir(value: str) -> Path | None:
    """`value` as an existing local directory (`~` expanded), or None; a name the filesystem
    cannot even look up (too long, an unknown `~user`) is simply not one."""
    try:
        path = Path(value).expanduser()
        return path if path.is_dir() else None
    except (OSError, RuntimeError, ValueError):
        return None


def hub_id_problem(value: str) -> str | None:
    """Why `value` is not a Hub adapter id, `org/name` or `org/name/subpath`, or None if it is.

    The path rules are `name_problem`'s (no absolute path, `..`, empty component, backslash...),
    so the id cannot lead out of the Hub cache; the repo part must also be a valid Hub repo id.
    """
    problem = name_problem(value)
    if problem is not None:
        return problem
    parts = name_parts(value)
    if len(parts) < 2:
        return "it has no 'org/' part"
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id("/".join(parts[:2]))
    except HFValidationError as exc:
        return f"{'/'.join(parts[:2])!r} is not a valid Hub repo id ({str(exc).splitlines()[0]})"
    return None


def download_adapter(repo_id: str) -> str:
    """Fetch a PEFT adapter (`org/repo` or `org/repo/subpath`) from the Hugging Face Hub; the local
    path, which is always inside the downloaded snapshot."""
    problem = hub_id_problem(repo_id)
    if problem is not None:
        raise LoRAAdapterNotFoundError(
            f"LoRA adapter {repo_id!r} is neither a local directory nor an added adapter's name nor a Hub repo id "
            f"('org/name' or 'org/name/subpath'): {problem}; check the path or add the adapter first"
        )
    from huggingface_hub import snapshot_download

    parts = name_parts(repo_id)
    repo, subpath = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [f"{subpath}/adapter_config.json", f"{subpath}/adapter_model.*"] if subpath else ["adapter_config.json", "adapter_model.*"]
    try:
        local = snapshot_download(repo, allow_patterns=patterns)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the caller
        raise LoRAAdapterNotFoundError(
            f"LoRA adapter {repo_id!r} is not a local directory and could not be downloaded from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}); check the name and your network, or pass a local path"
        ) from exc
    snapshot = Path(local)
    path = snapshot.joinpath(*parts[2:])
    # the adapter's directory itself must be in the snapshot (its files link into the cache's blobs/)
    if not path.resolve().is_relative_to(snapshot.resolve()):
        raise InvalidLoRAAdapterError(
            f"LoRA adapter {repo_id!r}: {str(path)!r} leads to {str(path.resolve())!r}, outside the downloaded snapshot "
            f"{str(snapshot)!r}; refusing it (remove that link from the Hub cache)"
        )
    return str(path)
