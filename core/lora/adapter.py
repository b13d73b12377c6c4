"""Loading a PEFT LoRA adapter from disk into CPU tensors shaped for the served model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import InvalidLoRAAdapterError, LoRAAdapterNotFoundError, LoRAError
from ..models.llama import LORA_WRAPPED, LoRATarget, decoder_lora_capable, decoder_lora_target
from .adapter_dir import WEIGHT_FILES, short_model_name
from .fingerprint import Fingerprint, describe_change, stamp_file
from .peft_config import AdapterConfig, read_adapter_config, shown
from .slot_layout import ModuleKey, SlotLayout

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (an adapter name may follow lora_A)
_WEIGHT = re.compile(r"^(?:base_model\.model\.)?([\w.]+?)\.lora_([AB])(?:\.[\w-]+)?\.weight$")

Named = tuple[str, torch.Tensor]  # (key in the weight file, tensor)


class LoRATargets(Protocol):
    """What a served model tells the loader: which of its linears a PEFT module name means."""

    def lora_target(self, module: str) -> LoRATarget | None: ...
    def lora_capable(self) -> str: ...


class _DecoderTargets:
    """The text decoders' naming, for a layout of their LoRA-capable linears."""

    def __init__(self, layout: SlotLayout) -> None:
        self.num_layers = 1 + max(layer for layer, name in layout.modules if name in LORA_WRAPPED)

    def lora_target(self, module: str) -> LoRATarget | None:
        return decoder_lora_target(module, self.num_layers)

    def lora_capable(self) -> str:
        return decoder_lora_capable(self.num_layers)


@dataclass
class LoRAAdapter:
    """An adapter's weights on the CPU as one flat slot image (see slot_layout), ready to copy.

    The LoRA scaling is already folded into B. `modules` lists the (layer, module) pairs it targets.
    `fingerprint` describes the files the weights were read from (see fingerprint).
    """

    name: str
    path: str
    rank: int
    image: torch.Tensor  # [layout.numel]
    modules: frozenset[ModuleKey]
    fingerprint: Fingerprint

    @property
    def num_bytes(self) -> int:
        return self.image.nbytes


def load_adapter(
    path: str | Path, name: str, layout: SlotLayout, dtype: torch.dtype, served_names: set[str], pin_memory: bool = False,
    expected: Fingerprint | None = None, model: LoRATargets | None = None,
) -> LoRAAdapter:
    """Read, check and scale an adapter; every refusal names the adapter, the reason and the fix.

    `model` maps PEFT module names onto the layout's linears (default: a text decoder's names).
    With `expected` (the fingerprint of an earlier load), files whose content changed since are
    refused before they are parsed: the adapter's name must keep meaning the same weights.
    """
    path = Path(path)
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise LoRAAdapterNotFoundError(f"LoRA adapter {name!r}: its path {shown(str(path), 200)} cannot be used ({exc.strerror})") from exc
    if not is_dir:
        raise LoRAAdapterNotFoundError(f"LoRA adapter {name!r}: {shown(str(path), 200)} is not a directory; give the path of a PEFT adapter directory")
    raw_config, config_stamp = read_adapter_config(path, name)
    weight_file = _weight_file(path, name)
    try:
        fingerprint = (config_stamp, stamp_file(weight_file))
    except OSError as exc:
        raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: cannot read {str(weight_file)!r} ({exc})") from exc
    if expected is not None and (change := describe_change(expected, fingerprint)) is not None:
        raise LoRAError(
            f"LoRA adapter {name!r}: its files in {str(path)!r} changed since it was registered ({change}), and "
            "loading them now would serve other weights under the same name; to serve the new files, reload the "
            "adapter in place (/v1/load_lora_adapter with load_inplace=true) or remove it and add it again"
        )
    config = AdapterConfig.from_json(raw_config, name)
    _check_base_model(config, name, served_names)
    pairs = _read_pairs(weight_file, name)
    targets = model if model is not None else _DecoderTargets(layout)
    where: dict[str, LoRATarget] = {}
    for module_name in pairs:  # first, so that the patterns are matched against real modules only
        target = targets.lora_target(module_name)
        if target is None or target[0] not in layout.modules:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: it targets {module_name!r}, a module the served model does not have or cannot "
                f"serve with LoRA (LoRA-capable: {targets.lora_capable()}; embedding or lm_head LoRA is not supported); "
                "use an adapter trained for this model, whose target_modules name only those linears"
            )
        where[module_name] = target
    module_params = config.ranks_and_alphas(list(pairs))
    image = torch.zeros(layout.numel, dtype=dtype, pin_memory=pin_memory)  # [numel]
    max_rank = layout.max_rank
    targeted: set[ModuleKey] = set()
    rank_seen = 0
    for full_name, ((a_key, a), (b_key, b)) in sorted(pairs.items()):
        key, slice_index = where[full_name]
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
        configured_rank, alpha = module_params[full_name]
        if configured_rank != rank:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: {full_name!r} has rank {rank} in its weights but {configured_rank} in "
                "adapter_config.json (r / rank_pattern); the files do not belong together"
            )
        scaling = config.scaling(rank, alpha)
        scaled_b = b.float() * scaling  # [out, r]
        written_a, written_b = layout.write(image, key, slice_index, a, scaled_b)
        # NaN / Inf in one adapter would poison every token of its requests. A finite sum proves
        # every element finite (one NaN or Inf makes it NaN or Inf), at a tenth of the cost of
        # isfinite().all(), on the values as stored (written_a is contiguous; float32 storage holds
        # exactly the contiguous scaled_b). A sum that overflows alone is told apart by _non_finite.
        checked = (written_a, scaled_b if dtype == torch.float32 else written_b)
        if not all(torch.isfinite(t.sum()) for t in checked):
            problem = _non_finite(a_key, a, b_key, b, scaling, alpha, rank, written_a, written_b)
            if problem is not None:
                raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: {problem}")
        targeted.add(key)
        rank_seen = max(rank_seen, rank)
    if not targeted:
        raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: {str(path)!r} holds no LoRA weights for any layer of the served model")
    return LoRAAdapter(name, str(path), rank_seen, image, frozenset(targeted), fingerprint)


