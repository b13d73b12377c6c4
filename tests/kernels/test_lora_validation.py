"""Wrapper errors: each names the argument, what was expected, what was given and the fix
(mirrors loraplex/kernels/validation.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from loraplex.kernels import LoRABatchMapping, lora_apply, lora_expand, lora_shrink

T, K, R, S = 4, 16, 4, 3
OFFSETS = (0, 8, 12)


def _x(**kw):
    return torch.randn(T, K, **kw)


def _a(**kw):
    return torch.randn(S, 2 * R, K, **kw)


def _b(**kw):
    return torch.randn(S, 12, R, **kw)


def _slots():
    return torch.tensor([0, -1, 2, 1])


def _mapping(**kw):
    return LoRABatchMapping.from_token_slots(_slots(), S, **kw)


def _shrink(**over) -> Callable[[], object]:
    args = dict(x=_x(), lora_a=_a(), token_slots=_slots(), n_slices=2, out=None)
    args.update(over)
    return lambda: lora_shrink(
        args["x"], args["lora_a"], args["token_slots"], args["n_slices"], args["out"], mapping=args.get("mapping")
    )


def _expand(**over) -> Callable[[], object]:
    args = dict(y=torch.randn(T, 2 * R), lora_b=_b(), token_slots=_slots(), out=torch.zeros(T, 12))
    args["slice_offsets"] = OFFSETS
    args.update(over)
    return lambda: lora_expand(
        args["y"], args["lora_b"], args["token_slots"], args["out"], args["slice_offsets"], mapping=args.get("mapping")
    )


def _apply(**over) -> Callable[[], object]:
    args = dict(x=_x(), lora_a=_a(), lora_b=_b(), mapping=_mapping(), out=torch.zeros(T, 12), slice_offsets=OFFSETS)
    args.update(over)
    return lambda: lora_apply(**args)


CASES = {
    # lora_shrink
    "x-not-a-tensor": (_shrink(x=[[1.0]]), r"lora_shrink: `x` must be a torch.Tensor \[T, in_features\]; got list"),
    "x-1d": (_shrink(x=torch.zeros(K)), r"`x` must be 2-D \[T, in_features\]; got 1-D with shape \[16\]\. Reshape"),
    "x-int": (
        _shrink(x=torch.zeros(T, K, dtype=torch.int32)),
        r"`x` must be float16, bfloat16 or float32; got torch.int32\. Cast",
    ),
    "x-strided": (
        _shrink(x=_x().t().contiguous().t()),
        r"`x` must be contiguous in its last dimension.*Pass `x.contiguous\(\)`",
    ),
    "a-dtype": (  # another float dtype than x's is fine (lora_dtype); an int is not
        _shrink(lora_a=_a().to(torch.int32)),
        r"`lora_a` must be float16, bfloat16 or float32; got torch.int32",
    ),
    "a-rows": (
        _shrink(n_slices=3),
        r"`lora_a` must be of shape \[S, n_slices \* R, in_features\].*got \[3, 8, 16\]\. Stack each slot's A",
    ),
    "a-in": (_shrink(x=torch.randn(T, 15)), r"`lora_a` must be of shape .*x.shape\[1\]=15\); got \[3, 8, 16\]"),
    "a-device": (
        _shrink(lora_a=_a(device="meta")),
        r"`lora_a` must be on cpu like `x`; got a tensor on meta\. Move it",
    ),
    "n_slices": (_shrink(n_slices=0), r"`n_slices` must be a positive int; got 0"),
    "n_slices-bool": (_shrink(n_slices=True), r"`n_slices` must be a positive int; got True"),
    "out-shape": (
        _shrink(out=torch.empty(T, 9)),
        r"`out` must be of shape \[T, n_slices \* R\] = \[4, 8\]; got \[4, 9\]",
    ),
    "out-dtype": (
        _shrink(out=torch.empty(T, 8, dtype=torch.bfloat16)),
        r"`out` must be torch.float32 .*; got torch.bfloat16",
    ),
    "slots-missing": (
        _shrink(token_slots=None),
        r"`token_slots` must be a 1-D int32/int64 tensor \[T\] when no `mapping` is given; got NoneType",
    ),
    "slots-length": (
        _shrink(token_slots=torch.zeros(5, dtype=torch.int64)),
        r"`token_slots` must be of shape \[T\] = \[4\].*got \[5\]",
    ),
    "mapping-tokens": (
        _shrink(mapping=LoRABatchMapping.from_token_slots([0, 1], S), token_slots=None),
        r"`mapping` must be built for T=4 tokens; got one for 2\. Build it with LoRABatchMapping.from_token_slots",
    ),
    "mapping-slots": (
        _shrink(mapping=LoRABatchMapping.from_token_slots(_slots(), 5)),
        r"`mapping` must be built for num_slots=3 .*got num_slots=5",
    ),
    "mapping-device": (
        _shrink(mapping=_mapping(device="meta")),
        r"`mapping` must be on cpu like the activations; got one on meta",
    ),
    "mapping-type": (_shrink(mapping=[0, 1]), r"`mapping` must be a LoRABatchMapping or None; got list"),
    # lora_expand
    "offsets-start": (
        _expand(slice_offsets=(1, 8, 12)),
        r"lora_expand: `slice_offsets` must be non-decreasing ints from 0 to N_total=12.*got \[1, 8, 12\]",
    ),
    "offsets-end": (_expand(slice_offsets=(0, 8, 13)), r"`slice_offsets` must be .*N_total=12"),
    "offsets-order": (_expand(slice_offsets=(0, 9, 8, 12)), r"got \[0, 9, 8, 12\]\. Pass the cumulative output widths"),
    "offsets-type": (_expand(slice_offsets=None), r"`slice_offsets` must be a sequence of ints; got NoneType"),
    "y-width": (
        _expand(y=torch.randn(T, 12)),
        r"`y` must be of shape \[T, n_slices \* R\] = \[4, 2\*4\].*got \[4, 12\]",
    ),
    "y-dtype": (_expand(y=torch.randn(T, 8, dtype=torch.float16)), r"`y` must be torch.float32 .*; got torch.float16"),
    "b-dtype": (
        _expand(lora_b=_b(dtype=torch.float64)),
        r"`lora_b` must be float16, bfloat16 or float32; got torch.float64",
    ),
    "b-3d": (_expand(lora_b=torch.zeros(12, R)), r"`lora_b` must be 3-D \[S, N_total, R\]; got 2-D"),
    "out-rows": (_expand(out=torch.zeros(T + 1, 12)), r"`out` must be of shape \[T, N_total\] = \[4, 12\]"),
    "out-strided": (_expand(out=torch.zeros(12, T).t()), r"`out` must be contiguous in its last dimension"),
    "expand-device": (
        _expand(y=torch.randn(T, 8, device="meta")),
        r"`y` must be on cpu like `out`; got a tensor on meta",
    ),
    # lora_apply
    "apply-mapping": (
        _apply(mapping=None),
        r"lora_apply: `mapping` must be a LoRABatchMapping; got NoneType\. Build one per step",
    ),
    "apply-rank": (
        _apply(lora_b=torch.randn(S, 12, R + 1)),
        r"lora_apply: `lora_b` must be of shape \[S, N_total, R\] = \[3, 12, 4\] to match lora_a",
    ),
    "apply-out": (_apply(out=torch.zeros(T, 11)), r"lora_apply: `out` must be of shape \[T, N_total\] = \[4, 12\]"),
    "apply-out-dtype": (
        _apply(out=torch.zeros(T, 12, dtype=torch.float16)),
        r"lora_apply: `out` must be torch.float32 \(the dtype of `x`\)",
    ),
    "apply-x": (_apply(x=torch.randn(T, K + 1)), r"lora_apply: `lora_a` must be of shape"),
}




@pytest.mark.parametrize("name", list(CASES))
def test_wrapper_errors_name_argument_expectation_and_fix(name: str) -> None:
    call, match = CASES[name]
    with pytest.raises(ValueError, match=match) as info:
        call()
    message = str(info.value)
    assert "must be" in message and "got" in message
