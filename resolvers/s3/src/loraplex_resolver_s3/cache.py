"""The local adapter cache: one directory per S3 folder, only ever complete.

An entry is `<cache_dir>/<label>-<hash>/` (the hash is of the endpoint and the folder's URI)
holding the adapter's files and `.loraplex-s3.json`, the manifest: the URI and each file's
size and ETag as listed. A download goes into a hidden temporary directory beside it
(`.<entry>.tmp-*`), is checked, and is renamed into place; an entry is never written in place,
so whatever is at an entry's name is a complete adapter. Stale temporary directories (from a
process that died mid-download) are swept after an hour.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MANIFEST", "AdapterCache", "RemoteFile"]

MANIFEST = ".loraplex-s3.json"
_STALE_SECONDS = 3600.0


@dataclass(frozen=True)
class RemoteFile:
    """One object of an adapter's folder, as listed."""

    name: str  # file name inside the adapter directory
    path: str  # s3fs path: bucket/key
    size: int
    etag: str | None


class AdapterCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def entry(self, uri: str, endpoint_url: str | None, lora_name: str) -> Path:
        digest = hashlib.sha256(f"{endpoint_url or ''}\n{uri}".encode()).hexdigest()[:16]
        label = re.sub(r"[^A-Za-z0-9._-]", "_", lora_name.rsplit("/", 1)[-1])[:64].lstrip(".") or "adapter"
        return self.root / f"{label}-{digest}"

    @staticmethod
    def manifest_for(uri: str, files: list[RemoteFile]) -> dict:
        return {"uri": uri, "files": {f.name: {"size": f.size, "etag": f.etag} for f in sorted(files, key=lambda f: f.name)}}

    @staticmethod
    def read_manifest(entry: Path) -> dict | None:
        try:
            manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    @classmethod
    def is_complete(cls, entry: Path, manifest: dict | None = None) -> bool:
        """The entry exists, has a manifest (or the given one) and every file it lists, at its size."""
        found = cls.read_manifest(entry)
        if found is None or (manifest is not None and found != manifest):
            return False
        try:
            return all((entry / name).stat().st_size == meta["size"] for name, meta in found["files"].items())
        except (OSError, KeyError, TypeError):
            return False

    def new_temp_dir(self, entry: Path) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep(entry)
        return Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=self.root))

    def install(self, temp: Path, entry: Path, manifest: dict) -> None:
        """Write the manifest into `temp`, flush it all to disk and rename `temp` to `entry`.

        An existing entry (an older version of the adapter) is moved aside first and removed
        after. If another process installed the same version meanwhile, `temp` is left for the
        caller to delete and the existing entry stays.
        """
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        for file in temp.iterdir():
            _fsync(file)
        _fsync(temp)
        try:
            os.rename(temp, entry)
        except OSError:
            if self.is_complete(entry, manifest):
                return  # someone else installed this very version
            old = self.root / f".{entry.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(entry, old)
            os.rename(temp, entry)
            shutil.rmtree(old, ignore_errors=True)
        _fsync(self.root)

    def _sweep(self, entry: Path) -> None:
        """Remove this entry's temporary and replaced directories older than an hour."""
        now = time.time()
        for pattern in (f".{entry.name}.tmp-*", f".{entry.name}.old-*"):
            for leftover in self.root.glob(pattern):
                try:
                    if now - leftover.stat().st_mtime > _STALE_SECONDS:
                        shutil.rmtree(leftover, ignore_errors=True)
                except OSError:
                    pass


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
