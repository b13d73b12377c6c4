"""Write many PEFT LoRA adapters for the embedded model, fast: one made by PEFT, the rest its clones
with fresh random weights (same file names, same adapter_config.json: the real PEFT format)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def make_adapters(base_dir: str, out_dir: Path, count: int, rank: int = 16, seed: int = 0) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"adapter-{i:03d}" for i in range(count)]
    marker = out_dir / f"done-{count}-{rank}-{seed}.json"
    if marker.is_file():
        return paths
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    get_peft_model(base, config).save_pretrained(str(paths[0]))
    template = load_file(str(paths[0] / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for path in paths:
        if path != paths[0]:
            path.mkdir(exist_ok=True)
            shutil.copy(paths[0] / "adapter_config.json", path / "adapter_config.json")
        tensors = {name: torch.randn(t.shape, generator=generator) * (0.02 if "lora_A" in name else 0.01)
                   for name, t in template.items()}
        save_file(tensors, str(path / "adapter_model.safetensors"))
    marker.write_text(json.dumps({"count": count, "rank": rank}))
    return paths
