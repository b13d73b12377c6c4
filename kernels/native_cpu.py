"""The native CPU kernel (`csrc/lora_cpu.cpp`): compiled on first use, cached, called via ctypes.

The source is plain C++ with OpenMP and no torch headers: the system's C++ compiler builds it in
about a second, for this machine's instruction set (`-march=native`), into
`<LORAPLEX_CACHE_DIR>/kernels/`, keyed by the source, the compiler and the CPU, so a cache
shared between machines never serves a binary built for another CPU. Without a compiler (or
with `LORAPLEX_CPU_KERNEL=0`) the kernel is unavailable and the CPU path stays on the torch
formulations; `unavailable_reason()` says why.

It takes fp32 activations, fp32 or bf16 weights (the manager's `lora_dtype`), A's rows and B's
columns contiguous (the LoRA manager's layout, see `loraplex.lora.slot_layout`);
`unsupported_reason` names anything else.
The argument checks of `loraplex.kernels.validation` are assumed done.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .mapping import LoRABatchMapping
from .validation import stale_mapping

__all__ = ["available", "unavailable_reason", "unsupported_reason", "shrink", "expand", "bind_apply"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.cpp"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-fPIC", "-shared")
_BUILD_TIMEOUT_S = 120
_SHRINK, _EXPAND = 1, 2
WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # what the kernel reads A and B as

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class _Weights(ctypes.Structure):
    """`LoRAWeights` of csrc/lora_cpu.cpp: one wrapped linear's A and B, made once per binding."""

    _fields_ = [
        ("a", _PTR), ("sa0", _I64), ("sa1", _I64),  # A [S, nR, K]: slot and row strides
        ("b", _PTR), ("sb0", _I64), ("sbr", _I64),  # B stored [S, R, N]: slot and rank strides
        ("k_len", _I64), ("n_slices", _I64), ("rank", _I64), ("weight_dtype", _I64),
        ("offsets", ctypes.POINTER(_I64)),  # [n_slices + 1]
    ]  # fmt: skip


# weights, x, its row stride, y (or NULL), its row stride, out, its row stride, runs, n_runs, stages, threads
_ARGTYPES = [ctypes.POINTER(_Weights), _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, ctypes.c_int, ctypes.c_int]


def available() -> bool:
    """True when the kernel is built (or builds now) and loads."""
    return _library()[0] is not None


def unavailable_reason() -> str:
    """Why the kernel is unavailable ("" when it is available)."""
    return _library()[1]


def unsupported_reason(operands: dict[str, torch.Tensor]) -> str:
    """Why these named operands cannot run on the kernel ("" when they can)."""
    if any(t.device.type != "cpu" for t in operands.values()):
        return "it runs on CPU tensors only"
    weights = {name: t for name, t in operands.items() if name in ("lora_a", "lora_b")}
    activations = {name: t for name, t in operands.items() if name not in weights}
    not_fp32 = [name for name, t in activations.items() if t.dtype != torch.float32]
    if not_fp32:
        verb = "is" if len(not_fp32) == 1 else "are"
        return f"it takes float32 activations only, and {', '.join(not_fp32)} {verb} not"
    if any(t.dtype not in WEIGHT_DTYPES for t in weights.values()):
        return f"it takes float32 or bfloat16 weights only, not {', '.join(str(t.dtype) for t in weights.values())}"
    strided = [name for name, t in operands.items() if name != "lora_b" and t.stride(-1) != 1]
    if strided:
        return f"{', '.join(strided)} need a unit stride along the last dimension"
    if "lora_b" in operands and operands["lora_b"].stride(1) != 1:
        return "lora_b [S, N, R] must be stored transposed (stride 1 along N), as the LoRA manager stores it"
    return ""


def shrink(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [S, n_slices * R, in]
    mapping: LoRABatchMapping,
    n_slices: int,
    out: torch.Tensor,  # [T, n_slices * R], float32
) -> torch.Tensor:
    if mapping.num_active_tokens < mapping.num_tokens:
        out.zero_()  # the kernel writes the active rows only
    weights = _weights(lora_a, None, n_slices, (0,) * (n_slices + 1))  # no columns: no expand
    _run(weights, x, out, None, mapping, _SHRINK)
    return out


def expand(
    y: torch.Tensor,  # [T, n_slices * R], float32
    lora_b: torch.Tensor,  # [S, N_total, R]
    mapping: LoRABatchMapping,
    out: torch.Tensor,  # [T, N_total]
    slice_offsets: Sequence[int],
) -> torch.Tensor:
    _run(_weights(None, lora_b, len(slice_offsets) - 1, tuple(slice_offsets)), None, y, out, mapping, _EXPAND)
    return out


