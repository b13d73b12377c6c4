"""The torch formulations against the reference (mirrors loraplex/kernels/torch_ops.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from lora_cases import assert_close, inactive_rows, make_case, reference_expand, reference_shrink
from loraplex.kernels import LoRABatchMapping, torch_ops

FORMULATIONS = sorted(torch_ops.FORMULATIONS)
RANKS = (1, 8, 16, 64)
HIDDEN = (33, 64, 129)
SLOTS = (1, 3, 64)
WIDTHS = ((24,), (24, 8), (40, 8, 8), (24, 0, 8))
PATTERNS = ("decode", "prefill", "spread", "ordered")
GRID = list(itertools.product(RANKS, HIDDEN, SLOTS, WIDTHS))


def _run(case, name: str, y_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    mapping = case.mapping()
    y = torch.full((case.x.shape[0], case.lora_a.shape[1]), float("nan"), dtype=y_dtype or case.x.dtype)
    torch_ops.shrink(case.x, case.lora_a, mapping, case.n_slices, y, formulation=name)
    out = torch_ops.expand(y, case.lora_b, mapping, case.base.clone(), case.offsets, formulation=name)
    return y, out


@pytest.mark.parametrize(("rank", "hidden", "slots", "widths"), GRID)
def test_formulations_match_reference_fp32(rank: int, hidden: int, slots: int, widths: tuple[int, ...]) -> None:
    pattern = PATTERNS[GRID.index((rank, hidden, slots, widths)) % len(PATTERNS)]
    case = make_case(12, hidden, rank, slots, widths, slots=pattern, seed=rank + hidden + slots)
    y_ref = reference_shrink(case)
    out_ref = reference_expand(case, y_ref)
    for name in FORMULATIONS:
        y, out = _run(case, name)
        assert_close(y, y_ref)
        assert_close(out, out_ref)
        assert torch.equal(out[inactive_rows(case)], case.base[inactive_rows(case)]), name


@pytest.mark.parametrize("name", FORMULATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("rank", "slots", "pattern"), [(8, 3, "decode"), (16, 64, "spread"), (16, 3, "prefill")])
def test_formulations_match_reference_half(name: str, dtype: torch.dtype, rank: int, slots: int, pattern: str) -> None:
    case = make_case(12, 64, rank, slots, (40, 8, 8), dtype=dtype, slots=pattern)
    y_ref = reference_shrink(case)
    y, out = _run(case, name)
    assert_close(y, y_ref)
    assert_close(out, reference_expand(case, y_ref))


@pytest.mark.parametrize("name", FORMULATIONS)
def test_float32_intermediate_with_bf16_weights(name: str) -> None:
    case = make_case(10, 64, 16, 3, (32, 16), dtype=torch.bfloat16)
    y, out = _run(case, name, y_dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, reference_shrink(case, torch.float32), atol=2e-2, rtol=2e-2)
    assert_close(out, reference_expand(case, reference_shrink(case, torch.float32)))


@pytest.mark.parametrize("name", FORMULATIONS)
@pytest.mark.parametrize("slots", [[], [-1, -1, -1, -1]], ids=["empty", "all_base"])
def test_no_active_token(name: str, slots: list[int]) -> None:
    case = make_case(len(slots), 16, 4, 2, (8, 8), slots=slots)
    y, out = _run(case, name)
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(out, case.base)


@pytest.mark.parametrize("name", FORMULATIONS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_b_stored_transposed(name: str, pattern: str) -> None:
    """lora_b [S, N, R] may be a transposed view of [S, R, N] memory (the LoRA manager's layout)."""
    case = make_case(12, 64, 8, 5, (40, 8, 8), slots=pattern, b_transposed=True)
    assert case.lora_b.stride(1) == 1
    y, out = _run(case, name)
    assert_close(out, reference_expand(case, reference_shrink(case)))


@pytest.mark.parametrize("name", FORMULATIONS)
def test_strided_rows(name: str) -> None:
    """x and out may be row slices of wider buffers (only the last dim must be contiguous)."""
    case = make_case(9, 64, 8, 3, (16, 8))
    wide_x = torch.zeros(9, 100)
    wide_x[:, 10:74] = case.x
    wide_out = torch.zeros(9, 50)
    wide_out[:, 5:29] = case.base
    mapping = case.mapping()
    y = torch.empty(9, 16)
    torch_ops.shrink(wide_x[:, 10:74], case.lora_a, mapping, 2, y, formulation=name)
    torch_ops.expand(y, case.lora_b, mapping, wide_out[:, 5:29], case.offsets, formulation=name)
    assert_close(wide_out[:, 5:29], reference_expand(case, reference_shrink(case)))
    assert torch.equal(wide_out[:, :5], torch.zeros(9, 5)) and torch.equal(wide_out[:, 29:], torch.zeros(9, 21))


def test_default_choice_follows_batch_shape() -> None:
    prefill = LoRABatchMapping.from_token_slots([0] * 64 + [1] * 64, 2)
    slot_ordered = LoRABatchMapping.from_token_slots([0, 0, 1, 1, 2, 2, 3, 3], 4)
    interleaved = LoRABatchMapping.from_token_slots([0, 1] * 8, 2)
    assert torch_ops.choose_formulation(prefill) == "batched"
    assert torch_ops.choose_formulation(slot_ordered) == "batched"
    assert torch_ops.choose_formulation(interleaved) in ("grouped", "segments")
