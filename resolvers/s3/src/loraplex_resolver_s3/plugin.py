"""The plugin: entry point `lora_s3_resolver` in the group `loraplex.plugins`.

Opt-in: it registers `S3Resolver` as `lora_s3_resolver` only when `VLLM_PLUGINS` names
`lora_s3_resolver` explicitly. Configuration (see loraplex.envs):

    LORAPLEX_S3_LORA_URI          required: s3://bucket/prefix, or a template with {lora_name}
                                  and {base_model_name}
    LORAPLEX_S3_LORA_CACHE_DIR    local cache (default: $LORAPLEX_CACHE_DIR/s3-loras)
    LORAPLEX_S3_LORA_MAX_BYTES    refuse larger adapters (default: no limit)
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_* credentials and profiles: as the AWS SDKs

Named in VLLM_PLUGINS without LORAPLEX_S3_LORA_URI, the plugin fails to load with a message
saying so (see `loraplex plugins`).
"""

from __future__ import annotations

import logging

from loraplex import envs
from loraplex.errors import ConfigError
from loraplex.plugins import hookimpl

from .resolver import RESOLVER_NAME, S3Resolver

logger = logging.getLogger(__name__)

ENTRY_POINT_NAME = "lora_s3_resolver"


@hookimpl
def register_lora_resolvers(registry) -> None:
    selection = envs.plugins_selection()
    if not selection or ENTRY_POINT_NAME not in selection:
        logger.info("%s: the S3 LoRA resolver is opt-in and is not registered; name it in VLLM_PLUGINS (e.g. "
                    "VLLM_PLUGINS=%s) and set LORAPLEX_S3_LORA_URI to enable it", RESOLVER_NAME, ENTRY_POINT_NAME)
        return
    if envs.lora_s3_uri() is None:
        raise ConfigError(
            f"{ENTRY_POINT_NAME} is enabled in VLLM_PLUGINS but LORAPLEX_S3_LORA_URI is not set; set it to where the "
            "adapters are, e.g. s3://my-bucket/loras/{lora_name} or s3://my-bucket/loras/{base_model_name}/{lora_name}, "
            "or leave the plugin out of VLLM_PLUGINS"
        )
    try:
        resolver = S3Resolver.from_env()
    except ValueError as exc:
        raise ConfigError(f"{ENTRY_POINT_NAME}: {exc}") from exc
    registry.register_resolver(RESOLVER_NAME, resolver)
