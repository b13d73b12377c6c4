"""Adapters named by a Hugging Face Hub id (`org/repo` or `org/repo/subpath`), for the catalog's
Python-API lookup only: nothing reached over HTTP downloads except through an enabled resolver."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidLoRAAdapterError, LoRAAdapterNotFoundError
from .adapter_dir import name_parts, name_problem

__all__ = ["download_adapter", "hub_id_problem"]


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
