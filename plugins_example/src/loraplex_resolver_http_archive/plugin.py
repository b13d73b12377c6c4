"""loraplex plugin hook: registers the resolver `lora_http_archive_resolver` when configured."""

from __future__ import annotations

import logging

from loraplex.plugins import hookimpl

from .config import ArchiveResolverConfig
from .resolver import RESOLVER_NAME, HttpArchiveResolver

logger = logging.getLogger(__name__)


@hookimpl
def register_lora_resolvers(registry) -> None:
    config = ArchiveResolverConfig.from_env()
    if config is None:
        logger.info("%s: LORA_HTTP_ARCHIVE_URL is not set; the resolver is not registered", RESOLVER_NAME)
        return
    registry.register_resolver(RESOLVER_NAME, HttpArchiveResolver(config))
