"""GGUF-quantized weights (Q4_1, Q8_0) used as they are on the CPU (`csrc/quant_cpu.h`).

A GGUF tensor becomes a `QuantizedWeight` with `from_gguf`: the same bytes (20 per Q4_1 block of
32 values, 34 per Q8_0 block) repacked into the kernels' layout, described at the top of
csrc/quant_cpu.h. `linear` quantizes the activations per 32-value block to int8 (llama.cpp's
Q8_1) and runs the integer GEMV: what a decode step of a few tokens wants. `dequantize` gives the
fp32 weight (exactly gguf's values) for a float GEMM when many tokens come at once, `embedding`
the rows of some tokens. `permute_rows` and `concat_rows` reorder and stack whole rows (GGUF's
permuted q/k rows, fused qkv and gate_up projections).

Built and cached like the other native kernels (`native_cpu.build_library`); `LORAPLEX_CPU_KERNEL=0`
or a missing compiler leaves `available()` False, and callers then dequantize the GGUF tensors at
load (`dequantize_gguf` needs no compiler).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from .native_cpu import load_library

__all__ = ["GGUF_TYPES", "QuantizedWeight", "available", "isa", "from_gguf", "dequantize_gguf", "permute_rows",
           "concat_rows", "quantize_activations", "gemv", "linear", "dequantize", "embedding", "row_bytes",
           "activation_row_bytes", "regions", "slot_values", "activation_slots"]

SOURCE = Path(__file__).with_name("csrc") / "quant_cpu.cpp"
BLOCK = 32  # values per GGUF block
SUPER = 16  # blocks per super-block of the repacked layout
GGUF_TYPES = {GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q8_0: "q8_0"}  # what the kernels take
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # bytes per block, in GGUF and repacked
_KIND_CODES = {"q4_1": 0, "q8_0": 1}

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_GEMV = [_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _INT, _INT]
_DEQUANTIZE = [_PTR, _I64, _PTR, _I64, _PTR, _I64, _INT]
_SIGNATURES = {
    "loraplex_quant_isa": ([], ctypes.c_char_p),
    "loraplex_quant_activation_row_bytes": ([_I64], _I64),
    "loraplex_quantize_activations": ([_PTR, _I64, _I64, _I64, _PTR, _INT], None),
    "loraplex_q4_1_gemv": (_GEMV, None),
    "loraplex_q8_0_gemv": (_GEMV, None),
    "loraplex_quant_linear": ([_INT, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _INT, _INT], None),
    "loraplex_dequantize_q4_1": (_DEQUANTIZE, None),
    "loraplex_dequantize_q8_0": (_DEQUANTIZE, None),
}


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A linear weight [out_features, in_features] in a GGUF block format, repacked for the kernels.

    `data` is uint8 [out_features, row_bytes], one row per output feature, each row independent of
    the others (so whole rows can be reordered and stacked)."""

    kind: str  # "q4_1" or "q8_0"
    out_features: int  # N
    in_features: int  # K, a multiple of 32
    data: torch.Tensor  # uint8 [N, K / 32 * BLOCK_BYTES[kind]], contiguous

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        _check_k(self.in_features)
        expected = (self.out_features, row_bytes(self.kind, self.in_features))
        if (self.data.dtype is not torch.uint8 or tuple(self.data.shape) != expected or not self.data.is_contiguous()
                or self.data.device.type != "cpu"):
            raise ValueError(f"a {self.kind} weight [{self.out_features}, {self.in_features}] is held as a contiguous "
                             f"uint8 CPU tensor {list(expected)}; got {self.data.dtype} {tuple(self.data.shape)} on "
                             f"{self.data.device}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def row_bytes(self) -> int:
        return self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def available() -> bool:
    """True when the kernels are built (or build now) and load."""
    return _library() is not None


def isa() -> str:
    """The kernels' code path on this machine: "avx512-vnni", "avx2" or "scalar"."""
    return _lib().loraplex_quant_isa().decode()


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one repacked row (the same as GGUF's)."""
    return in_features // BLOCK * BLOCK_BYTES[kind]


def activation_row_bytes(in_features: int) -> int:
    """Bytes per token of `quantize_activations`' output: K int8, then per block dx, sx (fp32) and
    the int32 sum of the block's values, padded to a multiple of 64."""
    nb = in_features // BLOCK
    return (in_features + 12 * nb + 63) // 64 * 64


def from_gguf(raw: np.ndarray, ggml_type: GGMLQuantizationType | int, shape: Sequence[int]) -> QuantizedWeight:
    """The weight of shape [N, K] whose GGUF bytes are `raw` (a `gguf.GGUFReader` tensor's `data`:
    uint8, N rows of K / 32 blocks, any shape holding those bytes), repacked. Note the order: a
    ReaderTensor's `shape` lists ggml's dimensions fastest first, [K, N].

    Only the types in `GGUF_TYPES` are supported; the loader dequantizes others itself."""
    kind = _kind_of(ggml_type)
    n, k = (int(s) for s in shape)
    _check_k(k)
    rb = row_bytes(kind, k)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.size != n * rb:
        raise ValueError(f"a {kind} tensor [{n}, {k}] is {n * rb} bytes of uint8 ({n} rows of {rb}); got "
                         f"{raw.dtype} {raw.shape} ({raw.nbytes} bytes)")
    blocks = np.ascontiguousarray(raw).reshape(n, k // BLOCK, BLOCK_BYTES[kind])  # [N, nb, block bytes]
    values, scales = _gguf_values(kind, blocks)  # uint8 [N, K] in value order, uint8 [N, nb, 2 or 4]
    layout = _layout(kind, k)
    data = torch.empty(n, rb, dtype=torch.uint8)  # [N, row bytes]: torch's allocation is 64-byte aligned
    packed = data.numpy()  # filled in place
    if kind == "q4_1":
        packed[:, layout.nibble_bytes] = values[:, layout.low_values] | (values[:, layout.high_values] << 4)
        packed[:, layout.d_bytes] = scales[:, :, 0:2].reshape(n, -1)
        packed[:, layout.m_bytes] = scales[:, :, 2:4].reshape(n, -1)
    else:
        packed[:, layout.value_bytes] = values
        packed[:, layout.d_bytes] = scales.reshape(n, -1)
    return QuantizedWeight(kind, n, k, data)


def dequantize_gguf(raw: np.ndarray, ggml_type: GGMLQuantizationType | int, shape: Sequence[int]) -> torch.Tensor:
    """fp32 [N, K] of GGUF bytes, with gguf's own numpy code (no compiler needed)."""
    from gguf.quants import dequantize as gguf_dequantize

    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(np.asarray(raw), ggml_type)).reshape(*shape))


def permute_rows(qw: QuantizedWeight, index: torch.Tensor | Sequence[int]) -> QuantizedWeight:
    """The weight whose row i is `qw`'s row index[i] (any subset or order of rows)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    if index.dim() != 1 or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= qw.out_features)):
        raise ValueError(f"permute_rows takes a 1-D index of rows in [0, {qw.out_features}); got shape "
                         f"{tuple(index.shape)}" + (f", values {int(index.min())}..{int(index.max())}"
                                                    if index.numel() else ""))
    return QuantizedWeight(qw.kind, index.numel(), qw.in_features, qw.data.index_select(0, index))


def concat_rows(weights: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """The weights stacked along the output features (e.g. q, k, v -> qkv): one packed weight."""
    if not weights:
        raise ValueError("concat_rows takes at least one weight")
    first = weights[0]
    if any(w.kind != first.kind or w.in_features != first.in_features for w in weights):
        raise ValueError("concat_rows takes weights of one kind and in_features; got "
                         + ", ".join(f"{w.kind} [{w.out_features}, {w.in_features}]" for w in weights))
    return QuantizedWeight(first.kind, sum(w.out_features for w in weights), first.in_features,
                           torch.cat([w.data for w in weights]))


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] fp32 -> uint8 [T, activation_row_bytes(K)]: per 32-value block int8 values (in the
    kernels' slot order), the scale and the block's sum. What `gemv` takes."""
    t, k = _check_x(x, None)
    xq = torch.empty(t, activation_row_bytes(k), dtype=torch.uint8)  # [T, row bytes]
    _lib().loraplex_quantize_activations(x.data_ptr(), x.stride(0), t, k, xq.data_ptr(), torch.get_num_threads())
    return xq


def gemv(xq: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
         accumulate: bool = False) -> torch.Tensor:
    """out [T, N] = (out if accumulate) + quantized activations xq [T, ...] . qw^T (+ bias [N]).
    `out` (when given) is fp32 [T, N] with a unit stride along N. Returns `out` or a new tensor."""
    k = qw.in_features
    if (xq.dtype is not torch.uint8 or xq.dim() != 2 or xq.shape[1] != activation_row_bytes(k)
            or not xq.is_contiguous()):
        raise ValueError(f"gemv takes xq from quantize_activations: contiguous uint8 [T, "
                         f"{activation_row_bytes(k)}] for in_features {k}; got {xq.dtype} {tuple(xq.shape)}")
    t = xq.shape[0]
    out = _check_out(out, t, qw.out_features, accumulate)
    _check_bias(bias, qw.out_features)
    fn = _lib().loraplex_q4_1_gemv if qw.kind == "q4_1" else _lib().loraplex_q8_0_gemv
    fn(qw.data.data_ptr(), qw.out_features, k, xq.data_ptr(), t, _ptr(bias), out.data_ptr(), out.stride(0),
       int(accumulate), torch.get_num_threads())
    return out


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
           accumulate: bool = False) -> torch.Tensor:
    """`x @ W.T + bias` for x [T, K] fp32 (unit stride along K) and the quantized W [N, K]:
    activations quantized per block, then the integer GEMV, one call. Meant for T <= 4 (each weight
    row is read once per 4 tokens); any T works. With `out` [T, N] and `accumulate`, adds into it."""
    t, k = _check_x(x, qw)
    out = _check_out(out, t, qw.out_features, accumulate)
    _check_bias(bias, qw.out_features)
    _lib().loraplex_quant_linear(_KIND_CODES[qw.kind], qw.data.data_ptr(), qw.out_features, k, x.data_ptr(),
                                 x.stride(0), t, _ptr(bias), out.data_ptr(), out.stride(0), int(accumulate),
                                 torch.get_num_threads())
    return out


