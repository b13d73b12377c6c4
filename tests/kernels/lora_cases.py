"""Random LoRA problems and the reference answers the kernels tests compare against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from loraplex.kernels import reference
from loraplex.kernels.mapping import LoRABatchMapping

# Tolerances for outputs of magnitude ~1: fp32 differs from the reference only in summation
# order; fp16/bf16 may also differ by a rounding of the intermediate y (torch path).
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
}


# Use together with @pytest.mark.gpu on tests that need a real GPU.
skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclass
class Case:
    x: torch.Tensor  # [T, in]
    lora_a: torch.Tensor  # [S, n_slices * R, in]
    lora_b: torch.Tensor  # [S, N_total, R]
    base: torch.Tensor  # [T, N_total], the layer output the delta is added to
    token_slots: torch.Tensor  # [T] int
    offsets: tuple[int, ...]
    rank: int

    @property
    def n_slices(self) -> int:
        return len(self.offsets) - 1

    def mapping(self) -> LoRABatchMapping:
        return LoRABatchMapping.from_token_slots(self.token_slots, self.lora_a.shape[0], device=self.x.device)


def slot_pattern(kind: str, num_tokens: int, num_slots: int, seed: int = 0) -> list[int]:
    """"decode": random slots with some -1; "prefill": runs of one slot; "ordered": equal runs over
    rising slots; "spread": high slots too; "none": all -1."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return [-1] * num_tokens
    if kind == "decode":
        return torch.randint(-1, num_slots, (num_tokens,), generator=g).tolist()
    if kind == "prefill":  # four prompts: slots p, q, none, p again (one slot, two runs)
        chunk = max(1, -(-num_tokens // 4))
        p, q = torch.randint(0, num_slots, (2,), generator=g).tolist()
        return [(p, q, -1, p)[i // chunk] for i in range(num_tokens)]
    if kind == "ordered":  # as the engine orders a step: equal runs over rising slots (no padding)
        per_slot = max(1, num_tokens // num_slots)
        return [min(i // per_slot, num_slots - 1) for i in range(num_tokens)]
    if kind == "spread":  # tokens on the highest slots too
        return [(num_slots - 1 - i * 7) % num_slots if i % 5 else -1 for i in range(num_tokens)]
    raise ValueError(kind)


def make_case(
    num_tokens: int,
    in_features: int,
    rank: int,
    num_slots: int,
    slice_widths: Sequence[int],
    dtype: torch.dtype = torch.float32,
    slots: str | Sequence[int] = "decode",
    device: str | torch.device = "cpu",
    seed: int = 0,
    b_transposed: bool = False,
    weight_dtype: torch.dtype | None = None,
) -> Case:
    """`b_transposed`: store each slot's B as [R, N_total] in memory (the manager's layout).
    `weight_dtype`: store A and B in another dtype than the activations (`lora_dtype`)."""
    g = torch.Generator().manual_seed(seed)
    offsets = tuple(int(o) for o in torch.tensor([0, *slice_widths]).cumsum(0).tolist())
    n_slices = len(slice_widths)
    token_slots = slot_pattern(slots, num_tokens, num_slots, seed) if isinstance(slots, str) else list(slots)

    def rand(*shape: int, scale: float = 1.0, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype=as_dtype, device=device)

    wd = weight_dtype or dtype

    # Scaled so y and the delta are ~N(0, 1) whatever the sizes.
    return Case(
        x=rand(num_tokens, in_features),
        lora_a=rand(num_slots, n_slices * rank, in_features, scale=in_features**-0.5, as_dtype=wd),
        lora_b=(
            rand(num_slots, rank, offsets[-1], scale=rank**-0.5, as_dtype=wd).transpose(1, 2)
            if b_transposed
            else rand(num_slots, offsets[-1], rank, scale=rank**-0.5, as_dtype=wd)
        ),
        base=rand(num_tokens, offsets[-1]),
        token_slots=torch.tensor(token_slots, dtype=torch.int64, device=device),
        offsets=offsets,
        rank=rank,
    )


def reference_shrink(case: Case, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty(case.x.shape[0], case.lora_a.shape[1], dtype=out_dtype or case.x.dtype, device=case.x.device)
    return reference.shrink(case.x, case.lora_a, case.mapping(), case.n_slices, out)


def reference_expand(case: Case, y: torch.Tensor) -> torch.Tensor:
    return reference.expand(y, case.lora_b, case.mapping(), case.base.clone(), case.offsets)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[expected.dtype])


def inactive_rows(case: Case) -> torch.Tensor:
    return torch.nonzero(case.token_slots < 0).flatten()
