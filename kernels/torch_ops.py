"""Shrink and expand in plain torch: the CPU path (and any device without Triton).

Several formulations are kept side by side because which one wins depends on the batch's
shape; `benchmarks/bench_lora_cpu_ops.py` measures them and `docs/kernels.md` records the
numbers behind the default rule in `choose_formulation`:

- "batched": one `bmm` per slot group (runs in batch order over a rising slot range, padded to
  the longest run) and slice: the weights are strided views of the slot buffers, never copied,
  and the rows are views of `x` / `out` unless padding needs a small gather;
- "grouped": `torch.nn.functional.grouped_mm` over the tokens sorted by slot, one group per
  slot (empty groups for idle slots): no weight copies, no per-slot Python loop;
- "segments": gather the active tokens grouped by slot, one `mm` per (slot, slice), scatter back;
- "gather_bmm": gather each token's A and B, then one `bmm` per slice (weights copied per token):
  the textbook formulation, the torch baseline of the GPU benchmark.

Math runs in the activations' dtype (torch's CPU GEMMs accumulate fp16/bf16 in fp32) and is cast
to `out`'s dtype at the end. Weights stored in another dtype (`lora_dtype`) are cast, the active
slots' only, as each formulation reads them. Arguments are assumed checked (see
`loraplex.kernels.validation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .mapping import LoRABatchMapping, SlotGroup

__all__ = ["shrink", "expand", "choose_formulation", "FORMULATIONS"]

ShrinkFn = Callable[[torch.Tensor, torch.Tensor, LoRABatchMapping, int, torch.Tensor], torch.Tensor]
ExpandFn = Callable[[torch.Tensor, torch.Tensor, LoRABatchMapping, torch.Tensor, Sequence[int]], torch.Tensor]


def _grouped_mm_works_on_cpu() -> bool:
    """Recent torch has `F.grouped_mm` with a CPU kernel; older torch falls back to "segments"."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        F.grouped_mm(torch.ones(2, 4), torch.ones(2, 4, 4), offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


_HAS_GROUPED_MM = _grouped_mm_works_on_cpu()

# "batched" issues a fixed number of ops per slot group: it wins while a step's tokens form few
# groups (the engine orders them by slot) or long ones. A batch in arbitrary order forms about one
# group per token; "grouped" gathers it into slot order first (measured, see docs/kernels.md).
BATCHED_MAX_GROUPS = 3
BATCHED_MIN_ROWS_PER_GROUP = 16


def choose_formulation(mapping: LoRABatchMapping) -> str:
    """The formulation measured fastest on CPU for this batch's shape (see docs/kernels.md)."""
    groups = len(mapping.slot_groups)
    if groups <= BATCHED_MAX_GROUPS or mapping.num_active_tokens >= BATCHED_MIN_ROWS_PER_GROUP * groups:
        return "batched"
    # grouped_mm on CUDA takes only bf16 on recent GPUs; this path serves CUDA only without Triton.
    return "grouped" if _HAS_GROUPED_MM and mapping.device.type == "cpu" else "segments"


def shrink(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, n_slices * R, in]
    mapping: LoRABatchMapping,
    n_slices: int,
    out: torch.Tensor,  # [T, n_slices * R]
    formulation: str | None = None,
) -> torch.Tensor:
    if not mapping.any_active:
        return out.zero_()
    name = formulation or choose_formulation(mapping)
    return FORMULATIONS[name][0](x, lora_a, mapping, n_slices, out)


def expand(
    y: torch.Tensor,  # [T, n_slices * R]
    lora_b: torch.Tensor,  # [S, N_total, R]
    mapping: LoRABatchMapping,
    out: torch.Tensor,  # [T, N_total]
    slice_offsets: Sequence[int],
    formulation: str | None = None,
) -> torch.Tensor:
    if not mapping.any_active:
        return out
    name = formulation or choose_formulation(mapping)
    return FORMULATIONS[name][1](y, lora_b, mapping, out, slice_offsets)


def _slices(slice_offsets: Sequence[int], rank: int):
    """(y column slice, out column slice) of each output slice."""
    for i in range(len(slice_offsets) - 1):
        yield slice(i * rank, (i + 1) * rank), slice(slice_offsets[i], slice_offsets[i + 1])


