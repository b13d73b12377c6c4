"""`HfHubResolver`: adapters fetched from allowed Hugging Face Hub repos with `snapshot_download`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from loraplex.lora.request import LoRARequest
from loraplex.resolver import LoRAResolver

from loraplex.lora.adapter_dir import adapter_problem, name_parts, name_problem, stable_lora_id

__all__ = ["RESOLVER_NAME", "HfHubResolver", "split_lora_name"]

logger = logging.getLogger(__name__)

RESOLVER_NAME = "lora_hf_hub_resolver"
_GLOB_CHARS = frozenset("*?[]")


def split_lora_name(lora_name: str) -> tuple[str, str] | None:
    """`org/repo` -> ("org/repo", ""), `org/repo/sub/path` -> ("org/repo", "sub/path"); None for
    a name with fewer than two components. The name must have passed `name_problem`."""
    parts = name_parts(lora_name)
    if len(parts) < 2:
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


class HfHubResolver(LoRAResolver):
    """Resolves `org/repo` and `org/repo/subpath` (a trailing `/` allowed, as in vLLM) for repos
    in `repo_list` from the Hugging Face Hub.

    Only `adapter_config.json` and `adapter_model.*` under the subpath are downloaded, with
    `huggingface_hub.snapshot_download` into the Hugging Face cache (`cache_dir`, default the
    usual `HF_HUB_CACHE`). `endpoint` (default: `HF_ENDPOINT`, else huggingface.co), `token`
    (default: `HF_TOKEN` or the stored login) and `revision` (default: the main branch) are
    passed through. A name whose repo is not listed gives None without any network call.
    """

    def __init__(
        self,
        repo_list: Iterable[str],
        *,
        endpoint: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
    ) -> None:
        self.repo_list = [repo.strip().strip("/") for repo in repo_list if repo.strip().strip("/")]
        bad = [repo for repo in self.repo_list if name_problem(repo) is not None or len(name_parts(repo)) != 2]
        if bad:
            raise ValueError(
                f"HfHubResolver: {', '.join(repr(r) for r in bad)} are not Hub repo ids; list repos as 'org/name' "
                "(VLLM_LORA_RESOLVER_HF_REPO_LIST is comma-separated)"
            )
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.token = token
        self.revision = revision

    def __repr__(self) -> str:
        where = f", endpoint={self.endpoint!r}" if self.endpoint else ""
        return f"HfHubResolver({self.repo_list!r}{where})"

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        # vLLM's Hub resolver takes `org/repo/` and `org/repo/subpath/` as the folder they name; the
        # request keeps the name as the client wrote it
        name = lora_name.rstrip("/") if isinstance(lora_name, str) else lora_name
        problem = name_problem(name)
        if problem is not None:
            logger.warning("%s: refusing LoRA adapter name %r: %s", RESOLVER_NAME, lora_name, problem)
            return None
        split = split_lora_name(name)
        if split is None:
            logger.debug("%s: %r is not a Hub repo id ('org/repo' or 'org/repo/subpath')", RESOLVER_NAME, lora_name)
            return None
        repo, subpath = split
        if repo not in self.repo_list:
            logger.debug("%s: repo %r of adapter %r is not in VLLM_LORA_RESOLVER_HF_REPO_LIST", RESOLVER_NAME, repo, lora_name)
            return None
        if _GLOB_CHARS & set(subpath):
            logger.warning("%s: refusing LoRA adapter name %r: its subpath has glob characters (%s)",
                           RESOLVER_NAME, lora_name, "".join(sorted(_GLOB_CHARS)))
            return None
        return await asyncio.to_thread(self._fetch, base_model_name, lora_name, repo, subpath)

    def _fetch(self, base_model_name: str, lora_name: str, repo: str, subpath: str) -> LoRARequest | None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        prefix = f"{subpath}/" if subpath else ""
        try:
            snapshot = snapshot_download(
                repo,
                allow_patterns=[f"{prefix}adapter_config.json", f"{prefix}adapter_model.*"],
                revision=self.revision,
                endpoint=self.endpoint,
                cache_dir=self.cache_dir,
                token=self.token,
            )
        except GatedRepoError as exc:
            logger.warning("%s: repo %r is gated and this token may not read it (%s); log in or set HF_TOKEN",
                           RESOLVER_NAME, repo, _first_line(exc))
            return None
        except RepositoryNotFoundError as exc:
            logger.warning("%s: repo %r (in VLLM_LORA_RESOLVER_HF_REPO_LIST) was not found or is private (%s); check the "
                           "list and HF_TOKEN", RESOLVER_NAME, repo, _first_line(exc))
            return None
        except RevisionNotFoundError as exc:
            logger.warning("%s: repo %r has no revision %r (%s)", RESOLVER_NAME, repo, self.revision, _first_line(exc))
            return None
        path = Path(snapshot).joinpath(*name_parts(subpath)) if subpath else Path(snapshot)
        if not (path / "adapter_config.json").is_file():
            logger.info("%s: repo %r has no adapter_config.json%s; not an adapter", RESOLVER_NAME, repo,
                        f" under {subpath!r}" if subpath else "")
            return None
        # the Hub cache keeps files as links from snapshots/<commit>/ into blobs/: both in the repo's folder
        repo_folder = Path(snapshot).resolve().parent.parent
        problem = adapter_problem(path, base_model_name, repo_folder)
        if problem is not None:
            logger.warning("%s: not serving LoRA adapter %r for base model %r: %s", RESOLVER_NAME, lora_name,
                           base_model_name, problem)
            return None
        logger.info("%s: LoRA adapter %r downloaded to %s", RESOLVER_NAME, lora_name, path)
        return LoRARequest(lora_name=lora_name, lora_int_id=stable_lora_id(lora_name), lora_path=str(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
