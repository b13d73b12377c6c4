"""Test plugin: a module whose @hookimpl registers `alpha_resolver`."""

from loraplex.plugins import hookimpl
from loraplex.resolver import LoRAResolver

CALLS = []


class AlphaResolver(LoRAResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        return None


@hookimpl
def register_lora_resolvers(registry):
    CALLS.append(registry)
    registry.register_resolver("alpha_resolver", AlphaResolver())
