"""LoRA shrink / expand over a batch of tokens, each carrying an adapter slot (-1 = none).

Modules, one concept each:

    mapping      LoRABatchMapping: the per-step grouping of tokens by slot, built once per forward
    validation   argument checks shared by every backend (ValueError naming the argument and fix)
    reference    the oracle: plain per-token torch
    torch_ops    torch formulations, the fastest one chosen per batch shape (any device, any dtype)
    native_cpu   the CPU path for float32: a C++ kernel built on first use (csrc/lora_cpu.cpp)
    decoder_cpu  the decoder's own small ops on CPU in float32 (GEMV, norms, rotary, SiLU, decode
                 attention over the paged cache): csrc/decoder_cpu.cpp, built the same way
    triton_ops   the GPU path: Triton kernels, decode form and segment form
    dispatch     the public operations and the backend choice

See docs/kernels.md for the contract, the layouts and measurements.
"""

from __future__ import annotations

from .dispatch import (
    BACKENDS,
    AppliedLoRA,
    Backend,
    bind_lora_apply,
    get_backend,
    lora_apply,
    lora_expand,
    lora_shrink,
    resolve_backend,
    set_backend,
    triton_available,
    use_backend,
)
from .mapping import LoRABatchMapping

__all__ = [
    "BACKENDS",
    "AppliedLoRA",
    "Backend",
    "bind_lora_apply",
    "LoRABatchMapping",
    "get_backend",
    "lora_apply",
    "lora_expand",
    "lora_shrink",
    "resolve_backend",
    "set_backend",
    "triton_available",
    "use_backend",
]
