"""loraplex: serve many LoRA adapters on one base language model."""

from .config import EngineArgs
from .engine.llm_engine import LLMEngine
from .llm import LLM
from .lora.request import LoRARequest
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "EngineArgs", "LLMEngine", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