def bind_apply(
    lora_a: torch.Tensor,  # [S, n_slices * R, in]
    lora_b: torch.Tensor,  # [S, N_total, R]
    slice_offsets: Sequence[int],
) -> Callable[[torch.Tensor, LoRABatchMapping, torch.Tensor], torch.Tensor]:
    """out += expand(shrink(x)) in one kernel call, the intermediate kept inside it, as
    `apply(x, mapping, out)` with the weights' arguments packed once: what a bound layer calls.
    It checks only that `mapping` was built for `x`'s tokens.

    The weights must stay where they are (the LoRA manager rewrites slots in place).
    """
    kernel, threads = _kernel(), torch.get_num_threads
    weights = _weights(lora_a, lora_b, len(slice_offsets) - 1, tuple(slice_offsets))
    both = _SHRINK | _EXPAND

    def apply(x: torch.Tensor, mapping: LoRABatchMapping, out: torch.Tensor) -> torch.Tensor:
        # `_run` spelled out: this runs ~120 times a step, between GEMMs that evict the
        # interpreter's caches, so every Python operation here costs
        if mapping.num_tokens != x.shape[0]:  # a stale mapping would index out of bounds
            raise stale_mapping(x.shape[0], mapping)
        runs = mapping.runs_table  # [n_runs, 3] int64: start, end, slot (none: the kernel returns)
        kernel(weights, x.data_ptr(), x.stride(0), None, 0, out.data_ptr(), out.stride(0), runs.data_ptr(),
               runs.shape[0], both, threads())
        return out

    return apply


def _weights(
    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, n_slices: int, slice_offsets: tuple[int, ...]
) -> _Weights:
    """The kernel's view of the weights (one of them None for a shrink or expand alone).

    The structure holds the tensors (and the offsets' array) so its addresses stay valid.
    """
    some = lora_a if lora_a is not None else lora_b
    offsets = (_I64 * len(slice_offsets))(*slice_offsets)
    weights = _Weights(
        *(_rows(lora_a) + (lora_a.stride(1),) if lora_a is not None else (None, 0, 0)),
        *(_rows(lora_b) + (lora_b.stride(2),) if lora_b is not None else (None, 0, 0)),
        lora_a.shape[2] if lora_a is not None else 0,
        n_slices,
        lora_b.shape[2] if lora_b is not None else lora_a.shape[1] // n_slices,
        WEIGHT_DTYPES[some.dtype],
        offsets,
    )  # fmt: skip
    weights.keep_alive = (lora_a, lora_b, offsets)
    return weights


def _run(weights: _Weights, x, y, out, mapping: LoRABatchMapping, stages: int) -> None:
    """One kernel call; the operands a stage does not use are None."""
    runs = mapping.runs_table  # [n_runs, 3] int64: start, end, slot
    threads = torch.get_num_threads()
    _kernel()(weights, *_rows(x), *_rows(y), *_rows(out), runs.data_ptr(), runs.shape[0], stages, threads)


def _kernel() -> ctypes._CFuncPtr:
    lib = _library()[0]
    if lib is None:
        raise RuntimeError(f"the native CPU LoRA kernel is unavailable: {unavailable_reason()}")
    return lib.loraplex_lora_cpu


def _rows(t: torch.Tensor | None) -> tuple[int | None, int]:
    """(data pointer, stride of the first dimension), or (NULL, 0) for an operand not used."""
    return (t.data_ptr(), t.stride(0)) if t is not None else (None, 0)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel, "") or (None, why not); built and loaded once per process."""
    return load_library(SOURCE, {"loraplex_lora_cpu": (_ARGTYPES, None)}, "The native CPU LoRA kernel is",
                        "the CPU path uses torch")


def load_library(source: Path, signatures: dict[str, tuple[list, object]], what: str,
                 otherwise: str) -> tuple[ctypes.CDLL | None, str]:
    """The C++ file `source` built (`build_library`) and loaded, each function's (argtypes, restype)
    of `signatures` set: (library, "") or (None, why not). When the build or the load fails, one
    warning says `what` is unavailable and what happens `otherwise`."""
    # imported here, not at the top: transformers probes for a package named `kernels` and imports
    # this directory as one when the repository root is on sys.path, where `..` does not exist
    from .. import envs

    if not envs.cpu_kernel_enabled():
        return None, "disabled by LORAPLEX_CPU_KERNEL=0"
    try:
        lib = ctypes.CDLL(str(build_library(source)))
    except (OSError, subprocess.SubprocessError) as exc:
        reason = str(exc) or type(exc).__name__
        logger.warning("%s unavailable (%s); %s.", what, reason, otherwise)
        return None, reason
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib, ""


def build_library(source: Path | None = None) -> Path:
    """The compiled library of the C++ file `source` (this module's kernel when None) for this
    compiler and CPU, built when missing (load_library builds the decoder's and the GGUF kernels' with it)."""
    source = SOURCE if source is None else source
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise OSError("no C++ compiler found (install g++ or clang++, or set CXX)")
    from .. import envs  # see _library

    # the headers beside the source are part of what it compiles (csrc/*.h, included by name)
    texts = [source.read_bytes(), *(header.read_bytes() for header in sorted(source.parent.glob("*.h")))]
    key = hashlib.sha256(b"\0".join([*texts, compiler.encode(), " ".join(_FLAGS).encode(), _cpu_fingerprint()]))
    target = envs.cache_dir() / "kernels" / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target, then renamed: a concurrent build or a crash never leaves half a library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *_FLAGS, str(source), "-o", tmp], capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S
        )
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
            raise OSError(f"{Path(compiler).name} failed to build {source.name}: {errors[0].strip()}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _cpu_fingerprint() -> bytes:
    """The CPU model and its feature flags: what `-march=native` compiles for."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            parts += sorted({line.strip() for line in info if line.startswith(("model name", "flags", "Features"))})
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts).encode()
