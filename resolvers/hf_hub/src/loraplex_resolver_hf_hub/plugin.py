"""The plugin: entry point `lora_hf_hub_resolver` in the group `loraplex.plugins`.

Opt-in: it registers `HfHubResolver` as `lora_hf_hub_resolver` only when `VLLM_PLUGINS` names
`lora_hf_hub_resolver` explicitly (downloading from the internet is never a default). The
allowed repos come from `VLLM_LORA_RESOLVER_HF_REPO_LIST`; named but without repos, the plugin
fails to load with a message saying so (see `loraplex plugins`).
"""

from __future__ import annotations

import logging

from loraplex import envs
from loraplex.errors import ConfigError
from loraplex.plugins import hookimpl

from .resolver import RESOLVER_NAME, HfHubResolver

logger = logging.getLogger(__name__)

ENTRY_POINT_NAME = "lora_hf_hub_resolver"


@hookimpl
def register_lora_resolvers(registry) -> None:
    selection = envs.plugins_selection()
    if not selection or ENTRY_POINT_NAME not in selection:
        logger.info("%s: the Hugging Face Hub LoRA resolver is opt-in and is not registered; name it in VLLM_PLUGINS "
                    "(e.g. VLLM_PLUGINS=%s) and list repos in VLLM_LORA_RESOLVER_HF_REPO_LIST to enable it",
                    RESOLVER_NAME, ENTRY_POINT_NAME)
        return
    repos = envs.lora_resolver_hf_repo_list()
    if not repos:
        raise ConfigError(
            f"{ENTRY_POINT_NAME} is enabled in VLLM_PLUGINS but VLLM_LORA_RESOLVER_HF_REPO_LIST is empty; set it to the "
            "comma-separated Hub repos adapters may come from (e.g. my-org/adapters,my-org/sql-lora), or leave the "
            "plugin out of VLLM_PLUGINS"
        )
    registry.register_resolver(RESOLVER_NAME, HfHubResolver(repos))
