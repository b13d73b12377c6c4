"""Test plugin whose registration fails after registering one resolver (which must be undone)."""

from loraplex.plugins import hookimpl
from loraplex.resolver import LoRAResolver


class HalfResolver(LoRAResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        return None


@hookimpl
def register_lora_resolvers(registry):
    registry.register_resolver("broken_half_resolver", HalfResolver())
    raise RuntimeError("bucket is not configured")
