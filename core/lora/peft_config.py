"""Reading and vetting a PEFT adapter's adapter_config.json."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidLoRAAdapterError, LoRAAdapterNotFoundError


@dataclass
class AdapterConfig:
    """The parts of a PEFT LoRA config that decide how its weights are applied."""

    name: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    @classmethod
    def from_dir(cls, path: Path, name: str) -> "AdapterConfig":
        file = path / "adapter_config.json"
        if not file.is_file():
            raise LoRAAdapterNotFoundError(
                f"LoRA adapter {name!r}: {str(file)!r} does not exist; the adapter path must be a PEFT "
                "adapter directory (adapter_config.json + adapter_model.safetensors)"
            )
        try:
            raw = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: cannot read {str(file)!r}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: {str(file)!r} is not valid JSON ({exc}); re-save the adapter with PEFT's save_pretrained"
            ) from exc
        if not isinstance(raw, dict):
            raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: {str(file)!r} must hold a JSON object")
        _refuse_unsupported(raw, name)
        try:
            return cls(
                name=name,
                r=int(raw["r"]),
                lora_alpha=float(raw.get("lora_alpha", raw["r"])),
                use_rslora=bool(raw.get("use_rslora", False)),
                rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
                base_model_name_or_path=raw.get("base_model_name_or_path") or None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: adapter_config.json has a missing or malformed field ({exc!r})") from exc

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """PEFT's per-module rank and alpha: the first pattern key matching the module's name suffix."""
        rank = self.r
        for key, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                rank = value
                break
        alpha = self.lora_alpha
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                alpha = value
                break
        return rank, alpha

    def scaling(self, module_name: str) -> float:
        rank, alpha = self.rank_and_alpha(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _refuse_unsupported(raw: dict, name: str) -> None:
    """Refuse what loraplex cannot apply exactly, rather than serving something subtly wrong."""
    def refuse(reason: str, fix: str) -> None:
        raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: {reason}; {fix}")

    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        refuse(f"peft_type is {peft_type!r}, only LORA adapters are served", "convert or retrain it as a LoRA adapter")
    if raw.get("use_dora"):
        refuse("it is a DoRA adapter (use_dora=true), which is not supported", "retrain without DoRA or merge it into the base model")
    if raw.get("bias", "none") not in ("none", None):
        refuse(f"it trains biases (bias={raw.get('bias')!r}), which is not supported", "retrain with bias='none'")
    if raw.get("lora_bias"):
        refuse("it has LoRA biases (lora_bias=true), which are not supported", "retrain with lora_bias=False")
    if raw.get("modules_to_save"):
        refuse(
            f"it replaces whole modules (modules_to_save={raw['modules_to_save']!r}), which cannot be shared across a batch",
            "retrain without modules_to_save or merge the adapter into a separate model",
        )
    if raw.get("fan_in_fan_out"):
        refuse("fan_in_fan_out=true is for Conv1D models, not this model's linears", "re-save it for a Llama-family model")
    if raw.get("alora_invocation_tokens"):
        refuse(
            "it is an activated LoRA (alora_invocation_tokens), which applies only after its invocation tokens; "
            "that is not supported",
            "retrain it as a plain LoRA adapter",
        )
    for unsupported in ("layer_replication", "trainable_token_indices", "arrow_config", "use_bdlora"):
        if raw.get(unsupported):
            refuse(f"it uses {unsupported}, which is not supported", f"retrain without {unsupported}")
