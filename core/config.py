"""EngineArgs: every engine option, with vLLM's names, validated at construction."""

from __future__ import annotations

import json
import numbers
import os
import re
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .vllm_compat import VllmCompatArgs, check_vllm_args

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

# vLLM offers ranks up to 512. At rank r an adapter of a d x d layer holds 2*d*r weights, as
# many as the layer itself once r = d/2: past 1024 (half of the smallest hidden sizes served)
# LoRA saves nothing, while every device slot is sized for max_lora_rank up front.
MAX_LORA_RANK = 1024
# Each device slot holds a whole rank-max_lora_rank adapter for every wrapped module, allocated
# at start-up; 1024 of them is far past any real deployment (vLLM's docs use 1 to 32).
MAX_LORAS = 1024
# What torch.Generator.manual_seed accepts: a signed or unsigned 64-bit integer.
_SEED_MIN, _SEED_END = -(2**63), 2**64


@dataclass
class EngineArgs(VllmCompatArgs):
    """Options of `LLM`, `LLMEngine.from_engine_args` and `loraplex serve`.

    model: a Hugging Face model directory or Hub repo id; None serves the embedded default.
    device: "auto" (cuda when present), "cpu", "cuda" or "cuda:N". dtype: "auto" (float32 on CPU,
    bfloat16 on GPU) or a dtype name. seed: the engine's sampling seed, an integer
    torch.Generator accepts ([-2**63, 2**64)). kv_cache_memory_bytes: the KV block pool's size;
    None takes `VLLM_CPU_KVCACHE_SPACE` GiB on CPU (default 4 GiB, or half the memory available
    when that is less), `gpu_memory_utilization` (in (0, 1]) of the GPU. A budget that does not
    fit in the memory available is refused when the engine starts. enable_lora: serve LoRA
    adapters; max_loras adapters fit in device slots at once (so at most that many distinct
    adapters run in one step; at most max_num_seqs, since a step never runs more sequences, and
    at most MAX_LORAS = 1024), max_cpu_loras stay cached on the CPU, and no adapter may have a
    rank above max_lora_rank (at most MAX_LORA_RANK = 1024: beyond that LoRA is no smaller than
    the layer it adapts). lora_dtype: the dtype adapters are stored and read in, "auto" (the
    model's) or a dtype name; "bfloat16" halves the bytes each LoRA step streams on a float32
    model, at bfloat16's precision for the adapter weights.

    enable_prefix_caching (on, as in vLLM): full KV blocks are shared between requests with the
    same prefix and the same weights (base model, or one adapter at one version); a prompt then
    computes only the tokens after its cached prefix. enable_chunked_prefill (on, as in vLLM's
    V1 engine): a prompt longer than what is left of the step's max_num_batched_tokens is
    prefilled in chunks over several steps while running requests keep decoding, so one long
    prompt no longer stalls every stream; max_num_batched_tokens may then be below
    max_model_len. Off, a prompt is prefilled in one step or waits.

    Multi-modal models (LLaVA): limit_mm_per_prompt caps the items of each modality one prompt
    may carry ({"image": N}; default 999 each, as vLLM). default_mm_loras maps a modality to an
    adapter path that is applied to every request carrying that modality and naming no adapter
    of its own (vLLM's rules; see docs/multimodal.md); it needs enable_lora. The server reads
    image URLs of chat messages: `data:` URLs always, `file://` URLs under
    allowed_local_media_path only, http(s) URLs only from the hosts in allowed_media_domains.
    Both dict options may also be given as JSON strings (the command line's form).

    Every field is checked for its type and range (integers are ints, not bools or floats;
    flags are bools); a bad one raises ConfigError naming it.

    vLLM's other engine arguments (enforce_eager, tensor_parallel_size, quantization, ...) are
    keyword-only fields from VllmCompatArgs: see loraplex.vllm_compat for what each does.
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
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    limit_mm_per_prompt: dict[str, int] | None = None
    default_mm_loras: dict[str, str] | None = None
    allowed_local_media_path: str = ""
    allowed_media_domains: list[str] | None = None

    def __post_init__(self) -> None:
        self.model = _path_name("model", self.model)
        self.tokenizer = _path_name("tokenizer", self.tokenizer)
        if self.served_model_name is not None and (not isinstance(self.served_model_name, str) or not self.served_model_name):
            raise ConfigError(f"served_model_name must be None or a non-empty string; got {self.served_model_name!r}")
        self.dtype = _dtype_name("dtype", self.dtype)
        self.lora_dtype = _dtype_name("lora_dtype", self.lora_dtype)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]' (N a GPU index, e.g. 'cuda:0'); "
                              f"got {self.device!r}")
        self.seed = _integer("seed", self.seed, _SEED_MIN, _SEED_END - 1, "an integer in [-2**63, 2**64)")
        self.max_num_seqs = _positive("max_num_seqs", self.max_num_seqs)
        self.block_size = _positive("block_size", self.block_size)
        self.max_model_len = _positive("max_model_len", self.max_model_len, optional=True)
        self.max_num_batched_tokens = _positive("max_num_batched_tokens", self.max_num_batched_tokens, optional=True)
        self.kv_cache_memory_bytes = _positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes, optional=True)
        if not isinstance(self.gpu_memory_utilization, numbers.Real) or isinstance(self.gpu_memory_utilization, bool) \
                or not 0.0 < self.gpu_memory_utilization <= 1.0:  # NaN fails the comparison too
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1] (a fraction of the GPU's memory); got {self.gpu_memory_utilization!r}")
        self.gpu_memory_utilization = float(self.gpu_memory_utilization)
        for flag in ("enable_lora", "enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be True or False; got {getattr(self, flag)!r}")
        self.max_lora_rank = _integer("max_lora_rank", self.max_lora_rank, 1, MAX_LORA_RANK,
                                      f"an integer in [1, {MAX_LORA_RANK}] (vLLM offers up to 512; above "
                                      f"{MAX_LORA_RANK} an adapter is no smaller than the layer it adapts)")
        self.max_loras = _integer("max_loras", self.max_loras, 1, MAX_LORAS, f"an integer in [1, {MAX_LORAS}]")
        if self.max_loras > self.max_num_seqs:
            raise ConfigError(
                f"max_loras ({self.max_loras}) is more than max_num_seqs ({self.max_num_seqs}): a step runs at most "
                "max_num_seqs sequences, so the extra device slots could never be used; lower max_loras (max_cpu_loras "
                "caches more adapters on the CPU) or raise max_num_seqs"
            )
        self.max_cpu_loras = _positive("max_cpu_loras", self.max_cpu_loras, optional=True)
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        self._check_multimodal()
        check_vllm_args(self)

    def _check_multimodal(self) -> None:
        self.limit_mm_per_prompt = _modality_map("limit_mm_per_prompt", self.limit_mm_per_prompt, "a number of items",
                                                 lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
        self.default_mm_loras = _modality_map("default_mm_loras", self.default_mm_loras, "an adapter path",
                                              lambda v: isinstance(v, str) and bool(v.strip()))
        if self.default_mm_loras and not self.enable_lora:
            raise ConfigError("default_mm_loras needs LoRA: set enable_lora=True (--enable-lora), or leave "
                              "default_mm_loras unset")
        if not isinstance(self.allowed_local_media_path, str):
            raise ConfigError(f"allowed_local_media_path must be a directory path (a string); got {self.allowed_local_media_path!r}")
        domains = self.allowed_media_domains
        if domains is not None and (not isinstance(domains, (list, tuple)) or not all(isinstance(d, str) and d for d in domains)):
            raise ConfigError(f"allowed_media_domains must be None or a list of host names; got {domains!r}")
        self.allowed_media_domains = None if domains is None else [d.strip().lower() for d in domains]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} was asked for but torch sees no CUDA GPU; use device='cpu' or "
                              "install a CUDA build of torch")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={self.device!r} names GPU {device.index}, but torch sees "
                              f"{torch.cuda.device_count()} GPU(s); use an index below that, or 'cuda'")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]

    def lora_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.lora_dtype == "auto" else _DTYPES[self.lora_dtype]


def _integer(name: str, value: object, low: int, high: int | None, allowed: str) -> int:
    """`value` as an int in [low, high] (high None: no upper bound); bools and floats are refused."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not (
            low <= value and (high is None or value <= high)):
        raise ConfigError(f"{name} must be {allowed}; got {value!r}")
    return int(value)


