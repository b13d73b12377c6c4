"""Tiny LLaVA models, PEFT adapters on their tower, projector and language model, images, and
transformers + PEFT as the oracle, for the multi-modal tests.

`TinyLlava(root, arch)` builds the model (`loraplex.testing.tiny_llava_model`) and three
adapters: "tower" (every linear of the CLIP tower), "projector" (both projector linears) and
"lm" (attention and MLP projections of the language model). `oracle(adapter, prompt, images)`
is transformers' greedy continuation (PEFT's with that adapter alone active; None: the base).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_helpers import make_adapter, quiet_peft

TOKENS = 8
TARGETS = {
    "tower": r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    "projector": r".*multi_modal_projector\.linear_[12]",
    "lm": r".*language_model.*\.(q_proj|v_proj|o_proj|gate_proj|down_proj)",
}


def random_image(seed: int, size: tuple[int, int] = (40, 50)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class TinyLlava:
    def __init__(self, root: Path, arch: str) -> None:
        from peft import PeftModel
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        from loraplex.testing.llava import tiny_llava_model

        self.path = tiny_llava_model(root / f"llava_{arch}", arch, seed=3)
        base = LlavaForConditionalGeneration.from_pretrained(str(self.path), dtype=torch.float32).eval()
        self.adapters = {name: make_adapter(base, root / f"llava_{arch}_{name}", seed=i + 1, r=4, lora_alpha=8,
                                            target_modules=target, b_std=0.3)
                         for i, (name, target) in enumerate(TARGETS.items())}
        self.processor = AutoProcessor.from_pretrained(str(self.path), backend="pil")
        with quiet_peft():
            names = list(self.adapters)
            self.peft = PeftModel.from_pretrained(base, str(self.adapters[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                self.peft.load_adapter(str(self.adapters[name]), adapter_name=name)
        self.peft.eval()
        self._cache: dict[Any, list[int]] = {}

    @torch.inference_mode()
    def oracle(self, adapter: str | None, prompt: str, images: list | None = None, n: int = TOKENS) -> list[int]:
        key = (adapter, prompt, tuple(id(i) for i in images or ()), n)
        if key not in self._cache:
            inputs = self.processor(images=images or None, text=prompt, return_tensors="pt")
            self._cache[key] = self._generate(adapter, inputs, n)
        return self._cache[key]

    @torch.inference_mode()
    def oracle_ids(self, adapter: str | None, prompt_ids: list[int], images: list, n: int = TOKENS) -> list[int]:
        """`oracle` for a prompt given as token ids with one placeholder token per image."""
        token = self.processor.tokenizer.convert_tokens_to_ids("<image>")
        per_image = self.processor.image_processor.crop_size["height"] // self.processor.patch_size
        expanded = [t for token_id in prompt_ids for t in ([token] * per_image**2 if token_id == token else [token_id])]
        inputs = {"input_ids": torch.tensor([expanded]), "attention_mask": torch.ones(1, len(expanded), dtype=torch.long)}
        if images:
            inputs["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return self._generate(adapter, inputs, n)

    def _generate(self, adapter: str | None, inputs: dict, n: int) -> list[int]:
        """PEFT's greedy tokens after the prompt, with `adapter` (None: adapters disabled)."""
        options = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
        with quiet_peft():
            if adapter is None:
                with self.peft.disable_adapter():
                    out = self.peft.generate(**inputs, **options)
            else:
                self.peft.set_adapter(adapter)
                out = self.peft.generate(**inputs, **options)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def llm(self, **options: Any):
        from loraplex import LLM

        options = {"kv_cache_memory_bytes": 1 << 22, "max_model_len": 256, "dtype": "float32", "device": "cpu",
                   "enable_lora": True, "max_loras": 3, "max_lora_rank": 8, **options}
        return LLM(str(self.path), **options)


def greedy(n: int = TOKENS):
    from loraplex import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
