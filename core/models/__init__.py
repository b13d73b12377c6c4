"""Model implementations: the Llama family over a paged KV cache, and LLaVA on top of it."""

from .attention import AttentionMetadata
from .llama import CausalLM
from .llava import LlavaForConditionalGeneration
from .registry import SUPPORTED_ARCHITECTURES, Model, build_model

__all__ = ["AttentionMetadata", "CausalLM", "LlavaForConditionalGeneration", "Model", "SUPPORTED_ARCHITECTURES",
           "build_model"]
