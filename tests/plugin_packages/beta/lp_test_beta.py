"""Test plugin in vLLM's general-plugin style: a function that registers `beta_resolver`."""

from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry

CALLS = []


class BetaResolver(LoRAResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        return None


def register_beta_resolver():
    CALLS.append(1)
    LoRAResolverRegistry.register_resolver("beta_resolver", BetaResolver())
