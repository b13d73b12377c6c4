"""A tiny, random, deterministic LLaVA checkpoint (CLIP tower + projector + a small decoder).

Built with transformers alone, offline, in about a second: for tests, examples and benchmarks
of the multi-modal path. Needs Pillow (the image processor's PIL backend).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["IMAGE_TOKEN", "TINY_LLAVA_TEXT_ARCHITECTURES", "tiny_llava_model"]

IMAGE_TOKEN = "<image>"
TINY_LLAVA_TEXT_ARCHITECTURES = ("llama", "qwen2", "mistral")
_TEXT_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def tiny_llava_model(path: str | Path, text_architecture: str = "llama", *, seed: int = 0, image_size: int = 32,
                     patch_size: int = 8, hidden_size: int = 64, num_hidden_layers: int = 2,
                     vision_hidden_size: int = 32, vision_layers: int = 2) -> Path:
    """Write a tiny random LLaVA into `path` (created) with `save_pretrained`: the model, the
    byte-level tokenizer of `loraplex.testing.tiny_base_model` plus an `<image>` token, and a
    LlavaProcessor (CLIP image processor, `image_size` square images, `patch_size` patches: 16
    placeholder tokens per image by default). `text_architecture` is one of
    TINY_LLAVA_TEXT_ARCHITECTURES. Weights are seeded normal draws with a large spread, so the
    logits are peaky and greedy decoding has no near-ties; returns `path`.
    """
    import torch
    import transformers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    from .models import _tokenizer, randomize_weights

    if text_architecture not in _TEXT_CONFIGS:
        raise ValueError(f"text_architecture must be one of {', '.join(_TEXT_CONFIGS)}; got {text_architecture!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden_size)
    text = getattr(transformers, _TEXT_CONFIGS[text_architecture])(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    num_patches = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         image_seq_length=num_patches, vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    randomize_weights(model, seed)
    model.save_pretrained(str(path))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(str(path))
    return path