def _non_finite(a_key: str, a: torch.Tensor, b_key: str, b: torch.Tensor, scaling: float, alpha: float, rank: int,
                written_a: torch.Tensor, written_b: torch.Tensor) -> str | None:
    """Why a pair's stored values are not all finite, or None if they are (only a sum overflowed)."""
    if torch.isfinite(written_a).all() and torch.isfinite(written_b).all():
        return None
    for key, tensor in ((a_key, a), (b_key, b)):
        if not torch.isfinite(tensor).all():
            return f"tensor {key!r} holds NaN or Inf values; the adapter is broken, retrain or re-export it"
    if not torch.isfinite(b.float() * scaling).all():
        return (f"tensor {b_key!r} overflows to Inf once multiplied by its LoRA scaling {scaling:g} "
                f"(lora_alpha={alpha:g}, r={rank}); correct lora_alpha / alpha_pattern in adapter_config.json")
    return (f"tensor {a_key!r} or {b_key!r} (scaled by {scaling:g}) holds values beyond the range of {written_a.dtype}, "
            "the dtype adapters are stored in; serve it with a wider lora_dtype (e.g. float32)")


def _weight_file(path: Path, name: str) -> Path:
    for file_name in WEIGHT_FILES:
        file = path / file_name
        try:
            if file.is_file():
                return file
        except OSError as exc:
            raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: cannot use {str(file)!r} ({exc.strerror})") from exc
    raise LoRAAdapterNotFoundError(
        f"LoRA adapter {name!r}: {str(path)!r} has no adapter_model.safetensors (or adapter_model.bin); save it with PEFT's save_pretrained"
    )


def _read_pairs(weight_file: Path, name: str) -> dict[str, tuple[Named, Named]]:
    """module name (`model.layers.3.self_attn.q_proj`) -> ((A's key, A [r, in]), (B's key, B [out, r])), every tensor a floating-point one."""
    tensors = _read_tensors(weight_file, name)
    halves: dict[str, dict[str, Named]] = {}
    for key, tensor in tensors.items():
        match = _WEIGHT.match(key) if isinstance(key, str) else None
        if match is None:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: tensor {shown(key)} is not a LoRA A/B weight of a linear layer "
                "(embedding or lm_head LoRA is not supported); use an adapter that targets linear projections only"
            )
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or not tensor.is_floating_point():
            kind = f"a {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: {key!r} is {kind}, not a dense floating-point tensor; re-export the adapter with PEFT"
            )
        halves.setdefault(match.group(1), {})[match.group(2)] = (key, tensor)
    pairs = {}
    for key, half in halves.items():
        if set(half) != {"A", "B"}:
            missing = "B" if "A" in half else "A"
            raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: lora_{missing} is missing for {key}; the weight file is incomplete")
        pairs[key] = (half["A"], half["B"])
    return pairs


def _read_tensors(weight_file: Path, name: str) -> dict:
    try:
        if weight_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(weight_file), device="cpu")
        else:
            # weights_only: a .bin is a pickle, and nothing is ever unpickled freely
            tensors = torch.load(str(weight_file), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file surfaces as many exception types
        raise InvalidLoRAAdapterError(
            f"LoRA adapter {name!r}: cannot read its weights in {str(weight_file.parent)!r} ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(tensors, dict):
        raise InvalidLoRAAdapterError(
            f"LoRA adapter {name!r}: {str(weight_file)!r} holds a {type(tensors).__name__}, not a mapping of tensor names "
            "to tensors; save the adapter with PEFT's save_pretrained"
        )
    return tensors


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
