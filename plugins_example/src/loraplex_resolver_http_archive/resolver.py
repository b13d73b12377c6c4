"""`HttpArchiveResolver`: `<lora_name>.tar.gz` from a URL, extracted safely into an atomic cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from fsspec.callbacks import Callback
from fsspec.core import url_to_fs

from loraplex.lora.request import LoRARequest
from loraplex.resolver import LoRAResolver

from .archive import UnsafeArchiveError, extract_adapter_archive
from .config import ArchiveResolverConfig

__all__ = ["RESOLVER_NAME", "HttpArchiveResolver"]

logger = logging.getLogger(__name__)

RESOLVER_NAME = "lora_http_archive_resolver"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# one or more /-separated components of letters, digits, '.', '_' and '-', none starting with '.'
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}){0,7}")


class HttpArchiveResolver(LoRAResolver):
    """Resolves `lora_name` by downloading `config.url_for(lora_name)`, a tar archive of a PEFT
    adapter (its files at the top, or in one top-level folder).

    The archive is downloaded and extracted into a temporary directory beside the cache entry,
    checked (a LoRA adapter for the served base model), then renamed into place: the cache never
    holds half an adapter. Cached adapters are served without asking the server again (delete
    the entry to refresh). Concurrent resolves of one name download once.
    """

    def __init__(self, config: ArchiveResolverConfig) -> None:
        self.config = config
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.downloads = 0

    def __repr__(self) -> str:
        return f"HttpArchiveResolver({self.config.url_template!r})"

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if not isinstance(lora_name, str) or not _NAME.fullmatch(lora_name):
            logger.warning("%s: refusing LoRA adapter name %r: names are letters, digits, '.', '_', '-' in "
                           "/-separated parts that do not start with '.'", RESOLVER_NAME, lora_name)
            return None
        return await asyncio.to_thread(self._resolve, base_model_name, lora_name)

    def _resolve(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        url = self.config.url_for(lora_name)
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        entry = self.config.cache_dir / f"{lora_name.rsplit('/', 1)[-1]}-{digest}"
        with self._lock(entry.name):
            if not entry.is_dir():
                if not self._download(url, entry, lora_name):
                    return None
            problem = _adapter_problem(entry, base_model_name)
            if problem is not None:
                logger.warning("%s: not serving LoRA adapter %r from %s: %s", RESOLVER_NAME, lora_name, url, problem)
                return None
        lora_id = int.from_bytes(hashlib.sha256(lora_name.encode()).digest()[:4], "big") % (2**31 - 1) + 1
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=str(entry))

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _download(self, url: str, entry: Path, lora_name: str) -> bool:
        """Fetch, extract, check and install; False (logged) when there is no usable adapter."""
        self.config.cache_dir.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=self.config.cache_dir))
        try:
            archive = temp / "adapter.tar.gz"
            try:
                fs, path = url_to_fs(url)
                fs.get_file(path, str(archive), callback=_SizeLimit(self.config.max_bytes, url))
            except FileNotFoundError:
                logger.debug("%s: no archive at %s", RESOLVER_NAME, url)
                return False
            extracted = temp / "extracted"
            extracted.mkdir()
            try:
                extract_adapter_archive(archive, extracted, self.config.max_bytes)
            except UnsafeArchiveError as exc:
                logger.warning("%s: refusing the archive of LoRA adapter %r at %s: %s", RESOLVER_NAME, lora_name, url, exc)
                return False
            root = _adapter_root(extracted)
            if root is None:
                logger.warning("%s: the archive at %s holds no adapter_config.json (at its top or in one top-level "
                               "folder)", RESOLVER_NAME, url)
                return False
            problem = _adapter_problem(root, None)
            if problem is not None:
                logger.warning("%s: the archive at %s is not a PEFT LoRA adapter: %s", RESOLVER_NAME, url, problem)
                return False
            try:
                os.rename(root, entry)
            except OSError:
                if not entry.is_dir():  # not another process having installed it meanwhile
                    raise
            self.downloads += 1
            logger.info("%s: LoRA adapter %r downloaded from %s to %s", RESOLVER_NAME, lora_name, url, entry)
            return True
        finally:
            shutil.rmtree(temp, ignore_errors=True)


class _SizeLimit(Callback):
    """Stops a download that is (or announces itself as) larger than the limit."""

    def __init__(self, limit: int, url: str) -> None:
        super().__init__()
        self.limit, self.url = limit, url

    def call(self, *args, **kwargs) -> None:
        if (self.size or 0) > self.limit or self.value > self.limit:
            raise ValueError(f"the archive at {self.url} is larger than {self.limit} bytes (LORA_HTTP_ARCHIVE_MAX_BYTES)")


def _adapter_root(extracted: Path) -> Path | None:
    if (extracted / "adapter_config.json").is_file():
        return extracted
    entries = list(extracted.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "adapter_config.json").is_file():
        return entries[0]
    return None


def _adapter_problem(path: Path, base_model_name: str | None) -> str | None:
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"adapter_config.json cannot be read ({exc})"
    if not isinstance(config, dict) or str(config.get("peft_type")).upper() != "LORA":
        return "adapter_config.json does not describe a LoRA adapter (peft_type LORA)"
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return f"it has no {' or '.join(WEIGHT_FILES)}"
    trained_for = config.get("base_model_name_or_path")
    if base_model_name and trained_for and _short(trained_for) != _short(base_model_name):
        return f"it was trained for base model {trained_for!r}, not the served {base_model_name!r}"
    return None


def _short(model_name: str) -> str:
    return str(model_name).rstrip("/").rsplit("/", 1)[-1].lower()
