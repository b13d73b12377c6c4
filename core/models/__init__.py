"""Model implementations: the Llama family over a paged KV cache."""

from .attention import AttentionMetadata
from .llama import CausalLM
from .registry import SUPPORTED_ARCHITECTURES, build_model

__all__ = ["AttentionMetadata", "CausalLM", "SUPPORTED_ARCHITECTURES", "build_model"]
