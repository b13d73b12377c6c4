"""`S3Resolver`: adapters downloaded from an S3 folder per name into an atomic local cache."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidLoRAAdapterError
from loraplex.lora.request import LoRARequest
from loraplex.resolver import LoRAResolver

from loraplex.lora.adapter_dir import WEIGHT_FILES, adapter_problem, name_problem, stable_lora_id
from .cache import AdapterCache, RemoteFile
from .uri import S3Location, S3UriTemplate

__all__ = ["RESOLVER_NAME", "S3Resolver"]

logger = logging.getLogger(__name__)

RESOLVER_NAME = "lora_s3_resolver"
CONFIG_FILE = "adapter_config.json"


class S3Resolver(LoRAResolver):
    """Resolves `lora_name` to the PEFT adapter in the S3 folder `uri` names for it.

    `uri` is a template (see `S3UriTemplate`): `s3://bucket/loras` or
    `s3://bucket/loras/{base_model_name}/{lora_name}`. Of the folder, `adapter_config.json`
    and the weights (`adapter_model.safetensors`, else `adapter_model.bin`) are downloaded,
    nothing else; if their listed total exceeds `max_bytes`, the adapter is refused before any
    download. Files go to a temporary directory in `cache_dir`, are checked (the config parses
    and is a LoRA for the served base model, sizes match the listing) and the directory is
    renamed into place: the cache never holds a partial adapter. A cached adapter is reused
    while the listing (sizes, ETags) is unchanged, and served with a warning if S3 cannot be
    reached. Concurrent resolves of one name share one download.

    Endpoint and credentials come the standard AWS ways (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and the shared
    config files, instance roles); `endpoint_url` and `storage_options` (passed to
    `s3fs.S3FileSystem`) override them. Blocking s3fs calls run in the resolver's own threads,
    never on the event loop.
    """

    def __init__(
        self,
        uri: str,
        cache_dir: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        endpoint_url: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        max_workers: int = 4,
    ) -> None:
        self.template = S3UriTemplate(uri)
        self.cache = AdapterCache(Path(cache_dir))
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive number of bytes or None; got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.endpoint_url = endpoint_url
        self.storage_options = dict(storage_options or {})
        self._fs = None
        self._fs_lock = threading.Lock()
        self._inflight: dict[Path, concurrent.futures.Future] = {}
        self._inflight_lock = threading.RLock()  # re-entered when a future is already done
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="loraplex-s3")
        self.downloads = 0  # adapters downloaded (not served from the cache), for tests and metrics

    @classmethod
    def from_env(cls, **overrides: Any) -> S3Resolver:
        """Configured from LORAPLEX_S3_LORA_URI, LORAPLEX_S3_LORA_CACHE_DIR, LORAPLEX_S3_LORA_MAX_BYTES
        and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (see loraplex.envs)."""
        from loraplex import envs

        uri = envs.lora_s3_uri()
        if uri is None:
            raise ValueError("LORAPLEX_S3_LORA_URI is not set; set it to e.g. s3://my-bucket/loras/{lora_name}")
        settings: dict[str, Any] = {
            "cache_dir": envs.lora_s3_cache_dir(),
            "max_bytes": envs.lora_s3_max_bytes(),
            "endpoint_url": envs.aws_endpoint_url_s3(),
        }
        settings.update(overrides)
        return cls(uri, **settings)

    def __repr__(self) -> str:
        return f"S3Resolver({self.template.template!r}, cache_dir={str(self.cache.root)!r})"

    # ---- resolution ---------------------------------------------------------------------------------

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        problem = name_problem(lora_name)
        if problem is not None:
            logger.warning("%s: refusing LoRA adapter name %r: %s", RESOLVER_NAME, lora_name, problem)
            return None
        try:
            location = self.template.render(base_model_name, lora_name)
        except ValueError as exc:
            logger.warning("%s: cannot look up LoRA adapter %r for base model %r: %s", RESOLVER_NAME, lora_name,
                           base_model_name, exc)
            return None
        entry = self.cache.entry(location.uri, self.endpoint_url, lora_name)
        with self._inflight_lock:
            future = self._inflight.get(entry)
            if future is None:  # the first caller starts the work; the others wait for it
                future = self._executor.submit(self._resolve_blocking, base_model_name, lora_name, location, entry)
                self._inflight[entry] = future
                future.add_done_callback(lambda done, entry=entry: self._end_flight(entry, done))
        # shield: a caller that is cancelled (e.g. times out) does not cancel the others' download
        return await asyncio.shield(asyncio.wrap_future(future))

    def _end_flight(self, entry: Path, future: concurrent.futures.Future) -> None:
        with self._inflight_lock:
            if self._inflight.get(entry) is future:
                del self._inflight[entry]

    def _resolve_blocking(self, base_model_name: str, lora_name: str, location: S3Location, entry: Path) -> LoRARequest | None:
        try:
            files = self._list(location)
        except FileNotFoundError:
            files = {}
        except Exception as exc:
            if self.cache.is_complete(entry):
                logger.warning("%s: cannot list %s (%s: %s); serving the cached copy of LoRA adapter %r",
                               RESOLVER_NAME, location.uri, type(exc).__name__, exc, lora_name)
                return self._request_for(entry, base_model_name, lora_name)
            raise
        wanted = self._adapter_files(files, location, lora_name)
        if wanted is None:
            return None
        total = sum(f.size for f in wanted)
        if self.max_bytes is not None and total > self.max_bytes:
            message = (f"LoRA adapter {lora_name!r} at {location.uri} is {total} bytes, over the limit of {self.max_bytes} "
                       "bytes (LORAPLEX_S3_LORA_MAX_BYTES); raise the limit or use a smaller adapter")
            logger.warning("%s: %s", RESOLVER_NAME, message)
            raise InvalidLoRAAdapterError(message)
        manifest = self.cache.manifest_for(location.uri, wanted)
        if self.cache.is_complete(entry, manifest):
            logger.debug("%s: LoRA adapter %r is cached at %s", RESOLVER_NAME, lora_name, entry)
            return self._request_for(entry, base_model_name, lora_name)
        return self._download(wanted, manifest, entry, base_model_name, lora_name, location)

    def _list(self, location: S3Location) -> dict[str, RemoteFile]:
        """The folder's top-level objects by file name."""
        prefix = location.path + "/"
        files = {}
        for info in self.filesystem().ls(prefix, detail=True, refresh=True):
            path = info.get("name") or info.get("Key") or ""
            name = path[len(prefix):] if path.startswith(prefix) else ""
            if info.get("type") != "file" or not name or "/" in name:
                continue
            etag = info.get("ETag") or info.get("etag")
            files[name] = RemoteFile(name, path, int(info.get("size") or 0), str(etag).strip('"') if etag else None)
        return files

    def _adapter_files(self, files: dict[str, RemoteFile], location: S3Location, lora_name: str) -> list[RemoteFile] | None:
        if not files:
            logger.debug("%s: nothing at %s for LoRA adapter %r", RESOLVER_NAME, location.uri, lora_name)
            return None
        if CONFIG_FILE not in files:
            logger.info("%s: %s has no %s, so it is not a PEFT adapter (asked for %r)", RESOLVER_NAME, location.uri,
                        CONFIG_FILE, lora_name)
            return None
        weights = next((files[name] for name in WEIGHT_FILES if name in files), None)
        if weights is None:
            logger.warning("%s: %s has no adapter weights (%s); not serving LoRA adapter %r", RESOLVER_NAME,
                           location.uri, " or ".join(WEIGHT_FILES), lora_name)
            return None
        return [files[CONFIG_FILE], weights]

    def _download(self, wanted: list[RemoteFile], manifest: dict, entry: Path, base_model_name: str, lora_name: str,
                  location: S3Location) -> LoRARequest | None:
        temp = self.cache.new_temp_dir(entry)
        try:
            fs = self.filesystem()
            for remote in wanted:
                fs.get_file(remote.path, str(temp / remote.name))
            for remote in wanted:
                size = (temp / remote.name).stat().st_size
                if size != remote.size:
                    raise OSError(f"downloaded {remote.name} of LoRA adapter {lora_name!r} from {location.uri} is {size} "
                                  f"bytes, but S3 listed {remote.size} (changed during the download?); try again")
            problem = adapter_problem(temp, base_model_name, temp.resolve())
            if problem is not None:
                logger.warning("%s: not serving LoRA adapter %r (%s) for base model %r: %s", RESOLVER_NAME, lora_name,
                               location.uri, base_model_name, problem)
                return None
            self.cache.install(temp, entry, manifest)
            self.downloads += 1
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        logger.info("%s: LoRA adapter %r downloaded from %s to %s", RESOLVER_NAME, lora_name, location.uri, entry)
        return LoRARequest(lora_name=lora_name, lora_int_id=stable_lora_id(lora_name), lora_path=str(entry))

    def _request_for(self, entry: Path, base_model_name: str, lora_name: str) -> LoRARequest | None:
        problem = adapter_problem(entry, base_model_name, entry.resolve())
        if problem is not None:
            logger.warning("%s: not serving cached LoRA adapter %r for base model %r: %s", RESOLVER_NAME, lora_name,
                           base_model_name, problem)
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=stable_lora_id(lora_name), lora_path=str(entry))

    # ---- s3fs ---------------------------------------------------------------------------------------

    def filesystem(self):
        """The resolver's `s3fs.S3FileSystem` (synchronous interface; created on first use)."""
        with self._fs_lock:
            if self._fs is None:
                import s3fs

                options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
                if self.endpoint_url:
                    options["endpoint_url"] = self.endpoint_url
                options.update(self.storage_options)
                self._fs = s3fs.S3FileSystem(**options)
            return self._fs
