"""LoRA-wrapped linear: the base projection plus each token's adapter delta, by device slot."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..kernels import AppliedLoRA, LoRABatchMapping, bind_lora_apply
from ..models.layers import Linear


class LoRAStepState:
    """The current step's token-to-slot mapping, shared by every wrapped linear of the model."""

    def __init__(self) -> None:
        self.mapping: LoRABatchMapping | None = None


class LoRALinear(nn.Module):
    """`out = base(x)`, then `out[t] += x[t] A[slot_t]ᵀ B[slot_t]ᵀ` per output slice.

    Weights are stacked per slot and zero-padded to max_lora_rank: a slot holding a rank-8
    adapter in rank-16 buffers computes exactly the rank-8 delta.
    """

    def __init__(self, base: Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, state: LoRAStepState) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.slice_offsets = tuple(itertools.accumulate(base.output_sizes, initial=0))
        self._delta: AppliedLoRA | None = None  # bound on the first call: see forward
        # views into the manager's per-slot storage (see slot_layout), not owned here
        self.lora_a = lora_a  # [S, n_slices * R, in]
        self.lora_b = lora_b  # [S, N, R], stored transposed: strides (numel, 1, N)

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
            if self._delta is None:  # later calls pass activations of the same width, dtype and device
                self._delta = bind_lora_apply(x, self.lora_a, self.lora_b, mapping, out, self.slice_offsets)
            self._delta(x, mapping, out)
        return out
