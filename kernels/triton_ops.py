"""Triton shrink and expand kernels: the GPU path.

Each operation has two forms, both covering every slice in one launch:

- decode form: one program per (active token, slice, tile); the program gathers A or B by
  the token's slot. Best when most slots serve one or two tokens (decode with many adapters).
- segment form: tokens grouped by slot (`LoRABatchMapping.segment_tiles`); one program per
  (tile of up to BLOCK_M tokens of one slot, slice, tile of the other dimension), so a slot's
  weights are read once per tile instead of once per token, and the product runs on tensor
  cores (`tl.dot`). Best for prefill and for decode batches where adapters are shared.

`choose_form` picks between them from the mapping. Math is fp32 (fp32 `tl.dot` in IEEE
precision, not TF32); results are rounded once when stored. Block sizes are fixed by shape (no
autotuning), valid for `tl.dot` (every dot dimension >= 16) and for the interpreter
(`TRITON_INTERPRET=1`, which runs these kernels on CPU tensors for tests).

Arguments are assumed checked (see `loraplex.kernels.validation`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .mapping import LoRABatchMapping

__all__ = ["shrink", "expand", "choose_form", "INTERPRETED", "SEGMENT_FORM_MIN_MEAN_TOKENS"]

# Tokens per slot (on average) from which the segment form is used. A guess until measured on
# a GPU: at 4 tokens the decode form reads each slot's weights 4 times (from L2 at best) while
# the segment form reads them once; benchmarks/bench_kernels.py prints both forms to tune it.
SEGMENT_FORM_MIN_MEAN_TOKENS = 4.0


@triton.jit
def _shrink_decode_kernel(
    x_ptr, a_ptr, y_ptr, token_ids_ptr, token_slots_ptr,
    K, R, K_PER_SPLIT,
    stride_xm, stride_as, stride_ar, stride_ym, stride_ysplit,
    R_TILES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (active tokens, n_slices * R_TILES, split_k)
    token = tl.load(token_ids_ptr + tl.program_id(0)).to(tl.int64)
    slot = tl.load(token_slots_ptr + token).to(tl.int64)
    slice_id = tl.program_id(1) // R_TILES
    offs_r = (tl.program_id(1) % R_TILES) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    r_mask = offs_r < R
    rows = slice_id * R + offs_r  # [BLOCK_R] rows of A (and columns of y)
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    x_row = x_ptr + token * stride_xm
    a_tile = a_ptr + slot * stride_as + rows[:, None] * stride_ar  # [BLOCK_R, 1]
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_mask = offs_k < k_end
        xv = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
        av = tl.load(a_tile + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)  # [BLOCK_R]
    y_row = y_ptr + tl.program_id(2) * stride_ysplit + token * stride_ym
    tl.store(y_row + rows, acc.to(y_ptr.dtype.element_ty), mask=r_mask)


@triton.jit
def _shrink_segment_kernel(
    x_ptr, a_ptr, y_ptr, token_ids_ptr, tiles_ptr,
    K, R,
    stride_xm, stride_as, stride_ar, stride_ym,
    R_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid: (tiles, n_slices * R_TILES); a tile is (slot, start, end) in sorted token order
    slot = tl.load(tiles_ptr + tl.program_id(0) * 3).to(tl.int64)
    start = tl.load(tiles_ptr + tl.program_id(0) * 3 + 1)
    end = tl.load(tiles_ptr + tl.program_id(0) * 3 + 2)
    offs_m = start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_mask = offs_m < end
    tokens = tl.load(token_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)  # [BLOCK_M]
    slice_id = tl.program_id(1) // R_TILES
    offs_r = (tl.program_id(1) % R_TILES) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    r_mask = offs_r < R
    rows = slice_id * R + offs_r  # [BLOCK_R]
    x_tile = x_ptr + tokens[:, None] * stride_xm  # [BLOCK_M, 1]
    a_tile = a_ptr + slot * stride_as + rows[None, :] * stride_ar  # [1, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_mask = offs_k < K
        xv = tl.load(x_tile + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        av = tl.load(a_tile + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        av = av.to(xv.dtype)  # weights stored in another dtype (lora_dtype): the dot runs in x's
        if UPCAST:
            xv, av = xv.to(tl.float32), av.to(tl.float32)
        acc += tl.dot(xv, av, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_R]
    y_tile = y_ptr + tokens[:, None] * stride_ym + rows[None, :]
    tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_decode_kernel(
    y_ptr, b_ptr, out_ptr, token_ids_ptr, token_slots_ptr, offsets_ptr,
    R, N_TILES,
    stride_ym, stride_bs, stride_bn, stride_br, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # grid: (active tokens, n_slices * N_TILES); N_TILES covers the widest slice
    token = tl.load(token_ids_ptr + tl.program_id(0)).to(tl.int64)
    slot = tl.load(token_slots_ptr + token).to(tl.int64)
    slice_id = tl.program_id(1) // N_TILES
    lo = tl.load(offsets_ptr + slice_id)
    hi = tl.load(offsets_ptr + slice_id + 1)
    offs_n = lo + (tl.program_id(1) % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = offs_n < hi  # all false past a narrow slice's end: no memory traffic
    y_row = y_ptr + token * stride_ym + slice_id * R
    b_tile = b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        r_mask = offs_r < R
        yv = tl.load(y_row + offs_r, mask=r_mask, other=0.0).to(tl.float32)  # [BLOCK_R]
        bv = tl.load(b_tile + offs_r[None, :] * stride_br, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        acc += tl.sum(bv.to(tl.float32) * yv[None, :], axis=1)  # [BLOCK_N]
    out_row = out_ptr + token * stride_om + offs_n
    old = tl.load(out_row, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_row, (old + acc).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _expand_segment_kernel(
    y_ptr, b_ptr, out_ptr, token_ids_ptr, tiles_ptr, offsets_ptr,
    R, N_TILES,
    stride_ym, stride_bs, stride_bn, stride_br, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid: (tiles, n_slices * N_TILES)
    slot = tl.load(tiles_ptr + tl.program_id(0) * 3).to(tl.int64)
    start = tl.load(tiles_ptr + tl.program_id(0) * 3 + 1)
    end = tl.load(tiles_ptr + tl.program_id(0) * 3 + 2)
    offs_m = start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_mask = offs_m < end
    tokens = tl.load(token_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)  # [BLOCK_M]
    slice_id = tl.program_id(1) // N_TILES
    lo = tl.load(offsets_ptr + slice_id)
    hi = tl.load(offsets_ptr + slice_id + 1)
    offs_n = lo + (tl.program_id(1) % N_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = offs_n < hi
    y_tile = y_ptr + tokens[:, None] * stride_ym + slice_id * R  # [BLOCK_M, 1]
    b_tile = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn  # [1, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        r_mask = offs_r < R
        yv = tl.load(y_tile + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bv = tl.load(b_tile + offs_r[:, None] * stride_br, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        # y may be an fp32 intermediate, the weights stored in another dtype (lora_dtype): the
        # tensor-core dot runs in out's dtype
        yv, bv = yv.to(out_ptr.dtype.element_ty), bv.to(out_ptr.dtype.element_ty)
        if UPCAST:
            yv, bv = yv.to(tl.float32), bv.to(tl.float32)
        acc += tl.dot(yv, bv, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    out_tile = out_ptr + tokens[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    old = tl.load(out_tile, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_tile, (old + acc).to(out_ptr.dtype.element_ty), mask=mask)


# The kernels are interpreted on CPU tensors when TRITON_INTERPRET=1 was set before import.
INTERPRETED: bool = isinstance(_shrink_decode_kernel, InterpretedFunction)


def choose_form(mapping: LoRABatchMapping) -> str:
    """"segment" when slots serve several tokens on average, else "decode"."""
    return "segment" if mapping.mean_segment_len >= SEGMENT_FORM_MIN_MEAN_TOKENS else "decode"


def shrink(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, n_slices * R, in]
    mapping: LoRABatchMapping,
    n_slices: int,
    out: torch.Tensor,  # [T, n_slices * R]
    *,
    form: str | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """out = shrink(x); `form` and `split_k` (decode form only) override the heuristics."""
    form = _checked_form(form, mapping, "shrink")
    if not mapping.any_active or x.shape[1] == 0:
        return out.zero_()
    with _on_device(x):
        if form == "segment":
            _shrink_segment(x, lora_a, mapping, n_slices, out)
        else:
            _shrink_decode(x, lora_a, mapping, n_slices, out, split_k)
    return out


def expand(
    y: torch.Tensor,  # [T, n_slices * R]
    lora_b: torch.Tensor,  # [S, N_total, R]
    mapping: LoRABatchMapping,
    out: torch.Tensor,  # [T, N_total]
    slice_offsets: Sequence[int],
    *,
    form: str | None = None,
) -> torch.Tensor:
    """out += expand(y); `form` overrides the heuristic."""
    form = _checked_form(form, mapping, "expand")
    widest = max(b - a for a, b in zip(slice_offsets[:-1], slice_offsets[1:], strict=True))
    if not mapping.any_active or widest == 0:
        return out
    offsets = _offsets_tensor(tuple(slice_offsets), out.device)  # [n_slices + 1]
    with _on_device(out):
        if form == "segment":
            _expand_segment(y, lora_b, mapping, out, offsets, widest)
        else:
            _expand_decode(y, lora_b, mapping, out, offsets, widest)
    return out


def _shrink_segment(x, lora_a, mapping, n_slices, out) -> None:
    rank = lora_a.shape[1] // n_slices
    if mapping.num_active_tokens < mapping.num_tokens:
        out.zero_()  # base-only rows get no program
    block_m, block_r = _block_m(mapping), _dot_block(rank)
    tiles, n_tiles = mapping.segment_tiles(block_m)
    r_tiles = triton.cdiv(rank, block_r)
    _shrink_segment_kernel[(n_tiles, n_slices * r_tiles)](
        x, lora_a, out, mapping.sorted_token_ids, tiles,
        x.shape[1], rank,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0),
        R_TILES=r_tiles, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64,
        **_dot_flags(x.dtype),
    )


def _shrink_decode(x, lora_a, mapping, n_slices, out, split_k: int | None) -> None:
    rank, k = lora_a.shape[1] // n_slices, x.shape[1]
    block_r = min(_pow2(rank), 64)
    block_k = max(32, 4096 // block_r)  # ~4K elements per weight tile
    r_tiles = triton.cdiv(rank, block_r)
    n_programs = mapping.num_active_tokens * n_slices * r_tiles
    split = split_k or _split_k(x.device, n_programs, triton.cdiv(k, block_k))
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    if split > 1:
        # Deterministic split-K: fp32 partial sums (zero for base-only rows), one torch.sum.
        target = torch.zeros(split, *out.shape, dtype=torch.float32, device=out.device)  # [split, T, nR]
    else:
        target = out
        if mapping.num_active_tokens < mapping.num_tokens:
            out.zero_()  # base-only rows get no program
    _shrink_decode_kernel[(mapping.num_active_tokens, n_slices * r_tiles, split)](
        x, lora_a, target, mapping.sorted_token_ids, mapping.token_slots,
        k, rank, k_per_split,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), target.stride(-2),
        target.stride(0) if split > 1 else 0,
        R_TILES=r_tiles, BLOCK_R=block_r, BLOCK_K=block_k,
    )
    if split > 1:
        out.copy_(target.sum(0))


def _expand_segment(y, lora_b, mapping, out, offsets, widest: int) -> None:
    rank, n_slices = lora_b.shape[2], offsets.numel() - 1
    block_m = _block_m(mapping)
    block_n = 64 if block_m == 64 else 128  # keeps the accumulator at <= 4K fp32
    tiles, n_tiles = mapping.segment_tiles(block_m)
    n_tiles_n = triton.cdiv(widest, block_n)
    _expand_segment_kernel[(n_tiles, n_slices * n_tiles_n)](
        y, lora_b, out, mapping.sorted_token_ids, tiles, offsets,
        rank, n_tiles_n,
        y.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_dot_block(rank),
        **_dot_flags(out.dtype),
    )


def _expand_decode(y, lora_b, mapping, out, offsets, widest: int) -> None:
    rank, n_slices = lora_b.shape[2], offsets.numel() - 1
    block_r = min(_pow2(rank), 64)
    block_n = min(256, max(32, 4096 // block_r))  # ~4K elements per weight tile
    n_tiles_n = triton.cdiv(widest, block_n)
    _expand_decode_kernel[(mapping.num_active_tokens, n_slices * n_tiles_n)](
        y, lora_b, out, mapping.sorted_token_ids, mapping.token_slots, offsets,
        rank, n_tiles_n,
        y.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), out.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )


def _checked_form(form: str | None, mapping: LoRABatchMapping, op: str) -> str:
    if form is None:
        return choose_form(mapping)
    if form not in ("decode", "segment"):
        raise ValueError(f"triton {op}: `form` must be 'decode', 'segment' or None; got {form!r}.")
    return form


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _dot_block(n: int) -> int:
    """A `tl.dot` dimension for an extent of n: a power of two in [16, 64]."""
    return min(max(16, _pow2(n)), 64)


def _block_m(mapping: LoRABatchMapping) -> int:
    # Short segments (decode) waste fewer masked rows with 16; long ones reuse weights over 64.
    return _dot_block(mapping.max_segment_len)


def _dot_flags(dtype: torch.dtype) -> dict[str, object]:
    # The interpreter's bf16 dot multiplies raw bit patterns (triton-lang/triton#11584); bf16 ->
    # fp32 is exact and tensor cores form exact products with fp32 accumulation, so an fp32 IEEE
    # dot there gives the GPU's numbers.
    upcast = INTERPRETED and dtype == torch.bfloat16
    # fp32 inputs: IEEE fp32, not TF32, so fp32 results match the reference closely. fp16/bf16:
    # the target's default (None), valid on every backend.
    precision = "ieee" if upcast or dtype == torch.float32 else None
    return {"DOT_PRECISION": precision, "UPCAST": upcast}


def _split_k(device: torch.device, n_programs: int, max_split: int) -> int:
    """Split K so that a small decode batch still fills the GPU (about 2 programs per SM)."""
    if device.type != "cuda" or n_programs == 0:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.cdiv(2 * sms, n_programs)
    return max(1, min(_pow2(want), max_split))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=256)
def _offsets_tensor(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # One small device tensor per (module layout, device), made once: no copy per call.
    return torch.tensor(offsets, dtype=torch.int32, device=device)


class _on_device:
    """Launch on the tensors' GPU even when another one is current."""

    def __init__(self, t: torch.Tensor) -> None:
        self._ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
