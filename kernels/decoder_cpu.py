"""The decoder's small operations as native CPU kernels (`csrc/decoder_cpu.cpp`) for fp32 tensors.

RMSNorm (optionally adding the residual first, in place), rotary embedding in place,
SiLU-and-multiply and decode attention over the paged KV cache: each one ctypes call where the
torch formulation dispatches several operations (see the source for why that matters at batch 1).
Built and cached like the LoRA kernel (`native_cpu.build_library`); `LORAPLEX_CPU_KERNEL=0` or a
missing compiler leaves `available()` False and the model on its torch path.

Callers pass float32 CPU tensors whose last dimension is contiguous (`usable` says whether a
tensor qualifies); the functions check shapes only where a wrong one would read out of bounds.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .native_cpu import load_library

__all__ = ["available", "usable", "linear", "rms_norm", "rotary_", "silu_and_mul", "decode_attention",
           "LinearDesc", "LoRADesc", "LayerDesc", "ModelDesc", "LINEAR_KINDS", "decode_step"]

SOURCE = Path(__file__).with_name("csrc") / "decoder_cpu.cpp"
_I64, _PTR, _F32, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int


class LinearDesc(ctypes.Structure):
    """`LinearDesc` of csrc/decoder_cpu.cpp: a weight [n, k] of `kind` (`LINEAR_KINDS`) and its bias."""

    _fields_ = [("kind", _I64), ("weight", _PTR), ("bias", _PTR), ("n", _I64), ("k", _I64)]


LINEAR_KINDS = {"float32": 0, "q4_1": 1, "q8_0": 2}  # float32 rows, or quant_cpu's repacked GGUF blocks


class LoRADesc(ctypes.Structure):
    """`LoRADesc`: a projection's LoRA slots (slot 0's A and B^T, the elements from one slot to the
    next, slices, rank, 0 = float32 / 1 = bfloat16, each slice's first output row); all zero: none."""

    _fields_ = [("a", _PTR), ("b", _PTR), ("slot_stride", _I64), ("n_slices", _I64), ("rank", _I64),
                ("dtype", _I64), ("offsets", _PTR)]


class LayerDesc(ctypes.Structure):
    """`LayerDesc`: one decoder layer's norms, projections, their LoRA slots, KV cache and sliding window."""

    _fields_ = [("input_norm", _PTR), ("post_norm", _PTR), ("qkv", LinearDesc), ("o", LinearDesc),
                ("gate_up", LinearDesc), ("down", LinearDesc), ("qkv_lora", LoRADesc), ("o_lora", LoRADesc),
                ("gate_up_lora", LoRADesc), ("down_lora", LoRADesc), ("k_cache", _PTR), ("v_cache", _PTR),
                ("window", _I64)]


class ModelDesc(ctypes.Structure):
    """`ModelDesc`: the decoder's shape, its layers, the final norm and the LM head."""

    _fields_ = [("layers", ctypes.POINTER(LayerDesc)), ("num_layers", _I64), ("hidden", _I64), ("q_heads", _I64),
                ("kv_heads", _I64), ("head_dim", _I64), ("inner", _I64), ("eps", _F32), ("scale", _F32),
                ("final_norm", _PTR), ("lm_head", LinearDesc)]

_SIGNATURES = {
    "loraplex_gemv": [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64, _INT],
    "loraplex_rms_norm": [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _F32, _INT],
    "loraplex_rotary": [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _INT],
    "loraplex_silu_and_mul": [_PTR, _I64, _PTR, _I64, _I64, _I64, _INT],
    "loraplex_decode_attention": [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _I64,
                                  _F32, _PTR, _I64, _INT],
    "loraplex_decode_step": [ctypes.POINTER(ModelDesc), _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _PTR,
                             _PTR, _INT],
}


def available() -> bool:
    """True when the kernels are built (or build now) and load."""
    return _library() is not None