def dequantize(qw: QuantizedWeight, rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [N, K] of the whole weight, or [R, K] of rows `rows` (int64 [R]); exactly gguf's values.
    `out` (when given) is fp32 [N or R, K] with a unit stride along K, e.g. a reused scratch buffer."""
    if rows is not None:
        if rows.dtype is not torch.int64 or rows.dim() != 1 or rows.device.type != "cpu":
            raise ValueError(f"rows must be a 1-D int64 CPU tensor; got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.contiguous()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= qw.out_features):
            raise IndexError(f"rows out of range [0, {qw.out_features}): {int(rows.min())}..{int(rows.max())}")
    n = qw.out_features if rows is None else rows.numel()
    if out is None:
        out = torch.empty(n, qw.in_features, dtype=torch.float32)  # [n, K]
    elif (out.dtype is not torch.float32 or tuple(out.shape) != (n, qw.in_features) or out.stride(1) != 1
          or out.device.type != "cpu"):
        raise ValueError(f"out must be float32 [{n}, {qw.in_features}] with a unit stride along K; got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    fn = _lib().loraplex_dequantize_q4_1 if qw.kind == "q4_1" else _lib().loraplex_dequantize_q8_0
    fn(qw.data.data_ptr(), qw.in_features, _ptr(rows), n, out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out


def embedding(ids: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The embeddings fp32 [T, K] of token ids [T] (int64) from a quantized table [vocab, K]."""
    if ids.dim() != 1:
        raise ValueError(f"embedding takes token ids [T]; got shape {tuple(ids.shape)}")
    return dequantize(qw, rows=ids)


# ---------------------------------------------------------------------------------------------
# the layout (csrc/quant_cpu.h describes it; this is its numpy form, for repacking)


@dataclass(frozen=True)
class _Layout:
    """Where each byte of a repacked row comes from, for one kind and K (arrays over the row)."""

    value_bytes: np.ndarray  # q8_0: the byte of each value [K] (by value index)
    nibble_bytes: np.ndarray  # q4_1: the nibble bytes [K / 2] ...
    low_values: np.ndarray  # ... the value in each one's low nibble [K / 2]
    high_values: np.ndarray  # ... and in its high nibble [K / 2]
    d_bytes: np.ndarray  # the 2 bytes of each block's fp16 d [nb * 2], block order
    m_bytes: np.ndarray  # q4_1: the same for m


def slot_values(n_blocks: int) -> np.ndarray:
    """The value index (within a region of `n_blocks` blocks) of each slot: a super-block (16
    blocks) interleaves the blocks 4 values at a time, pairs and single blocks keep value order."""
    s = np.arange(BLOCK * n_blocks)
    return BLOCK * ((s % 64) // 4) + 4 * (s // 64) + s % 4 if n_blocks == SUPER else s


def regions(in_features: int) -> list[int]:
    """Blocks per region of a row, in order: super-blocks of 16, pairs, a last single block."""
    nb = in_features // BLOCK
    return [SUPER] * (nb // SUPER) + [2] * (nb % SUPER // 2) + [1] * (nb % 2)


def activation_slots(in_features: int) -> np.ndarray:
    """The value index of each byte of a row of quantized activations' int8 part [K]."""
    parts, block = [], 0
    for n in regions(in_features):
        parts.append(block * BLOCK + slot_values(n))
        block += n
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@functools.cache
def _layout(kind: str, in_features: int) -> _Layout:
    value_bytes, nibble_bytes, low, high, d_bytes, m_bytes = [], [], [], [], [], []
    block = offset = 0
    for n in regions(in_features):
        values = block * BLOCK + slot_values(n)  # by slot
        scales = offset + (16 if kind == "q4_1" else 32) * n + np.arange(2 * n)  # d bytes, block order
        if kind == "q4_1":
            half = min(64, 16 * n)  # a byte holds slots s and s + half (s % 2 half < half)
            s = np.arange(BLOCK * n).reshape(-1, 2, half)  # [chunks, low/high, half]
            nibble_bytes.append(offset + half * np.arange(s.shape[0])[:, None] + np.arange(half)[None, :])
            low.append(values[s[:, 0]])
            high.append(values[s[:, 1]])
            d_bytes.append(scales)
            m_bytes.append(scales + 2 * n)
        else:
            order = np.empty(BLOCK * n, dtype=np.int64)
            order[values - block * BLOCK] = offset + np.arange(BLOCK * n)  # value -> its byte
            value_bytes.append(order)
            d_bytes.append(scales)
        block += n
        offset += BLOCK_BYTES[kind] * n

    def flat(parts: list) -> np.ndarray:
        return np.concatenate([np.asarray(p).ravel() for p in parts]) if parts else np.zeros(0, dtype=np.int64)

    return _Layout(flat(value_bytes), flat(nibble_bytes), flat(low), flat(high), flat(d_bytes), flat(m_bytes))


def _gguf_values(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF blocks [N, nb, bytes] -> (stored values uint8 [N, K] in value order, scale bytes)."""
    n = blocks.shape[0]
    if kind == "q4_1":  # fp16 d, fp16 m, 16 bytes: value j low nibble, value j + 16 high
        qs = blocks[:, :, 4:]
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # [N, nb, 32]
        return values.reshape(n, -1), blocks[:, :, :4]
    # fp16 d, 32 int8 values; kept as u = q + 128
    return (blocks[:, :, 2:] ^ 0x80).reshape(n, -1), blocks[:, :, :2]


# ---------------------------------------------------------------------------------------------
# checks and the library


def _kind_of(ggml_type: GGMLQuantizationType | int) -> str:
    try:
        ggml_type = GGMLQuantizationType(int(ggml_type))
    except ValueError:
        raise ValueError(f"unknown ggml type {ggml_type!r}; the quantized CPU kernels take "
                         f"{', '.join(t.name for t in GGUF_TYPES)}") from None
    if ggml_type not in GGUF_TYPES:
        raise ValueError(f"the quantized CPU kernels take {', '.join(t.name for t in GGUF_TYPES)} weights, "
                         f"not {ggml_type.name}")
    return GGUF_TYPES[ggml_type]


def _check_kind(kind: str) -> None:
    if kind not in BLOCK_BYTES:
        raise ValueError(f"kind must be one of {', '.join(BLOCK_BYTES)}; got {kind!r}")


def _check_k(k: int) -> None:
    if k <= 0 or k % BLOCK:
        raise ValueError(f"in_features K={k} must be a positive multiple of {BLOCK} (the GGUF block size)")


def _check_x(x: torch.Tensor, qw: QuantizedWeight | None) -> tuple[int, int]:
    if x.dtype is not torch.float32 or x.dim() != 2 or x.device.type != "cpu" or x.stride(1) != 1:
        raise ValueError(f"x must be a float32 CPU tensor [T, K] with a unit stride along K; got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()} on {x.device}")
    t, k = x.shape
    if qw is not None and k != qw.in_features:
        raise ValueError(f"x [T, {k}] does not match the weight [{qw.out_features}, {qw.in_features}]")
    _check_k(k)
    return t, k


def _check_out(out: torch.Tensor | None, t: int, n: int, accumulate: bool) -> torch.Tensor:
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an `out` to add into")
        return torch.empty(t, n, dtype=torch.float32)  # [T, N]
    if out.dtype is not torch.float32 or tuple(out.shape) != (t, n) or out.stride(1) != 1 or out.device.type != "cpu":
        raise ValueError(f"out must be float32 [{t}, {n}] with a unit stride along N; got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")
    return out


def _check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None and (bias.dtype is not torch.float32 or tuple(bias.shape) != (n,) or not bias.is_contiguous()
                             or bias.device.type != "cpu"):
        raise ValueError(f"bias must be a contiguous float32 CPU tensor [{n}]; got {bias.dtype} {tuple(bias.shape)}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the quantized CPU kernels are unavailable (LORAPLEX_CPU_KERNEL=0 or no C++ compiler); "
                           "dequantize the GGUF weights instead (dequantize_gguf)")
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    return load_library(SOURCE, _SIGNATURES, "The quantized CPU kernels are", "GGUF weights will be dequantized")[0]
