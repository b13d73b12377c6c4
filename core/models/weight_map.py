"""Map Hugging Face checkpoint tensor names onto the model's (packed) parameters."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .llama import CausalLM

# checkpoint module (as PEFT names it too) -> (our packed module, slice index)
PACKED_MODULES = {
    "self_attn.q_proj": ("qkv_proj", 0),
    "self_attn.k_proj": ("qkv_proj", 1),
    "self_attn.v_proj": ("qkv_proj", 2),
    "self_attn.o_proj": ("o_proj", 0),
    "mlp.gate_proj": ("gate_up_proj", 0),
    "mlp.up_proj": ("gate_up_proj", 1),
    "mlp.down_proj": ("down_proj", 0),
}
_PLAIN = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attn.q_norm.weight": "q_norm.weight",
    "self_attn.k_norm.weight": "k_norm.weight",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.)")


def assign_checkpoint_tensors(model: "CausalLM", weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy each checkpoint tensor into place; refuse unknown names and report missing ones."""
    expected = _expected_names(model)
    seen: set[str] = set()
    for name, tensor in weights:
        if _IGNORED.search(name):
            continue
        if name == "lm_head.weight" and model.tie_word_embeddings:
            continue
        try:
            target = _assign_one(model, name, tensor)
        except ValueError as exc:
            raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc
        if target is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint lacks tensors the model needs: {shown}")


def _assign_one(model: "CausalLM", name: str, tensor: torch.Tensor) -> str | None:
    if name == "model.embed_tokens.weight":
        return _copy(model.embed_tokens.weight, tensor, name)
    if name == "model.norm.weight":
        return _copy(model.norm.weight, tensor, name)
    if name == "lm_head.weight":
        model.lm_head.load_slice(0, tensor)
        return name
    match = _LAYER.match(name)
    if not match or int(match.group(1)) >= len(model.layers):
        return None
    layer = model.layers[int(match.group(1))]
    rest = match.group(2)
    for prefix, (attr, index) in PACKED_MODULES.items():
        if rest == f"{prefix}.weight":
            getattr(layer, attr).load_slice(index, tensor)
            return name
        if rest == f"{prefix}.bias":
            linear = getattr(layer, attr)
            if linear.bias is None:
                return None
            start = sum(linear.output_sizes[:index])
            linear.bias.data[start : start + linear.output_sizes[index]].copy_(tensor)
            return name
    if rest in _PLAIN:
        module_name, _ = _PLAIN[rest].split(".")
        module = getattr(layer, module_name)
        return None if module is None else _copy(module.weight, tensor, name)
    return None


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> str:
    if param.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
    param.data.copy_(tensor)
    return name


def _expected_names(model: "CausalLM") -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not model.tie_word_embeddings:
        names.add("lm_head.weight")
    for i, layer in enumerate(model.layers):
        for prefix, (attr, _) in PACKED_MODULES.items():
            names.add(f"model.layers.{i}.{prefix}.weight")
            if getattr(layer, attr).bias is not None:
                names.add(f"model.layers.{i}.{prefix}.bias")
        for ckpt, ours in _PLAIN.items():
            if getattr(layer, ours.split(".")[0]) is not None:
                names.add(f"model.layers.{i}.{ckpt}")
    return names
