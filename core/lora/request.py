"""LoRARequest: names the adapter a request should be served with (vLLM's class and fields)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..errors import InvalidRequestError


@dataclass
class LoRARequest:
    """An adapter by name, integer id and path (a PEFT adapter directory), as vLLM spells it.

    Two requests with the same `lora_name` name the same adapter (as in vLLM). `base_model_name`,
    when given, must be the model being served. `load_inplace=True` asks `add_lora` to replace the
    weights of an adapter already added under this name (see loraplex.lora.catalog). How ids are
    given out, and what an id already held by another adapter means, is the catalog's rule.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_local_path: str | None = field(default=None, repr=False)  # vLLM's deprecated alias of lora_path
    base_model_name: str | None = None
    load_inplace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidRequestError(f"LoRARequest.lora_name must be a non-empty string; got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise InvalidRequestError(f"LoRARequest.lora_int_id must be an integer >= 1; got {self.lora_int_id!r}")
        if not isinstance(self.load_inplace, bool):
            raise InvalidRequestError(f"LoRARequest.load_inplace must be True or False; got {self.load_inplace!r}")
        if self.lora_local_path is not None:
            warnings.warn("LoRARequest's lora_local_path is deprecated; use lora_path", DeprecationWarning, stacklevel=3)
            if not self.lora_path:
                self.lora_path = self.lora_local_path
            self.lora_local_path = None
        self.lora_path = str(self.lora_path)

    # vLLM's properties
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def local_path(self) -> str:
        warnings.warn("LoRARequest.local_path is deprecated; use lora_path", DeprecationWarning, stacklevel=2)
        return self.lora_path

    @local_path.setter
    def local_path(self, value: str) -> None:
        warnings.warn("LoRARequest.local_path is deprecated; use lora_path", DeprecationWarning, stacklevel=2)
        self.lora_path = str(value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