def usable(x: torch.Tensor) -> bool:
    """Whether `x` can go through these kernels: fp32 on the CPU, unit stride along its last
    dimension, and the kernels available."""
    return x.dtype is torch.float32 and x.device.type == "cpu" and x.stride(-1) == 1 and available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` for x [T, in] and a contiguous weight [out, in], each weight row read
    once for every 4 tokens: what a decode step of few tokens wants. Returns a new [T, out] tensor."""
    t, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or not weight.is_contiguous() or weight.dtype is not torch.float32:
        raise ValueError(f"linear takes x [T, {weight.shape[1]}] and a contiguous float32 weight; got x "
                         f"{tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)} strides {weight.stride()}")
    out = torch.empty(t, n, dtype=x.dtype)  # [T, out]
    _library().loraplex_gemv(weight.data_ptr(), n, k, bias.data_ptr() if bias is not None else None, x.data_ptr(),
                             x.stride(0), t, out.data_ptr(), n, torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of `x` [T, H]; with `residual` [T, H], first `residual += x` (in place) and the sum
    is normalised. Returns a new [T, H] tensor."""
    out = torch.empty(x.shape, dtype=x.dtype)  # [T, H]
    rows, n = x.shape
    res_ptr, res_stride = (residual.data_ptr(), residual.stride(0)) if residual is not None else (None, 0)
    _library().loraplex_rms_norm(x.data_ptr(), x.stride(0), res_ptr, res_stride, weight.data_ptr(), out.data_ptr(),
                                 n, rows, n, eps, torch.get_num_threads())
    return out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox rotary embedding in place on `x` [T, H, D] (heads contiguous); cos, sin [T, 1, D]
    contiguous, the step's rows of the tables. Returns `x`."""
    t, h, d = x.shape
    if x.stride(1) != d or cos.shape != (t, 1, d) or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError(f"rotary_ takes x [T, H, D] with contiguous heads and cos/sin [T, 1, D]; got "
                         f"{tuple(x.shape)} strides {x.stride()} and {tuple(cos.shape)}")
    _library().loraplex_rotary(x.data_ptr(), x.stride(0), t, h, d, cos.data_ptr(), sin.data_ptr(),
                               torch.get_num_threads())
    return x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of `gate_up` [T, 2I] (gate first). Returns a new [T, I] tensor."""
    t, width = gate_up.shape
    out = torch.empty(t, width // 2, dtype=gate_up.dtype)  # [T, I]
    _library().loraplex_silu_and_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0), t,
                                     width // 2, torch.get_num_threads())
    return out


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D], heads contiguous
    k_cache: torch.Tensor,  # [num_slots, Hkv, D] contiguous
    v_cache: torch.Tensor,  # [num_slots, Hkv, D] contiguous
    block_tables: torch.Tensor,  # [B, nb] int64: each sequence's blocks, covering its context
    context_lens: torch.Tensor,  # [B] int64: keys at positions < context_lens[b] are attended to
    block_size: int,
    window: int | None,  # sliding window: only the last `window` keys; None for all
    scale: float,
    out: torch.Tensor,  # [B, Hq, D], heads contiguous: written
) -> torch.Tensor:
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    if (block_tables.dtype is not torch.int64 or context_lens.dtype is not torch.int64 or block_tables.shape[0] != b
            or context_lens.shape != (b,) or block_tables.stride(1) != 1 or not context_lens.is_contiguous()):
        raise ValueError(f"decode_attention takes int64 block_tables [{b}, nb] (unit stride) and context_lens "
                         f"[{b}]; got {block_tables.dtype} {tuple(block_tables.shape)} and {context_lens.dtype} "
                         f"{tuple(context_lens.shape)}")
    _library().loraplex_decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        block_tables.stride(0), context_lens.data_ptr(), block_size, b, hq, hkv, d, window or 0, scale,
        out.data_ptr(), out.stride(0), torch.get_num_threads(),
    )
    return out


def decode_step(
    model: ModelDesc,
    residual: torch.Tensor,  # [T, H] the tokens' embeddings, contiguous: overwritten
    cos: torch.Tensor,  # [T, D] contiguous: the tokens' rotary rows
    sin: torch.Tensor,  # [T, D]
    slots: torch.Tensor,  # [T] int64: where each token's K/V is written
    block_tables: torch.Tensor,  # [T, nb] int64, unit stride: each sequence's blocks
    context_lens: torch.Tensor,  # [T] int64: its context, the new token included
    block_size: int,
    lora_slots: torch.Tensor | None,  # [T] int64: each token's LoRA slot (-1: none); None: no token has one
    logits: torch.Tensor,  # [T, V] contiguous: written
) -> torch.Tensor:
    """Every decoder layer (with its LoRA deltas), the final norm and the LM head for `T`
    single-token decodes in one call (`ModelDesc` holds the pointers; the caller keeps the tensors
    behind them alive)."""
    t = residual.shape[0]
    if lora_slots is not None and (lora_slots.dtype is not torch.int64 or lora_slots.shape != (t,)
                                   or not lora_slots.is_contiguous()):
        raise ValueError(f"decode_step takes lora_slots as contiguous int64 [{t}]; got {lora_slots.dtype} "
                         f"{tuple(lora_slots.shape)}")
    tensors = (residual, cos, sin, slots, context_lens, logits)
    if (any(not x.is_contiguous() for x in tensors) or block_tables.stride(1) != 1 or slots.dtype is not torch.int64
            or block_tables.dtype is not torch.int64 or context_lens.dtype is not torch.int64
            or block_tables.shape[0] != t or context_lens.shape != (t,) or slots.shape != (t,)):
        raise ValueError("decode_step takes contiguous [T, ...] tensors and int64 slots, block_tables and context_lens "
                         f"for T = {t}; got slots {slots.dtype} {tuple(slots.shape)}, block_tables "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}, context_lens {tuple(context_lens.shape)}")
    _library().loraplex_decode_step(
        ctypes.byref(model), t, residual.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(), block_size,
        lora_slots.data_ptr() if lora_slots is not None else None, logits.data_ptr(), torch.get_num_threads(),
    )
    return logits


@functools.cache
def _library() -> ctypes.CDLL | None:
    signatures = {name: (argtypes, None) for name, argtypes in _SIGNATURES.items()}
    return load_library(SOURCE, signatures, "The native CPU decoder kernels are",
                        "the model uses torch operations")[0]
