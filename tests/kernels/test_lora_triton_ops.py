"""The Triton kernels against the reference (mirrors loraplex/kernels/triton_ops.py).

Without a GPU these run interpreted on CPU tensors (see conftest.py), so shapes stay small; the
`gpu`-marked tests at the end use real model shapes and run only where CUDA is present.
"""

from __future__ import annotations

import pytest
import torch
from lora_cases import assert_close, inactive_rows, make_case, reference_expand, reference_shrink, skip_without_cuda
from loraplex.kernels import LoRABatchMapping

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (tokens, hidden, rank, slots, slice widths, dtype, slot pattern)
CASES = {
    "r1-h33-s1-1slice": (6, 33, 1, 1, (24,), FP32, "decode"),
    "r8-h129-s3-3slices": (10, 129, 8, 3, (40, 8, 8), FP32, "decode"),
    "r16-h64-s64-2slices": (12, 64, 16, 64, (24, 8), FP32, "spread"),
    "r64-h33-s3-2slices": (8, 33, 64, 3, (24, 8), FP32, "prefill"),
    "r100-h40-s2-multi-r-tiles": (5, 40, 100, 2, (20,), FP32, "decode"),
    "r256-h32-s2": (4, 32, 256, 2, (16, 8), FP32, "decode"),
    "fp16-r16-h129-s3": (10, 129, 16, 3, (40, 8, 8), FP16, "prefill"),
    "fp16-r64-h33-s1": (6, 33, 64, 1, (24,), FP16, "decode"),
    "bf16-r16-h129-s3": (10, 129, 16, 3, (40, 8, 8), BF16, "decode"),
    "bf16-r8-h64-s64": (12, 64, 8, 64, (24, 8), BF16, "spread"),
}


def _check(triton_ops, case, form: str, split_k: int | None = None, y_dtype: torch.dtype | None = None) -> None:
    mapping = case.mapping()
    y_ref = reference_shrink(case, y_dtype)
    y = torch.full_like(y_ref, float("nan"))
    triton_ops.shrink(case.x, case.lora_a, mapping, case.n_slices, y, form=form, split_k=split_k)
    if y.dtype == torch.float32 and case.x.dtype != torch.float32:
        torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    else:
        assert_close(y, y_ref)
    out = triton_ops.expand(y_ref, case.lora_b, mapping, case.base.clone(), case.offsets, form=form)
    assert_close(out, reference_expand(case, y_ref))
    rows = inactive_rows(case)
    assert torch.equal(y[rows], torch.zeros_like(y[rows]))
    assert torch.equal(out[rows], case.base[rows])


