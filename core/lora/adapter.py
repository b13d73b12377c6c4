"""Loading a PEFT LoRA adapter from disk into CPU tensors shaped for the served model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidLoRAAdapterError, LoRAAdapterNotFoundError
from ..models.weight_map import PACKED_MODULES
from .adapter_dir import short_model_name
from .peft_config import AdapterConfig
from .slot_layout import ModuleKey, SlotLayout

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (an adapter name may follow lora_A)
_WEIGHT = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")

@dataclass
class LoRAAdapter:
    """An adapter's weights on the CPU as one flat slot image (see slot_layout), ready to copy.

    The LoRA scaling is already folded into B. `modules` lists the (layer, module) pairs it targets.
    """

    name: str
    path: str
    rank: int
    image: torch.Tensor  # [layout.numel]
    modules: frozenset[ModuleKey]

    @property
    def num_bytes(self) -> int:
        return self.image.nbytes


def load_adapter(
    path: str | Path, name: str, layout: SlotLayout, dtype: torch.dtype, served_names: set[str], pin_memory: bool = False
) -> LoRAAdapter:
    """Read, check and scale an adapter; every refusal names the adapter, the reason and the fix."""
    path = Path(path)
    if not path.is_dir():
        raise LoRAAdapterNotFoundError(f"LoRA adapter {name!r}: {str(path)!r} is not a directory; give the path of a PEFT adapter directory")
    config = AdapterConfig.from_dir(path, name)
    _check_base_model(config, name, served_names)
    pairs = _read_pairs(path, name)
    image = torch.zeros(layout.numel, dtype=dtype, pin_memory=pin_memory)  # [numel]
    max_rank = layout.max_rank
    num_layers = 1 + max(layer for layer, _ in layout.modules)
    targeted: set[ModuleKey] = set()
    rank_seen = 0
    for (layer_index, module_name), (a, b) in sorted(pairs.items()):
        full_name = f"model.layers.{layer_index}.{module_name}"
        packed, slice_index = PACKED_MODULES.get(module_name, ("", 0))
        key = (layer_index, packed)
        if key not in layout.modules:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: it targets {full_name!r}, a module the served model does not have "
                f"(layers: {num_layers}; LoRA-capable modules: {', '.join(PACKED_MODULES)}); use an adapter trained for this model"
            )
        module = layout.modules[key]
        rank = a.shape[0] if a.dim() == 2 else -1
        out_rows = module.slice_offsets[slice_index + 1] - module.slice_offsets[slice_index]
        expected_a = (rank, module.a_shape[1])
        expected_b = (out_rows, rank)
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: weights of {full_name!r} have shapes A {tuple(a.shape)}, B {tuple(b.shape)} but "
                f"the served model needs A {expected_a}, B {expected_b}; the adapter was trained for a different base model"
            )
        if rank > max_rank:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: rank {rank} of {full_name!r} exceeds max_lora_rank={max_rank}; "
                f"start the engine with max_lora_rank >= {rank}"
            )
        configured_rank, _ = config.rank_and_alpha(full_name)
        if configured_rank != rank:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: {full_name!r} has rank {rank} in its weights but {configured_rank} in "
                "adapter_config.json (r / rank_pattern); the files do not belong together"
            )
        scaled_b = b.float() * config.scaling(full_name)  # [out, r]
        layout.write(image, key, slice_index, a, scaled_b)
        targeted.add(key)
        rank_seen = max(rank_seen, rank)
    if not targeted:
        raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: {str(path)!r} holds no LoRA weights for any layer of the served model")
    return LoRAAdapter(name, str(path), rank_seen, image, frozenset(targeted))


def _read_pairs(path: Path, name: str) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    tensors = _read_tensors(path, name)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _WEIGHT.match(key)
        if match is None:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a decoder layer's linear "
                "(embedding or lm_head LoRA is not supported); use an adapter that targets attention/MLP projections only"
            )
        halves.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    pairs = {}
    for key, half in halves.items():
        if set(half) != {"A", "B"}:
            missing = "B" if "A" in half else "A"
            raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: lora_{missing} is missing for layer {key[0]} {key[1]}; the weight file is incomplete")
        pairs[key] = (half["A"], half["B"])
    return pairs


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    safetensors_file = path / "adapter_model.safetensors"
    bin_file = path / "adapter_model.bin"
    try:
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_file), device="cpu")
        if bin_file.is_file():
            # weights_only: a .bin is a pickle, and nothing is ever unpickled freely
            return torch.load(str(bin_file), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file surfaces as many exception types
        raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: cannot read its weights in {str(path)!r} ({type(exc).__name__}: {exc})") from exc
    raise LoRAAdapterNotFoundError(
        f"LoRA adapter {name!r}: {str(path)!r} has no adapter_model.safetensors (or adapter_model.bin); save it with PEFT's save_pretrained"
    )


def _check_base_model(config: AdapterConfig, name: str, served_names: set[str]) -> None:
    base = config.base_model_name_or_path
    if not base or not served_names:
        return
    if short_model_name(base) not in {short_model_name(n) for n in served_names}:
        raise InvalidLoRAAdapterError(
            f"LoRA adapter {name!r}: it was trained for base model {base!r}, but this engine serves "
            f"{sorted(served_names)[0]!r}; use an adapter for the served model (or, if it is known to fit, "
            "correct base_model_name_or_path in its adapter_config.json)"
        )
