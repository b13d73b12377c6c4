"""loraplex: serve many LoRA adapters on one base language model.

The public names below are imported on first use, so `import loraplex.resolver` or
`import loraplex.plugins` (what a resolver package needs) stays light and does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import EngineArgs
    from .engine.async_engine import AsyncLLM, AsyncLLMEngine
    from .engine.llm_engine import LLMEngine
    from .llm import LLM
    from .lora.request import LoRARequest
    from .outputs import CompletionOutput, Logprob, RequestOutput
    from .sampling_params import RequestOutputKind, SamplingParams

_EXPORTS = {
    "LLM": ".llm",
    "EngineArgs": ".config",
    "LLMEngine": ".engine.llm_engine",
    "AsyncLLMEngine": ".engine.async_engine",
    "AsyncLLM": ".engine.async_engine",
    "LoRARequest": ".lora.request",
    "SamplingParams": ".sampling_params",
    "RequestOutputKind": ".sampling_params",
    "RequestOutput": ".outputs",
    "CompletionOutput": ".outputs",
    "Logprob": ".outputs",
}

__all__ = ["LLM", "EngineArgs", "LLMEngine", "AsyncLLMEngine", "AsyncLLM", "LoRARequest", "SamplingParams",
           "RequestOutputKind", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loraplex' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
