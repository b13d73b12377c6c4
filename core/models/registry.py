"""The architectures loraplex implements, keyed by the `architectures` names in config.json."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from ..errors import UnsupportedModelError
from .llama import ArchitectureTraits, CausalLM

SUPPORTED_ARCHITECTURES: dict[str, ArchitectureTraits] = {
    "LlamaForCausalLM": ArchitectureTraits(),
    "MistralForCausalLM": ArchitectureTraits(sliding="all"),
    "Qwen2ForCausalLM": ArchitectureTraits(qkv_bias=True, o_bias=False, sliding="layer_types"),
    "Qwen3ForCausalLM": ArchitectureTraits(qk_norm=True, sliding="layer_types"),
}


def architecture_of(config: PretrainedConfig, where: str) -> str:
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise UnsupportedModelError(
        f"model at {where} has architecture {', '.join(names) or '(none named in config.json)'}, "
        f"which loraplex does not implement; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def build_model(config: PretrainedConfig, where: str, max_positions: int, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """An uninitialised model of the config's architecture, allocated on `device` in `dtype`."""
    traits = SUPPORTED_ARCHITECTURES[architecture_of(config, where)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return CausalLM(config, traits, max_positions).eval()
    finally:
        torch.set_default_dtype(previous)
