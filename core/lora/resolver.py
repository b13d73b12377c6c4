"""`loraplex.lora.resolver`: vLLM's import path (`vllm.lora.resolver`) for the resolver API.

The definitions live in `loraplex.resolver`; this module re-exports them so code written for
vLLM ports by changing `vllm` to `loraplex` in its import lines.
"""

from ..resolver import LoRARequest, LoRAResolver, LoRAResolverRegistry, _LoRAResolverRegistry

__all__ = ["LoRARequest", "LoRAResolver", "LoRAResolverRegistry", "_LoRAResolverRegistry"]
