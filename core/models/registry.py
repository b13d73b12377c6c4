"""The architectures loraplex implements, keyed by the `architectures` names in config.json."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from ..errors import UnsupportedModelError
from .llama import ArchitectureTraits, CausalLM
from .llava import LlavaForConditionalGeneration

SUPPORTED_ARCHITECTURES: dict[str, ArchitectureTraits] = {
    "LlamaForCausalLM": ArchitectureTraits(),
    "MistralForCausalLM": ArchitectureTraits(sliding="all"),
    "Qwen2ForCausalLM": ArchitectureTraits(qkv_bias=True, o_bias=False, sliding="layer_types"),
    "Qwen3ForCausalLM": ArchitectureTraits(qk_norm=True, sliding="layer_types"),
}

# vision-language models: their language model is one of the above, named by its model_type
MULTIMODAL_ARCHITECTURES = ("LlavaForConditionalGeneration",)
_TEXT_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}

Model = CausalLM | LlavaForConditionalGeneration


def architecture_of(config: PretrainedConfig, where: str) -> str:
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
        if name in MULTIMODAL_ARCHITECTURES:
            text_type = config.get_text_config().model_type
            vision_type = getattr(getattr(config, "vision_config", None), "model_type", None)
            if text_type not in _TEXT_MODEL_TYPES or vision_type != "clip_vision_model":
                raise UnsupportedModelError(
                    f"model at {where} is a {name} with a {text_type!r} language model and a {vision_type!r} vision "
                    f"tower; loraplex serves it with a CLIP vision tower and a {', '.join(_TEXT_MODEL_TYPES)} language model"
                )
            return name
    raise UnsupportedModelError(
        f"model at {where} has architecture {', '.join(names) or '(none named in config.json)'}, "
        f"which loraplex does not implement; supported: {', '.join((*SUPPORTED_ARCHITECTURES, *MULTIMODAL_ARCHITECTURES))}"
    )


def build_model(config: PretrainedConfig, where: str, max_positions: int, dtype: torch.dtype, device: torch.device) -> Model:
    """An uninitialised model of the config's architecture, allocated on `device` in `dtype`."""
    architecture = architecture_of(config, where)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if architecture in MULTIMODAL_ARCHITECTURES:
                traits = SUPPORTED_ARCHITECTURES[_TEXT_MODEL_TYPES[config.get_text_config().model_type]]
                try:
                    return LlavaForConditionalGeneration(config, traits, max_positions).eval()
                except ValueError as exc:
                    raise UnsupportedModelError(f"model at {where}: {exc}") from exc
            return CausalLM(config, SUPPORTED_ARCHITECTURES[architecture], max_positions).eval()
    finally:
        torch.set_default_dtype(previous)
