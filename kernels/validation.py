"""Argument checks run before any shrink / expand implementation is called.

Every check raises `ValueError` with one message that names the function and the argument,
says what was expected and what was given, and how to fix it. Checks read only shapes, dtypes,
strides and devices (and the mapping's host-side facts): no device sync.

The same rules hold for every backend, so a layer that works on CPU keeps working on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .mapping import LoRABatchMapping

__all__ = [
    "SUPPORTED_DTYPES",
    "check_shrink",
    "check_expand",
    "check_apply",
    "check_mapping",
    "check_slice_offsets",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(fn: str, arg: str, expected: str, given: str, fix: str) -> ValueError:
    return ValueError(f"{fn}: `{arg}` must be {expected}; got {given}. {fix}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _check_tensor(fn: str, arg: str, t: object, dims: int, layout: str, transposable: bool = False) -> torch.Tensor:
    """`transposable`: the last two dimensions may be stored either way round (`lora_b`)."""
    if not isinstance(t, torch.Tensor):
        raise _fail(fn, arg, f"a torch.Tensor {layout}", type(t).__name__, f"Pass `{arg}` as a tensor.")
    if t.dim() != dims:
        given = f"{t.dim()}-D with shape {_shape(t)}"
        raise _fail(fn, arg, f"{dims}-D {layout}", given, f"Reshape `{arg}` to {layout}.")
    if t.dtype not in SUPPORTED_DTYPES:
        raise _fail(
            fn, arg, "float16, bfloat16 or float32", str(t.dtype), f"Cast `{arg}` with .to(torch.bfloat16) or similar."
        )
    if t.numel() and not _unit_stride(t, -1) and not (transposable and _unit_stride(t, -2)):
        expected = "contiguous in one of its last two dimensions" if transposable else "contiguous in its last dimension"
        raise _fail(fn, arg, f"{expected} (stride 1)", f"strides {tuple(t.stride())}", f"Pass `{arg}.contiguous()`.")
    return t


def _unit_stride(t: torch.Tensor, dim: int) -> bool:
    return t.shape[dim] <= 1 or t.stride(dim) == 1  # a size-1 dim's stride is never used


def _check_same_device(fn: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        fix = f"Move it with `.to({ref_arg}.device)`."
        raise _fail(fn, arg, f"on {ref.device} like `{ref_arg}`", f"a tensor on {t.device}", fix)


def _check_dtype_in(fn: str, arg: str, t: torch.Tensor, allowed: Sequence[torch.dtype], why: str) -> None:
    if t.dtype not in allowed:
        names = " or ".join(str(d) for d in dict.fromkeys(allowed))
        raise _fail(fn, arg, f"{names} ({why})", str(t.dtype), f"Allocate `{arg}` with dtype={allowed[0]}.")


def check_slice_offsets(fn: str, slice_offsets: object, n_total: int) -> tuple[int, ...]:
    """`slice_offsets` as a tuple of ints: 0 = o_0 <= o_1 <= ... <= o_n = n_total, n >= 1."""
    try:
        offsets = tuple(int(o) for o in slice_offsets)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise _fail(
            fn, "slice_offsets", "a sequence of ints", type(slice_offsets).__name__, "Pass e.g. (0, 576, 768, 960)."
        ) from None
    ok = (
        len(offsets) >= 2
        and offsets[0] == 0
        and offsets[-1] == n_total
        and all(a <= b for a, b in zip(offsets[:-1], offsets[1:], strict=True))
    )
    if not ok:
        raise _fail(
            fn,
            "slice_offsets",
            f"non-decreasing ints from 0 to N_total={n_total} (lora_b.shape[1]), one more than the number of slices",
            str(list(offsets)),
            "Pass the cumulative output widths of the packed slices, e.g. (0, 576, 768, 960) for q/k/v.",
        )
    return offsets


def stale_mapping(num_tokens: int, mapping: LoRABatchMapping) -> ValueError:
    """The error of a bound apply given a mapping built for another step's tokens."""
    return ValueError(
        f"lora_apply: `mapping` must be built for T={num_tokens} tokens (x.shape[0]); got one for "
        f"{mapping.num_tokens}. Build one per step with LoRABatchMapping.from_token_slots."
    )