def _as(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights in the compute dtype: themselves, or a cast copy of just these slots."""
    return weights if weights.dtype == dtype else weights.to(dtype)


def _scatter_rows(out: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, zero: bool) -> torch.Tensor:
    """out[ids] = rows (zeroing the others first when `zero`); ids are distinct."""
    if zero:
        out.zero_()
    out.index_put_((ids,), rows.to(out.dtype))
    return out


# --- batched: one bmm per slot group and slice -----------------------------------------------------


def _padded(rows: torch.Tensor, group: SlotGroup) -> torch.Tensor:
    """A group's rows [end - start, C] as its padded batch [G, L, C] (a view when unpadded)."""
    if group.gather is not None:
        rows = rows.index_select(0, group.gather)
    return rows.view(group.hi - group.lo, group.max_len, rows.shape[1])


def _unpadded(batch: torch.Tensor, group: SlotGroup) -> torch.Tensor:
    """The inverse of `_padded`: [G, L, C] -> the group's rows [end - start, C]."""
    flat = batch.flatten(0, 1)  # not view(-1, C): a zero-width slice has no -1 to infer
    return flat if group.scatter is None else flat.index_select(0, group.scatter)


def _shrink_batched(x, lora_a, mapping, n_slices, out):
    if mapping.num_active_tokens < mapping.num_tokens:
        out.zero_()
    for g in mapping.slot_groups:
        a = _as(lora_a[g.lo : g.hi], x.dtype)  # [G, nR, in]
        rows = out[g.start : g.end]  # [rows, nR]
        xs = _padded(x[g.start : g.end], g)  # [G, L, in]
        if g.scatter is None and out.dtype == x.dtype:  # straight into the rows
            if g.max_len == 1:  # one token per slot: A @ x streams A ~8% faster than x @ Aᵀ
                torch.bmm(a, xs.transpose(1, 2), out=rows.view(g.hi - g.lo, -1, 1))
            else:
                torch.bmm(xs, a.transpose(1, 2), out=rows.view(g.hi - g.lo, g.max_len, -1))
        else:
            rows.copy_(_unpadded(torch.bmm(xs, a.transpose(1, 2)), g))  # [G, L, nR] -> rows
    return out


def _expand_batched(y, lora_b, mapping, out, slice_offsets):
    widths = [hi - lo for lo, hi in zip(slice_offsets[:-1], slice_offsets[1:], strict=True)]
    ranks = [lora_b.shape[2]] * len(widths)
    for g in mapping.slot_groups:
        # split_with_sizes: Tensor.split is a Python wrapper, too slow for ~200 calls per step
        b = _as(lora_b[g.lo : g.hi], out.dtype).transpose(1, 2)  # [G, R, N]
        b_slices = b.split_with_sizes(widths, dim=2)  # each [G, R, N_i]
        ys = _padded(y[g.start : g.end].to(out.dtype), g).split_with_sizes(ranks, dim=2)  # each [G, L, R]
        outs = out[g.start : g.end].split_with_sizes(widths, dim=1)  # each [rows, N_i]
        for y_i, b_i, out_i in zip(ys, b_slices, outs, strict=True):
            if g.hi - g.lo == 1:  # one slot (a prompt, or one adapter's decodes): in place, no temporary
                out_i.addmm_(y_i[0], b_i[0])  # [rows, N_i]
            elif g.scatter is None and out_i.is_contiguous():  # in place (strided in place is slower)
                out_i.view(g.hi - g.lo, g.max_len, -1).baddbmm_(y_i, b_i)  # [G, L, N_i]
            else:
                out_i.add_(_unpadded(torch.bmm(y_i, b_i), g))  # [G, L, N_i] -> rows
    return out


# --- grouped: one grouped GEMM over all slots -----------------------------------------------------


def _aligned(*tensors: torch.Tensor) -> bool:
    """grouped_mm's requirement: every non-unit stride and the data pointer 16-byte aligned."""
    return all(
        t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride() if st != 1)
        for t in tensors
    )


def _active_slot_range(mapping: LoRABatchMapping) -> tuple[int, int, torch.Tensor]:
    """Slots [lo, hi) spanning every active slot, and each one's group end in sorted order.

    grouped_mm walks every group it is given, empty or not: with 64 slots and one adapter in use,
    limiting it to the active range removes 63 empty groups per call.
    """
    lo, hi = mapping.seg_slots_host[0], mapping.seg_slots_host[-1] + 1
    return lo, hi, mapping.slot_indptr[lo + 1 : hi + 1]  # [hi - lo]


def _shrink_grouped(x, lora_a, mapping, n_slices, out):
    if not _aligned(lora_a) or lora_a.shape[2] * lora_a.element_size() % 16 or lora_a.dtype != x.dtype:
        return _shrink_segments(x, lora_a, mapping, n_slices, out)  # odd in_features, or weights to cast
    ids = mapping.sorted_token_ids  # [Ta]
    lo, hi, ends = _active_slot_range(mapping)
    ys = F.grouped_mm(x.index_select(0, ids), lora_a[lo:hi].transpose(1, 2), offs=ends)  # [Ta, nR]
    return _scatter_rows(out, ids, ys, zero=True)


