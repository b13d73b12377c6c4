"""A loraplex LoRA resolver plugin: adapters published as `<lora_name>.tar.gz` archives at a URL.

See README.md. The pieces: `config` (settings from the environment), `archive` (safe
extraction), `resolver` (download, check, atomic install into the cache), `plugin` (the hook).
"""

from .config import ArchiveResolverConfig
from .resolver import RESOLVER_NAME, HttpArchiveResolver

__all__ = ["RESOLVER_NAME", "ArchiveResolverConfig", "HttpArchiveResolver"]
__version__ = "0.1.0"