def check_mapping(
    fn: str, mapping: object, token_slots: object, num_tokens: int, num_slots: int, device: torch.device
) -> None:
    """The mapping (if any) matches the activations, the weights' slot count and the device."""
    build = "Build it with LoRABatchMapping.from_token_slots(token_slots, num_slots=lora_a.shape[0], device=x.device)."
    if mapping is None:
        if not isinstance(token_slots, torch.Tensor):
            raise _fail(
                fn, "token_slots", "a 1-D int32/int64 tensor [T] when no `mapping` is given",
                type(token_slots).__name__, "Pass the per-token slots, or a prebuilt `mapping=`.",
            )
        if token_slots.dim() != 1 or token_slots.shape[0] != num_tokens:
            raise _fail(
                fn, "token_slots", f"of shape [T] = [{num_tokens}] (one slot per row)", _shape(token_slots),
                "Pass one slot per token, -1 for tokens without LoRA.",
            )
        return
    if not isinstance(mapping, LoRABatchMapping):
        raise _fail(fn, "mapping", "a LoRABatchMapping or None", type(mapping).__name__, build)
    if mapping.num_tokens != num_tokens:
        raise _fail(fn, "mapping", f"built for T={num_tokens} tokens", f"one for {mapping.num_tokens}", build)
    if mapping.num_slots != num_slots:
        raise _fail(
            fn, "mapping", f"built for num_slots={num_slots} (the stacked weights' first dimension)",
            f"num_slots={mapping.num_slots}", build,
        )
    if mapping.device != device:
        raise _fail(fn, "mapping", f"on {device} like the activations", f"one on {mapping.device}", build)
    if isinstance(token_slots, torch.Tensor) and token_slots.shape != (num_tokens,):
        raise _fail(
            fn, "token_slots", f"of shape [{num_tokens}] (or None when `mapping` is given)", _shape(token_slots),
            "Pass the same token_slots the mapping was built from, or None.",
        )


def check_shrink(
    x: object,
    lora_a: object,
    token_slots: object,
    n_slices: object,
    out: object,
    mapping: object,
    fn: str = "lora_shrink",
) -> tuple[int, int]:
    """Checks `lora_shrink`'s arguments; returns (T, R)."""
    x = _check_tensor(fn, "x", x, 2, "[T, in_features]")
    lora_a = _check_tensor(fn, "lora_a", lora_a, 3, "[S, n_slices * R, in_features]")
    if isinstance(n_slices, bool) or not isinstance(n_slices, int) or n_slices < 1:
        raise _fail(fn, "n_slices", "a positive int", repr(n_slices), "Pass the number of packed slices (1 to 3).")
    s, n_r, k = lora_a.shape
    if n_r == 0 or n_r % n_slices or k != x.shape[1] or s == 0:
        raise _fail(
            fn, "lora_a", f"of shape [S, n_slices * R, in_features] = [S>=1, {n_slices}*R, {x.shape[1]}] "
            f"(n_slices={n_slices}, x.shape[1]={x.shape[1]})", _shape(lora_a),
            "Stack each slot's A as [n_slices * R, in_features], slice i in rows i*R:(i+1)*R.",
        )
    _check_same_device(fn, "lora_a", lora_a, "x", x)
    if out is not None:
        out = _check_tensor(fn, "out", out, 2, f"[T, n_slices * R] = [{x.shape[0]}, {n_r}]")
        if out.shape != (x.shape[0], n_r):
            expected = f"of shape [T, n_slices * R] = [{x.shape[0]}, {n_r}]"
            raise _fail(fn, "out", expected, _shape(out), "Allocate it to match.")
        _check_same_device(fn, "out", out, "x", x)
        _check_dtype_in(fn, "out", out, (x.dtype, torch.float32), "the dtype of `x`, or float32 for a full-precision y")
    check_mapping(fn, mapping, token_slots, x.shape[0], s, x.device)
    return x.shape[0], n_r // n_slices