def _positive(name: str, value: object, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    return _integer(name, value, 1, None, "a positive integer or None" if optional else "a positive integer")


def _path_name(name: str, value: object) -> str | None:
    """A model or tokenizer given as None, a non-empty string or a path object; a string."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be None, a model directory or a Hub repo id (a non-empty string); got {value!r}")
    return value


_MODALITIES = ("image",)


def _modality_map(name: str, value: object, kind: str, valid) -> dict | None:
    """A {modality: value} option, given as a dict or a JSON object string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name} must be a JSON object such as '{{\"image\": ...}}'; {value!r} is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must map modalities to {kind}s, e.g. {{'image': ...}}; got {value!r}")
    for modality, item in value.items():
        if modality not in _MODALITIES:
            raise ConfigError(f"{name} names modality {modality!r}; loraplex's multi-modal models take "
                              f"{', '.join(_MODALITIES)}")
        if not valid(item):
            raise ConfigError(f"{name}[{modality!r}] must be {kind}; got {item!r}")
    return dict(value)


def _dtype_name(name: str, value: object) -> str:
    if not isinstance(value, str) or value not in ("auto", *_DTYPES):
        raise ConfigError(f"{name} must be 'auto' or one of {', '.join(_DTYPES)}; got {value!r}")
    return value
