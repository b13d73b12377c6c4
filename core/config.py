"""EngineArgs: every engine option, with vLLM's names, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


@dataclass
class EngineArgs:
    """Options of `LLM`, `LLMEngine.from_engine_args` and `loraplex serve`.

    model: a Hugging Face model directory or Hub repo id; None serves the embedded default.
    device: "auto" (cuda when present), "cpu" or "cuda". dtype: "auto" (float32 on CPU,
    bfloat16 on GPU) or a dtype name. kv_cache_memory_bytes: the KV block pool's size; None
    takes `VLLM_CPU_KVCACHE_SPACE` GiB (default 4) on CPU, `gpu_memory_utilization` of the GPU.
    enable_lora: serve LoRA adapters; max_loras adapters fit in device slots at once (so at most
    that many distinct adapters run in one step), max_cpu_loras stay cached on the CPU, and no
    adapter may have a rank above max_lora_rank. lora_dtype: the dtype adapters are stored and
    read in, "auto" (the model's) or a dtype name; "bfloat16" halves the bytes each LoRA step
    streams on a float32 model, at bfloat16's precision for the adapter weights.
    """

    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: as many as max_loras
    lora_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *_DTYPES):
            raise ConfigError(f"dtype must be 'auto' or one of {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {self.device!r}")
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("block_size", self.block_size)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.max_num_batched_tokens is not None:
            _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.kv_cache_memory_bytes is not None:
            _positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        _positive("max_loras", self.max_loras)
        _positive("max_lora_rank", self.max_lora_rank)
        if self.max_cpu_loras is not None:
            _positive("max_cpu_loras", self.max_cpu_loras)
            if self.max_cpu_loras < self.max_loras:
                raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.lora_dtype not in ("auto", *_DTYPES):
            raise ConfigError(f"lora_dtype must be 'auto' or one of {', '.join(_DTYPES)}; got {self.lora_dtype!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu' or install a CUDA build of torch")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]

    def lora_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.lora_dtype == "auto" else _DTYPES[self.lora_dtype]


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")