@pytest.mark.parametrize("form", ["decode", "segment"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference(triton_ops, kernel_device: str, name: str, form: str) -> None:
    tokens, hidden, rank, slots, widths, dtype, pattern = CASES[name]
    case = make_case(tokens, hidden, rank, slots, widths, dtype=dtype, slots=pattern, device=kernel_device)
    _check(triton_ops, case, form)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_decode_shrink_split_k(triton_ops, kernel_device: str, dtype: torch.dtype) -> None:
    case = make_case(5, 129, 8, 3, (16, 8, 8), dtype=dtype, device=kernel_device)
    _check(triton_ops, case, "decode", split_k=3)


@pytest.mark.parametrize("form", ["decode", "segment"])
def test_float32_intermediate_with_bf16_weights(triton_ops, kernel_device: str, form: str) -> None:
    case = make_case(7, 64, 16, 3, (24, 8), dtype=BF16, device=kernel_device)
    _check(triton_ops, case, form, y_dtype=torch.float32)


def test_segment_form_with_several_tiles_per_segment(triton_ops, kernel_device: str) -> None:
    """70 tokens of slot 1 need two 64-token tiles; slot 0's 10 tokens share no tile with them."""
    case = make_case(80, 16, 4, 2, (16, 16), slots=[1] * 70 + [0] * 10, device=kernel_device)
    assert case.mapping().segment_tiles(64)[1] == 3
    _check(triton_ops, case, "segment")


@pytest.mark.parametrize("form", ["decode", "segment"])
def test_b_stored_transposed(triton_ops, kernel_device: str, form: str) -> None:
    case = make_case(9, 40, 8, 3, (16, 8), device=kernel_device, b_transposed=True)
    _check(triton_ops, case, form)


@pytest.mark.parametrize("form", ["decode", "segment"])
def test_strided_rows(triton_ops, kernel_device: str, form: str) -> None:
    case = make_case(6, 40, 8, 2, (16, 8), device=kernel_device)
    wide_x = torch.zeros(6, 64, device=kernel_device)
    wide_x[:, 3:43] = case.x
    wide_out = torch.zeros(6, 40, device=kernel_device)
    wide_out[:, 7:31] = case.base
    wide_y = torch.zeros(6, 20, device=kernel_device)
    mapping = case.mapping()
    triton_ops.shrink(wide_x[:, 3:43], case.lora_a, mapping, 2, wide_y[:, 2:18], form=form)
    triton_ops.expand(wide_y[:, 2:18], case.lora_b, mapping, wide_out[:, 7:31], case.offsets, form=form)
    y_ref = reference_shrink(case)
    assert_close(wide_y[:, 2:18], y_ref)
    assert_close(wide_out[:, 7:31], reference_expand(case, y_ref))
    assert not wide_out[:, :7].any() and not wide_out[:, 31:].any()
    assert not wide_y[:, :2].any() and not wide_y[:, 18:].any()


@pytest.mark.parametrize("form", ["decode", "segment"])
@pytest.mark.parametrize("slots", [[], [-1, -1, -1]], ids=["empty", "all_base"])
def test_no_active_token(triton_ops, kernel_device: str, form: str, slots: list[int]) -> None:
    case = make_case(len(slots), 16, 4, 2, (8,), slots=slots, device=kernel_device)
    y = torch.full((len(slots), 4), float("nan"), device=kernel_device)
    triton_ops.shrink(case.x, case.lora_a, case.mapping(), 1, y, form=form)
    out = triton_ops.expand(y, case.lora_b, case.mapping(), case.base.clone(), case.offsets, form=form)
    assert not y.any() and torch.equal(out, case.base)


def test_form_follows_tokens_per_slot(triton_ops) -> None:
    assert triton_ops.choose_form(LoRABatchMapping.from_token_slots(list(range(8)), 8)) == "decode"
    assert triton_ops.choose_form(LoRABatchMapping.from_token_slots([0] * 16 + [1] * 16, 2)) == "segment"


def test_unknown_form_is_refused(triton_ops, kernel_device: str) -> None:
    case = make_case(2, 16, 4, 1, (8,), device=kernel_device)
    with pytest.raises(ValueError, match="`form` must be 'decode', 'segment' or None; got 'dense'"):
        triton_ops.shrink(case.x, case.lora_a, case.mapping(), 1, torch.empty(2, 4, device=kernel_device), form="dense")


# --- real shapes, GPU only ------------------------------------------------------------------------

# (hidden, slice widths, rank, tokens, adapters): 8B-class q/k/v and gate/up, decode and prefill
GPU_CASES = {
    "qkv-r16-t64-a8": (4096, (4096, 1024, 1024), 16, 64, 8),
    "qkv-r64-t1-a1": (4096, (4096, 1024, 1024), 64, 1, 1),
    "gate_up-r8-t256-a64": (4096, (14336, 14336), 8, 256, 64),
    "down-r16-t512-a4": (14336, (4096,), 16, 512, 4),
}


@pytest.mark.parametrize("form", [None, "decode", "segment"])
@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.gpu
@skip_without_cuda
def test_real_shapes_on_gpu(triton_ops, name: str, dtype: torch.dtype, form: str | None) -> None:
    hidden, widths, rank, tokens, adapters = GPU_CASES[name]
    slots = [i % adapters if i % 9 else -1 for i in range(tokens)]
    case = make_case(tokens, hidden, rank, adapters, widths, dtype=dtype, slots=slots, device="cuda")
    _check(triton_ops, case, form)  # type: ignore[arg-type]
