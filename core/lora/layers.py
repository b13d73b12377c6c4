"""LoRA-wrapped linear: the base projection plus each token's adapter delta, by device slot."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..kernels import LoRABatchMapping, lora_apply
from ..models.layers import Linear


class LoRAStepState:
    """The current step's token-to-slot mapping, shared by every wrapped linear of the model."""

    def __init__(self) -> None:
        self.mapping: LoRABatchMapping | None = None


class LoRALinear(nn.Module):
    """`out = base(x)`, then `out[t] += x[t] A[slot_t]ᵀ B[slot_t]ᵀ` per output slice.

    Weights are stacked per slot and zero-padded to `max_rank`: a slot holding a rank-8 adapter
    in rank-16 buffers computes exactly the rank-8 delta.
    """

    def __init__(self, base: Linear, num_slots: int, max_rank: int, state: LoRAStepState) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.max_rank = max_rank
        self.slice_offsets = list(itertools.accumulate(base.output_sizes, initial=0))
        w = base.weight
        n_slices = len(base.output_sizes)
        self.register_buffer("lora_a", torch.zeros(num_slots, n_slices * max_rank, base.in_features, dtype=w.dtype, device=w.device))  # [S, nR, in]
        self.register_buffer("lora_b", torch.zeros(num_slots, base.out_features, max_rank, dtype=w.dtype, device=w.device))  # [S, N, R]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def output_sizes(self) -> list[int]:
        return self.base.output_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [T, N]
        mapping = self.state.mapping
        if mapping is not None and mapping.any_active:
            lora_apply(x, self.lora_a, self.lora_b, mapping, out, self.slice_offsets)
        return out

    def set_slot(self, slot: int, slices: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter's (A [r, in], B [out, r]) per slice into `slot`; absent slices are zero."""
        r_max = self.max_rank
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for index, (a, b) in slices.items():
            rank = a.shape[0]
            start, end = self.slice_offsets[index], self.slice_offsets[index + 1]
            self.lora_a[slot, index * r_max : index * r_max + rank].copy_(a, non_blocking=True)
            self.lora_b[slot, start:end, :rank].copy_(b, non_blocking=True)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
