"""Test plugin whose registration hook calls sys.exit() after registering one resolver (which must be undone)."""

import sys

from loraplex.plugins import hookimpl
from loraplex.resolver import LoRAResolver


class HalfResolver(LoRAResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        return None


@hookimpl
def register_lora_resolvers(registry):
    registry.register_resolver("exit_half_resolver", HalfResolver())
    sys.exit(3)
