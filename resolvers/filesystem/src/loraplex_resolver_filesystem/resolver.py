"""`FilesystemResolver`: adapters found by name in a local directory tree."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from loraplex.lora.request import LoRARequest
from loraplex.resolver import LoRAResolver

from loraplex.lora.adapter_dir import adapter_problem, name_parts, name_problem, stable_lora_id

__all__ = ["RESOLVER_NAME", "FilesystemResolver"]

logger = logging.getLogger(__name__)

RESOLVER_NAME = "lora_filesystem_resolver"


class FilesystemResolver(LoRAResolver):
    """Resolves `lora_name` to a PEFT LoRA adapter directory under `lora_cache_dir`.

    Tried in order, the first that holds a LoRA adapter for the served base model wins:

    1. `<dir>/<base_model_name>/<lora_name>/` (when the base model name is a relative name,
       such as `HuggingFaceTB/SmolLM2-135M-Instruct`),
    2. `<dir>/<last component of base_model_name>/<lora_name>/` (e.g. `<dir>/SmolLM2-135M-Instruct/x`),
    3. `<dir>/<lora_name>/`.

    Names that would leave the directory (absolute paths, `..`, empty or odd components) and
    paths that resolve outside it through symbolic links are refused with a logged warning.
    """

    def __init__(self, lora_cache_dir: str | os.PathLike[str]) -> None:
        self.lora_cache_dir = Path(lora_cache_dir).expanduser()

    def __repr__(self) -> str:
        return f"FilesystemResolver({str(self.lora_cache_dir)!r})"

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        # stat() and open() may block (network filesystems): keep them off the event loop
        return await asyncio.to_thread(self.resolve_lora_sync, base_model_name, lora_name)

    def resolve_lora_sync(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """`resolve_lora` for synchronous callers (blocks on the filesystem)."""
        problem = name_problem(lora_name)
        if problem is not None:
            logger.warning("%s: refusing LoRA adapter name %r: %s", RESOLVER_NAME, lora_name, problem)
            return None
        try:
            root = self.lora_cache_dir.resolve(strict=True)
        except OSError as exc:
            logger.warning("%s: cannot look up LoRA adapter %r: the directory %r is not accessible (%s); "
                           "check VLLM_LORA_RESOLVER_CACHE_DIR", RESOLVER_NAME, lora_name, str(self.lora_cache_dir), exc)
            return None
        if not root.is_dir():
            logger.warning("%s: cannot look up LoRA adapter %r: %r is not a directory; check VLLM_LORA_RESOLVER_CACHE_DIR",
                           RESOLVER_NAME, lora_name, str(root))
            return None
        refusals = []
        for candidate in self.candidates(root, base_model_name, lora_name):
            if not os.path.lexists(candidate):
                continue
            real = candidate.resolve()
            if not real.is_relative_to(root):
                refusals.append(f"{str(candidate)!r} resolves to {str(real)!r}, outside {str(root)!r}")
                continue
            if not real.is_dir():
                refusals.append(f"{str(candidate)!r} is not a directory")
                continue
            problem = adapter_problem(real, base_model_name, root)
            if problem is not None:
                refusals.append(f"{str(candidate)!r}: {problem}")
                continue
            logger.info("%s: LoRA adapter %r found at %s", RESOLVER_NAME, lora_name, real)
            return LoRARequest(lora_name=lora_name, lora_int_id=stable_lora_id(lora_name), lora_path=str(real))
        if refusals:
            logger.warning("%s: not serving LoRA adapter %r for base model %r: %s", RESOLVER_NAME, lora_name,
                           base_model_name, "; ".join(refusals))
        else:
            logger.debug("%s: no LoRA adapter %r under %s", RESOLVER_NAME, lora_name, root)
        return None

    @staticmethod
    def candidates(root: Path, base_model_name: str, lora_name: str) -> list[Path]:
        """The directories tried for `lora_name`, in order (per base model first, then flat)."""
        parts = name_parts(lora_name)
        prefixes: list[list[str]] = []
        if base_model_name:
            stripped = base_model_name.rstrip("/")
            if name_problem(stripped) is None:
                prefixes.append(name_parts(stripped))
            last = stripped.rsplit("/", 1)[-1]
            if last and name_problem(last) is None and [last] not in prefixes:
                prefixes.append([last])
        prefixes.append([])
        return [root.joinpath(*prefix, *parts) for prefix in prefixes]
