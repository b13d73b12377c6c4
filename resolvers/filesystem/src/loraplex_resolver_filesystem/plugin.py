"""The plugin: entry point `lora_filesystem_resolver` in the group `loraplex.plugins`.

Registers `FilesystemResolver` as `lora_filesystem_resolver` over `VLLM_LORA_RESOLVER_CACHE_DIR`;
registers nothing (and logs why) when that variable is unset.
"""

from __future__ import annotations

import logging

from loraplex import envs
from loraplex.plugins import hookimpl

from .resolver import RESOLVER_NAME, FilesystemResolver

logger = logging.getLogger(__name__)


@hookimpl
def register_lora_resolvers(registry) -> None:
    cache_dir = envs.lora_resolver_cache_dir()
    if not cache_dir:
        logger.info("%s: VLLM_LORA_RESOLVER_CACHE_DIR is not set, so the filesystem LoRA resolver is not registered; "
                    "set it to a directory of PEFT adapters to enable it", RESOLVER_NAME)
        return
    resolver = FilesystemResolver(cache_dir)
    if not resolver.lora_cache_dir.is_dir():
        logger.warning("%s: VLLM_LORA_RESOLVER_CACHE_DIR=%r is not a directory (yet); the resolver is registered and "
                       "finds nothing until it exists", RESOLVER_NAME, cache_dir)
    registry.register_resolver(RESOLVER_NAME, resolver)
