"""This plugin's settings, all read here from the environment.

    LORA_HTTP_ARCHIVE_URL        where archives are: a template with {lora_name}, e.g.
                                 https://models.example.com/loras/{lora_name}.tar.gz; a URL
                                 without it is a base: <url>/{lora_name}.tar.gz. Any fsspec URL
                                 works (file://, s3://, ... with the matching fsspec package).
    LORA_HTTP_ARCHIVE_CACHE_DIR  where extracted adapters are kept
                                 (default: ~/.cache/loraplex-http-archive)
    LORA_HTTP_ARCHIVE_MAX_BYTES  largest archive, and largest extracted size (default 2 GiB)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_MAX_BYTES", "ArchiveResolverConfig"]

DEFAULT_MAX_BYTES = 2 << 30


@dataclass(frozen=True)
class ArchiveResolverConfig:
    url_template: str
    cache_dir: Path
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        template = self.url_template.strip()
        if not template:
            raise ValueError("the archive URL is empty; set LORA_HTTP_ARCHIVE_URL, e.g. https://host/loras/{lora_name}.tar.gz")
        if "{lora_name}" not in template:
            template = template.rstrip("/") + "/{lora_name}.tar.gz"
        try:
            template.format(lora_name="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"archive URL template {self.url_template!r} is invalid ({exc!r}); its only placeholder "
                             "is {lora_name}") from None
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive; got {self.max_bytes}")
        object.__setattr__(self, "url_template", template)
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())

    def url_for(self, lora_name: str) -> str:
        return self.url_template.format(lora_name=lora_name)

    @classmethod
    def from_env(cls) -> ArchiveResolverConfig | None:
        """The configuration from the environment; None when LORA_HTTP_ARCHIVE_URL is unset."""
        url = os.environ.get("LORA_HTTP_ARCHIVE_URL", "").strip()
        if not url:
            return None
        cache = os.environ.get("LORA_HTTP_ARCHIVE_CACHE_DIR", "").strip()
        limit = os.environ.get("LORA_HTTP_ARCHIVE_MAX_BYTES", "").strip()
        try:
            max_bytes = int(limit) if limit else DEFAULT_MAX_BYTES
        except ValueError:
            raise ValueError(f"LORA_HTTP_ARCHIVE_MAX_BYTES={limit!r} is not a whole number of bytes") from None
        return cls(url, Path(cache) if cache else Path.home() / ".cache" / "loraplex-http-archive", max_bytes)
