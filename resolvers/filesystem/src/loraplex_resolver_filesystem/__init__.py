"""loraplex LoRA resolver for adapters in a local directory tree.

Installed, it registers the resolver `lora_filesystem_resolver` (entry point of the same name in
the group `loraplex.plugins`) over the directory `VLLM_LORA_RESOLVER_CACHE_DIR`. See README.md.
"""

from .resolver import RESOLVER_NAME, FilesystemResolver

__all__ = ["RESOLVER_NAME", "FilesystemResolver"]
__version__ = "0.1.0"
