"""The oracle: the plainest per-token torch code for shrink and expand.

Deliberately slow and obvious (a Python loop over tokens and slices, fp32 math, one rounding at
the end) so that the torch and Triton implementations can be checked against it. It reads only
`mapping.token_slots`, never the grouping the fast paths rely on. Arguments are assumed checked
(see `loraplex.kernels.validation`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .mapping import LoRABatchMapping

__all__ = ["shrink", "expand"]


def shrink(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, n_slices * R, in]
    mapping: LoRABatchMapping,
    n_slices: int,
    out: torch.Tensor,  # [T, n_slices * R]
) -> torch.Tensor:
    """out[t, i*R:(i+1)*R] = x[t] @ lora_a[slot_t, i*R:(i+1)*R].T ; rows with slot -1 are 0."""
    rank = lora_a.shape[1] // n_slices
    slots = mapping.token_slots.tolist()
    out.zero_()
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        for i in range(n_slices):
            rows = slice(i * rank, (i + 1) * rank)
            a = lora_a[slot, rows].float()  # [R, in]
            out[t, rows] = (a @ x[t].float()).to(out.dtype)  # [R]
    return out


def expand(
    y: torch.Tensor,  # [T, n_slices * R]
    lora_b: torch.Tensor,  # [S, N_total, R]
    mapping: LoRABatchMapping,
    out: torch.Tensor,  # [T, N_total]
    slice_offsets: Sequence[int],
) -> torch.Tensor:
    """out[t, o_i:o_{i+1}] += y[t, i*R:(i+1)*R] @ lora_b[slot_t, o_i:o_{i+1}].T ; -1 rows untouched."""
    rank = lora_b.shape[2]
    slots = mapping.token_slots.tolist()
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        for i in range(len(slice_offsets) - 1):
            cols = slice(slice_offsets[i], slice_offsets[i + 1])
            b = lora_b[slot, cols].float()  # [N_i, R]
            yi = y[t, i * rank : (i + 1) * rank].float()  # [R]
            out[t, cols] = (out[t, cols].float() + b @ yi).to(out.dtype)  # [N_i]
    return out