def check_expand(
    y: object,
    lora_b: object,
    token_slots: object,
    out: object,
    slice_offsets: object,
    mapping: object,
    fn: str = "lora_expand",
) -> tuple[int, ...]:
    """Checks `lora_expand`'s arguments; returns the slice offsets as a tuple."""
    lora_b = _check_tensor(fn, "lora_b", lora_b, 3, "[S, N_total, R]", transposable=True)
    out = _check_tensor(fn, "out", out, 2, "[T, N_total]")
    y = _check_tensor(fn, "y", y, 2, "[T, n_slices * R]")
    s, n_total, rank = lora_b.shape
    if s == 0 or rank == 0:
        fix = "Stack each slot's B as [N_total, R]."
        raise _fail(fn, "lora_b", "of shape [S>=1, N_total, R>=1]", _shape(lora_b), fix)
    offsets = check_slice_offsets(fn, slice_offsets, n_total)
    n_slices = len(offsets) - 1
    if out.shape != (y.shape[0], n_total):
        raise _fail(
            fn, "out", f"of shape [T, N_total] = [{y.shape[0]}, {n_total}] (y.shape[0], lora_b.shape[1])",
            _shape(out), "Pass the layer output the LoRA delta is added to.",
        )
    if y.shape[1] != n_slices * rank:
        raise _fail(
            fn, "y", f"of shape [T, n_slices * R] = [{out.shape[0]}, {n_slices}*{rank}] "
            f"({n_slices} slices from slice_offsets, R={rank} from lora_b.shape[2])", _shape(y),
            "Pass lora_shrink's output for the same slices and rank.",
        )
    _check_same_device(fn, "lora_b", lora_b, "out", out)
    _check_same_device(fn, "y", y, "out", out)
    _check_dtype_in(fn, "y", y, (out.dtype, torch.float32), "the dtype of `out`, or float32")
    check_mapping(fn, mapping, token_slots, out.shape[0], s, out.device)
    return offsets


def check_apply(
    x: object, lora_a: object, lora_b: object, mapping: object, out: object, slice_offsets: object
) -> tuple[int, ...]:
    """Checks `lora_apply`'s arguments (y excepted: the caller allocates it); returns the offsets."""
    fn = "lora_apply"
    if not isinstance(mapping, LoRABatchMapping):
        raise _fail(
            fn, "mapping", "a LoRABatchMapping", type(mapping).__name__,
            "Build one per step with LoRABatchMapping.from_token_slots(token_slots, num_slots, device=x.device).",
        )
    b = _check_tensor(fn, "lora_b", lora_b, 3, "[S, N_total, R]", transposable=True)
    offsets = check_slice_offsets(fn, slice_offsets, b.shape[1])
    n_slices = len(offsets) - 1
    check_shrink(x, lora_a, None, n_slices, None, mapping, fn=fn)
    xt, a = _check_tensor(fn, "x", x, 2, ""), _check_tensor(fn, "lora_a", lora_a, 3, "")
    if b.shape[0] != a.shape[0] or a.shape[1] != n_slices * b.shape[2]:
        raise _fail(
            fn, "lora_b", f"of shape [S, N_total, R] = [{a.shape[0]}, {b.shape[1]}, {a.shape[1] // n_slices}] "
            f"to match lora_a {_shape(a)} with {n_slices} slices", _shape(b),
            "Stack A and B of the same slots with the same max rank.",
        )
    o = _check_tensor(fn, "out", out, 2, "[T, N_total]")
    if o.shape != (xt.shape[0], b.shape[1]):
        raise _fail(
            fn, "out", f"of shape [T, N_total] = [{xt.shape[0]}, {b.shape[1]}]", _shape(o),
            "Pass the base layer's output for the same tokens.",
        )
    for arg, t in (("lora_b", b), ("out", o)):
        _check_same_device(fn, arg, t, "x", xt)
    _check_dtype_in(fn, "out", o, (xt.dtype,), "the dtype of `x`")
    return offsets
