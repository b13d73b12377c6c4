"""LoRARequest: names the adapter a request should be served with (vLLM's class and fields)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequestError


@dataclass
class LoRARequest:
    """An adapter by name, unique integer id and path (a PEFT adapter directory).

    Two requests with the same `lora_name` name the same adapter (as in vLLM).
    `base_model_name`, when given, must be the model being served.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidRequestError(f"LoRARequest.lora_name must be a non-empty string; got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise InvalidRequestError(f"LoRARequest.lora_int_id must be an integer >= 1; got {self.lora_int_id!r}")
        self.lora_path = str(self.lora_path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