def _expand_grouped(y, lora_b, mapping, out, slice_offsets):
    size = out.element_size()
    odd = any(n * size % 16 for n in (lora_b.shape[2], *slice_offsets))  # an odd rank or slice start
    if not _aligned(lora_b) or odd or lora_b.dtype != out.dtype:  # or weights to cast slot by slot
        return _expand_segments(y, lora_b, mapping, out, slice_offsets)
    ids = mapping.sorted_token_ids  # [Ta]
    lo, hi, ends = _active_slot_range(mapping)
    ys = y.index_select(0, ids).to(out.dtype)  # [Ta, nR]
    for y_cols, o_cols in _slices(slice_offsets, lora_b.shape[2]):
        b = lora_b[lo:hi, o_cols].transpose(1, 2)  # [S', R, N_i] (a view)
        out[:, o_cols].index_add_(0, ids, F.grouped_mm(ys[:, y_cols].contiguous(), b, offs=ends))
    return out


# --- segments: gather grouped by slot, mm per (slot, slice), scatter ------------------------------


def _shrink_segments(x, lora_a, mapping, n_slices, out):
    ids = mapping.sorted_token_ids  # [Ta]
    xs = x.index_select(0, ids)  # [Ta, in]
    ys = torch.empty(ids.numel(), out.shape[1], dtype=x.dtype, device=x.device)  # [Ta, nR]
    ptr = mapping.seg_indptr_host
    for s, slot in enumerate(mapping.seg_slots_host):
        torch.mm(xs[ptr[s] : ptr[s + 1]], _as(lora_a[slot], x.dtype).t(), out=ys[ptr[s] : ptr[s + 1]])
    return _scatter_rows(out, ids, ys, zero=True)


def _expand_segments(y, lora_b, mapping, out, slice_offsets):
    ids = mapping.sorted_token_ids  # [Ta]
    ys = y.index_select(0, ids).to(out.dtype)  # [Ta, nR]
    delta = torch.empty(ids.numel(), out.shape[1], dtype=out.dtype, device=out.device)  # [Ta, N]
    ptr = mapping.seg_indptr_host
    for s, slot in enumerate(mapping.seg_slots_host):
        rows = slice(ptr[s], ptr[s + 1])
        b = _as(lora_b[slot], out.dtype)  # [N, R]
        for y_cols, o_cols in _slices(slice_offsets, lora_b.shape[2]):
            torch.mm(ys[rows, y_cols], b[o_cols].t(), out=delta[rows, o_cols])
    out.index_add_(0, ids, delta)
    return out


# --- gather_bmm: per-token weights ----------------------------------------------------------------


def _shrink_gather_bmm(x, lora_a, mapping, n_slices, out):
    ids = mapping.sorted_token_ids  # [Ta]
    slots = mapping.token_slots.index_select(0, ids)  # [Ta]
    a = _as(lora_a.index_select(0, slots), x.dtype)  # [Ta, nR, in]
    ys = torch.bmm(a, x.index_select(0, ids).unsqueeze(2)).squeeze(2)  # [Ta, nR]
    return _scatter_rows(out, ids, ys, zero=True)


def _expand_gather_bmm(y, lora_b, mapping, out, slice_offsets):
    ids = mapping.sorted_token_ids  # [Ta]
    slots = mapping.token_slots.index_select(0, ids)  # [Ta]
    b = _as(lora_b.index_select(0, slots), out.dtype)  # [Ta, N, R]
    ys = y.index_select(0, ids).to(out.dtype)  # [Ta, nR]
    for y_cols, o_cols in _slices(slice_offsets, lora_b.shape[2]):
        delta = torch.bmm(b[:, o_cols], ys[:, y_cols].unsqueeze(2)).squeeze(2)  # [Ta, N_i]
        out[:, o_cols].index_add_(0, ids, delta)
    return out


FORMULATIONS: dict[str, tuple[ShrinkFn, ExpandFn]] = {
    "batched": (_shrink_batched, _expand_batched),
    "segments": (_shrink_segments, _expand_segments),
    "gather_bmm": (_shrink_gather_bmm, _expand_gather_bmm),
}
if _HAS_GROUPED_MM:
    FORMULATIONS["grouped"] = (_shrink_grouped, _expand_grouped)
