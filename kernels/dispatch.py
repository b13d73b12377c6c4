"""The public operations and which implementation runs them.

Rules (the first that applies wins):

1. a `backend=` argument of the call;
2. the process-wide choice made with `set_backend(...)` or inside `with use_backend(...)`;
3. automatic: "triton" for CUDA tensors when Triton imports; "cpu" (the native CPU kernel, see
   `native_cpu`) for CPU tensors when it builds and takes the operands; otherwise "torch".

"triton" on CPU tensors works only when Triton runs interpreted (`TRITON_INTERPRET=1` set before
Triton was first imported, as the tests do); anything else is a `ValueError` saying so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Literal

import torch

from . import native_cpu, reference, torch_ops
from .mapping import LoRABatchMapping
from .validation import check_apply, check_expand, check_shrink, stale_mapping

__all__ = [
    "Backend",
    "BACKENDS",
    "lora_shrink",
    "lora_expand",
    "lora_apply",
    "bind_lora_apply",
    "AppliedLoRA",
    "set_backend",
    "get_backend",
    "use_backend",
    "resolve_backend",
    "triton_available",
]

Backend = Literal["reference", "torch", "cpu", "triton"]
BACKENDS: tuple[str, ...] = ("reference", "torch", "cpu", "triton")

_forced: str | None = None


def set_backend(name: Backend | None) -> None:
    """Force one backend for every call in this process; None restores the automatic choice."""
    global _forced
    _forced = _checked_name(name, "set_backend")


def get_backend() -> Backend | None:
    """The backend forced with `set_backend` / `use_backend`, or None when automatic."""
    return _forced  # type: ignore[return-value]


@contextmanager
def use_backend(name: Backend | None) -> Iterator[None]:
    """`with use_backend("reference"): ...` forces a backend for the block, then restores."""
    global _forced
    previous = _forced
    _forced = _checked_name(name, "use_backend")
    try:
        yield
    finally:
        _forced = previous


@functools.cache
def _triton_import() -> tuple[ModuleType | None, str]:
    """(triton_ops, "") when the kernels import, else (None, why); tried once per process."""
    try:
        from . import triton_ops
    except (ImportError, RuntimeError) as exc:  # not installed, or no usable driver/toolchain
        return None, f"{type(exc).__name__}: {exc}"
    return triton_ops, ""


def _triton_module() -> ModuleType | None:
    return _triton_import()[0]


def triton_available() -> bool:
    """True when the Triton kernels import (Triton is installed and usable)."""
    return _triton_module() is not None


def resolve_backend(device: torch.device, backend: Backend | None = None) -> Backend:
    """The backend a call on `device` would use, after the rules in this module's docstring.

    An automatic "cpu" still gives way to "torch" for operands the kernel does not take (not
    float32, say): `native_cpu.unsupported_reason` decides, per call.
    """
    name = _checked_name(backend, "loraplex.kernels") or _forced
    if name is None:
        if device.type == "cuda" and triton_available():
            return "triton"
        return "cpu" if device.type == "cpu" and native_cpu.available() else "torch"
    if name == "triton":
        module = _triton_module()
        if module is None:
            raise ValueError(
                f"LoRA backend 'triton' was requested but Triton does not import ({_triton_import()[1]}). "
                "Install it (pip install 'loraplex[triton]') or use backend 'torch'."
            )
        if device.type != "cuda" and not module.INTERPRETED:
            raise ValueError(
                f"LoRA backend 'triton' needs CUDA tensors; got tensors on {device}. Move them to a GPU, "
                "use backend 'torch', or set TRITON_INTERPRET=1 before Triton is imported to interpret the kernels."
            )
    if name == "cpu" and not native_cpu.available():
        raise ValueError(
            f"LoRA backend 'cpu' was requested but the native CPU kernel is unavailable "
            f"({native_cpu.unavailable_reason()}). Install a C++ compiler, or use backend 'torch'."
        )
    return name  # type: ignore[return-value]


def _backend_for(device: torch.device, backend: Backend | None, operands: dict[str, torch.Tensor]) -> Backend:
    """`resolve_backend`, then "cpu" only for operands the native kernel takes."""
    name = resolve_backend(device, backend)
    if name != "cpu":
        return name
    reason = native_cpu.unsupported_reason(operands)
    if not reason:
        return name
    if (backend or _forced) == "cpu":  # asked for by name: say why it cannot be
        raise ValueError(f"LoRA backend 'cpu' cannot run these operands: {reason}. Use backend 'torch' for them.")
    return "torch"


def lora_shrink(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, n_slices * R, in]
    token_slots: torch.Tensor | None,  # [T]
    n_slices: int,
    out: torch.Tensor | None = None,  # [T, n_slices * R]
    *,
    mapping: LoRABatchMapping | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """y[t, i*R:(i+1)*R] = x[t] @ lora_a[slot_t, i*R:(i+1)*R].T ; rows with slot -1 are 0.

    `out` (overwritten) may be x's dtype or float32; it is allocated in x's dtype when None.
    Pass the step's `mapping` to skip rebuilding it (then `token_slots` may be None).
    """
    num_tokens, rank = check_shrink(x, lora_a, token_slots, n_slices, out, mapping)
    if out is None:
        out = torch.empty(num_tokens, n_slices * rank, dtype=x.dtype, device=x.device)  # [T, nR]
    mapping = mapping or LoRABatchMapping.from_token_slots(token_slots, lora_a.shape[0], device=x.device)
    if not mapping.any_active:
        return out.zero_()
    name = _backend_for(x.device, backend, {"x": x, "lora_a": lora_a, "out": out})
    return _impl(name).shrink(x, lora_a, mapping, n_slices, out)


def lora_expand(
    y: torch.Tensor,  # [T, n_slices * R]
    lora_b: torch.Tensor,  # [S, N_total, R]
    token_slots: torch.Tensor | None,  # [T]
    out: torch.Tensor,  # [T, N_total]
    slice_offsets: Sequence[int],
    *,
    mapping: LoRABatchMapping | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """out[t, o_i:o_{i+1}] += y[t, i*R:(i+1)*R] @ lora_b[slot_t, o_i:o_{i+1}].T, in place.

    Rows with slot -1 are left untouched. `y` may be out's dtype or float32.
    """
    offsets = check_expand(y, lora_b, token_slots, out, slice_offsets, mapping)
    mapping = mapping or LoRABatchMapping.from_token_slots(token_slots, lora_b.shape[0], device=out.device)
    if not mapping.any_active:
        return out
    name = _backend_for(out.device, backend, {"y": y, "lora_b": lora_b, "out": out})
    return _impl(name).expand(y, lora_b, mapping, out, offsets)


def lora_apply(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, n_slices * R, in]
    lora_b: torch.Tensor,  # [S, N_total, R]
    mapping: LoRABatchMapping,
    out: torch.Tensor,  # [T, N_total]
    slice_offsets: Sequence[int],
    *,
    backend: Backend | None = None,
) -> torch.Tensor:
    """out += expand(shrink(x)): the whole LoRA delta of one wrapped linear, in place.

    Returns at once when no token uses a LoRA. The intermediate is float32 on the Triton, cpu
    and reference paths (no extra rounding) and x's dtype on the torch path.
    A caller that applies the same weights every step, like a model's layers, should use
    `bind_lora_apply` instead: it checks once and skips the per-call costs.
    """
    return bind_lora_apply(x, lora_a, lora_b, mapping, out, slice_offsets, backend=backend)(x, mapping, out)


AppliedLoRA = Callable[[torch.Tensor, LoRABatchMapping, torch.Tensor], torch.Tensor]


def bind_lora_apply(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, n_slices * R, in]
    lora_b: torch.Tensor,  # [S, N_total, R]
    mapping: LoRABatchMapping,
    out: torch.Tensor,  # [T, N_total]
    slice_offsets: Sequence[int],
    *,
    backend: Backend | None = None,
) -> AppliedLoRA:
    """`lora_apply` with these weights fixed, as `apply(x, mapping, out) -> out`.

    The operands are checked and the backend chosen here, once; `apply` then skips both (12 to
    25 µs a call, one call per wrapped linear a step), checking only that `mapping` was built
    for `x`'s tokens.
    Its later calls must pass operands with the shapes (but T), dtypes, devices and layouts of
    the ones given here, and `lora_a` / `lora_b` must stay where they are (their slots may be
    rewritten in place).
    """
    offsets = check_apply(x, lora_a, lora_b, mapping, out, slice_offsets)
    name = _backend_for(x.device, backend, {"x": x, "lora_a": lora_a, "lora_b": lora_b, "out": out})
    if name == "cpu":  # shrink and expand in one call, the intermediate inside the kernel
        return native_cpu.bind_apply(lora_a, lora_b, offsets)
    impl = _impl(name)
    y_dtype = x.dtype if name == "torch" else torch.float32

    def apply(x: torch.Tensor, mapping: LoRABatchMapping, out: torch.Tensor) -> torch.Tensor:
        if mapping.num_tokens != x.shape[0]:  # a stale mapping would index out of bounds
            raise stale_mapping(x.shape[0], mapping)
        if not mapping.any_active:
            return out
        y = torch.empty(x.shape[0], lora_a.shape[1], dtype=y_dtype, device=x.device)  # [T, nR]
        impl.shrink(x, lora_a, mapping, len(offsets) - 1, y)
        return impl.expand(y, lora_b, mapping, out, offsets)

    return apply


def _impl(name: Backend) -> ModuleType:
    if name == "triton":
        return _triton_module()  # type: ignore[return-value]
    return {"reference": reference, "torch": torch_ops, "cpu": native_cpu}[name]


def _checked_name(name: object, fn: str) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(
            f"{fn}: `backend` must be one of {', '.join(map(repr, BACKENDS))} or None (automatic); got {name!r}."
        )
    return name  # type: ignore[return-value]
