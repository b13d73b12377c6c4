"""The quantized-weight CPU kernels (GGUF Q4_1 and Q8_0) against gguf's own dequantization and a
numpy reference of the same integer arithmetic."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize

from loraplex.kernels import quant_cpu

pytestmark = pytest.mark.skipif(not quant_cpu.available(), reason="no C++ compiler for the native CPU kernels")

TYPES = {"q4_1": GT.Q4_1, "q8_0": GT.Q8_0}
# K: one block, a pair, a pair and a single, a super-block and a pair (the model's 576), a super-block,
# two pairs and a single, three super-blocks (the model's 1536)
KS = [32, 64, 96, 576, 672, 1536]


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(*values.shape, 2)


def random_gguf(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """GGUF bytes [n, k / 32 * block bytes]: random values, fp16 scales of both signs, some of them
    subnormal or zero."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    scale = rng.choice([0.0, 3e-7, -2e-5, 1e-3, -0.02, 0.05, 0.7], size=(n, nb)) * rng.uniform(0.5, 1.5, size=(n, nb))
    if kind == "q4_1":
        blocks = rng.integers(0, 256, size=(n, nb, 20), dtype=np.uint8)
        blocks[:, :, 0:2] = fp16_bytes(np.abs(scale))
        blocks[:, :, 2:4] = fp16_bytes(rng.uniform(-1, 1, size=(n, nb)))
    else:
        blocks = rng.integers(0, 256, size=(n, nb, 34), dtype=np.uint8)
        blocks[:, :, 2:4] = 0x80  # value -128 (-128 and 127 must both work)
        blocks[:, :, 4:5] = 0x7F
        blocks[:, :, 0:2] = fp16_bytes(scale)
    return blocks.reshape(n, -1)


def gguf_fp32(raw: np.ndarray, kind: str, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, TYPES[kind]))).reshape(n, k)


def gguf_ints(raw: np.ndarray, kind: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored values [n, nb, 32] as int64, d [n, nb], m [n, nb] (zero for Q8_0)) in float64."""
    nb = k // 32
    blocks = raw.reshape(n, nb, -1)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if kind == "q4_1":
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        qs = blocks[:, :, 4:]
        return np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.int64), d, m
    return blocks[:, :, 2:].view(np.int8).astype(np.int64), d, np.zeros_like(d)


def reference_quantization(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's Q8_1 of x [T, K] in fp32 (rounding to nearest even): q [T, nb, 32], d, s [T, nb]."""
    t, k = x.shape
    xb = x.numpy().reshape(t, k // 32, 32)
    d = np.abs(xb).max(axis=2) / np.float32(127)  # float32
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[:, :, None]).astype(np.int64)
    return q, d, (d * q.sum(axis=2).astype(np.float32)).astype(np.float32)


def slot_values(k: int) -> np.ndarray:
    """The value index of each int8 of a quantized activation row (the layout of csrc/quant_cpu.h,
    written out independently): super-blocks of 16 blocks interleaved 4 values at a time, then
    pairs and a single block in value order."""
    out, block, nb = [], 0, k // 32
    while nb - block >= 16:
        s = np.arange(512)
        out.append(32 * block + 32 * ((s % 64) // 4) + 4 * (s // 64) + s % 4)
        block += 16
    out.append(np.arange(32 * block, k))
    return np.concatenate(out)


def unpack_activations(xq: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's quantized activations as (q [T, nb, 32], d, s, qsum [T, nb]) in value order."""
    raw = xq.numpy()
    nb = k // 32
    q = np.empty((raw.shape[0], k), dtype=np.int64)
    q[:, slot_values(k)] = raw[:, :k].view(np.int8)
    d = raw[:, k : k + 4 * nb].copy().view(np.float32)
    s = raw[:, k + 4 * nb : k + 8 * nb].copy().view(np.float32)
    qsum = raw[:, k + 8 * nb : k + 12 * nb].copy().view(np.int32)
    return q.reshape(-1, nb, 32), d, s, qsum


def reference_gemv(raw: np.ndarray, kind: str, n: int, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(y [T, n], sum of the terms' magnitudes [T, n]) of the kernels' integer arithmetic, in float64:
    sum over blocks of d * dx * sum(q * qx) + m * sx."""
    k = x.shape[1]
    qw, dw, mw = gguf_ints(raw, kind, n, k)
    qx, dx, sx = reference_quantization(x)
    isum = np.einsum("nbi,tbi->tnb", qw, qx).astype(np.float64)  # [T, n, nb]
    terms = (dw[None] * dx[:, None].astype(np.float64) * isum, mw[None] * sx[:, None].astype(np.float64))
    return (terms[0] + terms[1]).sum(axis=2), (np.abs(terms[0]) + np.abs(terms[1])).sum(axis=2)


@pytest.fixture(scope="module")
def model() -> dict[str, gguf.ReaderTensor]:
    from loraplex.model_loader.embedded import gguf_path

    return {t.name: t for t in gguf.GGUFReader(gguf_path()).tensors}


def shape(tensor: gguf.ReaderTensor) -> tuple[int, int]:
    k, n = (int(s) for s in tensor.shape)  # ggml lists the fastest dimension first
    return n, k


# ---------------------------------------------------------------------------------------------
# dequantization: exactly gguf's values


@pytest.mark.parametrize("name", ["blk.3.ffn_down.weight", "blk.0.attn_k.weight"])  # K = 1536, 576
def test_dequantize_equals_gguf_for_the_embedded_q4_1_weights(model, name: str) -> None:
    tensor = model[name]
    assert tensor.tensor_type == GT.Q4_1
    qw = quant_cpu.from_gguf(tensor.data, tensor.tensor_type, shape(tensor))
    assert qw.kind == "q4_1" and qw.shape == shape(tensor) and qw.nbytes == tensor.n_bytes  # no byte added
    assert torch.equal(quant_cpu.dequantize(qw), gguf_fp32(tensor.data, "q4_1", *shape(tensor)))


def test_embedding_rows_equal_gguf_for_the_embedded_q8_0_table(model) -> None:
    tensor = model["token_embd.weight"]
    n, k = shape(tensor)
    assert tensor.tensor_type == GT.Q8_0 and (n, k) == (49152, 576)
    rows = slice(20000, 20300)  # a slice of the table, repacked alone
    part = quant_cpu.from_gguf(tensor.data[rows], tensor.tensor_type, (300, k))
    expected = gguf_fp32(tensor.data[rows], "q8_0", 300, k)
    assert torch.equal(quant_cpu.dequantize(part), expected)
    ids = torch.tensor([299, 0, 17, 17, 150])
    assert torch.equal(quant_cpu.embedding(ids, part), expected[ids])


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("k", KS)
def test_dequantize_equals_gguf_for_random_blocks(kind: str, k: int) -> None:
    raw = random_gguf(kind, 23, k, seed=k)
    qw = quant_cpu.from_gguf(raw, TYPES[kind], (23, k))
    expected = gguf_fp32(raw, kind, 23, k)
    assert torch.equal(quant_cpu.dequantize(qw), expected)
    rows = torch.tensor([22, 3, 3, 0])
    assert torch.equal(quant_cpu.dequantize(qw, rows), expected[rows])
    out = torch.full((30, k + 5), float("nan"))[3:7, 2 : k + 2]  # into a strided view
    quant_cpu.dequantize(qw, rows, out=out)
    assert torch.equal(out, expected[rows])


# ---------------------------------------------------------------------------------------------
# activations and the GEMV


@pytest.mark.parametrize("k", KS)
def test_activation_quantization_is_llama_cpp_q8_1(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=gen) * torch.rand(3, k, generator=gen).exp()
    x[1, :32] = 0.0  # a zero block: scale 0, values 0
    x[2, 32 : min(k, 64)] = -7.5
    q, d, s, qsum = unpack_activations(quant_cpu.quantize_activations(x), k)
    q_ref, d_ref, s_ref = reference_quantization(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(qsum, q_ref.sum(axis=2))
    assert np.abs(q).max() <= 127
    assert quant_cpu._lib().loraplex_quant_activation_row_bytes(k) == quant_cpu.activation_row_bytes(k)
    np.testing.assert_array_equal(quant_cpu.activation_slots(k), slot_values(k))  # the module's layout helper agrees


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("k", KS)
def test_gemv_is_the_integer_arithmetic_and_close_to_the_float_product(kind: str, k: int) -> None:
    n = 37  # odd
    raw = random_gguf(kind, n, k, seed=k + 1)
    qw = quant_cpu.from_gguf(raw, TYPES[kind], (n, k))
    weight = gguf_fp32(raw, kind, n, k)
    gen = torch.Generator().manual_seed(k)
    for tokens in range(1, 6):  # groups of 4 tokens and a rest
        x = torch.randn(tokens, k, generator=gen)
        y = quant_cpu.linear(x, qw)
        expected, magnitude = reference_gemv(raw, kind, n, x)
        assert np.all(np.abs(y.numpy() - expected) <= 1e-5 * magnitude + 1e-30), (tokens, kind, k)
        # against x @ W.T in fp64: each activation is off by at most half its block's step
        # (max|x| / 254), so the output by at most that times the sum of |w| over the block
        exact = x.double() @ weight.double().T
        step = x.reshape(tokens, -1, 32).abs().amax(dim=2).double() / 254  # [T, nb]
        bound = torch.einsum("tb,nb->tn", step, weight.double().abs().reshape(n, -1, 32).sum(dim=2))
        assert torch.all((y.double() - exact).abs() <= bound * 1.001 + 1e-6 * exact.abs() + 1e-6)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_bias_accumulate_and_a_strided_batch(kind: str) -> None:
    n, k = 41, 576
    qw = quant_cpu.from_gguf(random_gguf(kind, n, k, seed=5), TYPES[kind], (n, k))
    x = torch.randn(3, 2 * k)[:, k:]  # rows 2K apart
    bias = torch.randn(n)
    plain = quant_cpu.linear(x.contiguous(), qw)
    torch.testing.assert_close(quant_cpu.linear(x, qw, bias), plain + bias, rtol=0, atol=1e-5)
    out = torch.randn(3, 2 * n)[:, :n]  # a strided output, added into
    before = out.clone()
    quant_cpu.linear(x, qw, bias, out=out, accumulate=True)
    torch.testing.assert_close(out, before + plain + bias, rtol=1e-6, atol=1e-5)
    xq = quant_cpu.quantize_activations(x)  # the same through the two-step path
    assert torch.equal(quant_cpu.gemv(xq, qw, bias), quant_cpu.linear(x, qw, bias))


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_one_and_two_threads_agree(kind: str) -> None:
    n, k = 301, 576  # over the kernels' threshold for going parallel
    qw = quant_cpu.from_gguf(random_gguf(kind, n, k, seed=9), TYPES[kind], (n, k))
    x = torch.randn(5, k)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quant_cpu.linear(x, qw), quant_cpu.dequantize(qw)
        torch.set_num_threads(2)
        two = quant_cpu.linear(x, qw), quant_cpu.dequantize(qw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # each row is computed alike


def test_the_embedded_model_weights_through_the_gemv(model) -> None:
    """A real Q4_1 projection and the Q8_0 LM head (which is the embedding table) at batch 1."""
    gen = torch.Generator().manual_seed(0)
    for name in ["blk.7.ffn_gate.weight", "blk.7.ffn_down.weight"]:
        tensor = model[name]
        n, k = shape(tensor)
        qw = quant_cpu.from_gguf(tensor.data, tensor.tensor_type, (n, k))
        x = torch.randn(1, k, generator=gen)
        expected, magnitude = reference_gemv(tensor.data, "q4_1", n, x)
        assert np.all(np.abs(quant_cpu.linear(x, qw).numpy() - expected) <= 1e-5 * magnitude)
    head = model["token_embd.weight"]
    rows = slice(0, 4096)
    qw = quant_cpu.from_gguf(head.data[rows], head.tensor_type, (4096, 576))
    x = torch.randn(2, 576, generator=gen)
    expected, magnitude = reference_gemv(head.data[rows], "q8_0", 4096, x)
    assert np.all(np.abs(quant_cpu.linear(x, qw).numpy() - expected) <= 1e-5 * magnitude)


# ---------------------------------------------------------------------------------------------
# rows: reorder and stack


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_row_reindex_and_concat_are_exact(kind: str) -> None:
    k = 576
    q = quant_cpu.from_gguf(random_gguf(kind, 12, k, seed=1), TYPES[kind], (12, k))
    kv = quant_cpu.from_gguf(random_gguf(kind, 4, k, seed=2), TYPES[kind], (4, k))
    order = torch.tensor([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11])  # e.g. undoing a rotary row permutation
    permuted = quant_cpu.permute_rows(q, order)
    assert torch.equal(quant_cpu.dequantize(permuted), quant_cpu.dequantize(q)[order])
    fused = quant_cpu.concat_rows([permuted, kv, kv])
    assert fused.shape == (20, k) and fused.nbytes == 20 * quant_cpu.row_bytes(kind, k)
    assert torch.equal(quant_cpu.dequantize(fused),
                       torch.cat([quant_cpu.dequantize(permuted), quant_cpu.dequantize(kv), quant_cpu.dequantize(kv)]))
    x = torch.randn(2, k)
    parts = [quant_cpu.linear(x, w) for w in (permuted, kv, kv)]
    assert torch.equal(quant_cpu.linear(x, fused), torch.cat(parts, dim=1))  # rows are independent


# ---------------------------------------------------------------------------------------------
# refusals


def test_bad_inputs_are_refused_with_the_reason() -> None:
    raw = random_gguf("q4_1", 4, 64)
    qw = quant_cpu.from_gguf(raw, GT.Q4_1, (4, 64))
    with pytest.raises(ValueError, match="Q4_1, Q8_0 weights, not Q4_0"):
        quant_cpu.from_gguf(raw, GT.Q4_0, (4, 64))
    with pytest.raises(ValueError, match="Q4_1, Q8_0 weights, not F16"):
        quant_cpu.from_gguf(raw, GT.F16, (4, 64))
    with pytest.raises(ValueError, match="K=48 must be a positive multiple of 32"):
        quant_cpu.from_gguf(raw[:, :30], GT.Q4_1, (4, 48))
    with pytest.raises(ValueError, match=r"is 160 bytes of uint8 \(4 rows of 40\)"):
        quant_cpu.from_gguf(raw[:3], GT.Q4_1, (4, 64))
    with pytest.raises(ValueError, match="x must be a float32"):
        quant_cpu.linear(torch.randn(1, 64, dtype=torch.float64), qw)
    with pytest.raises(ValueError, match="unit stride along K"):
        quant_cpu.linear(torch.randn(64, 2).T, qw)
    with pytest.raises(ValueError, match=r"x \[T, 96\] does not match the weight \[4, 64\]"):
        quant_cpu.linear(torch.randn(1, 96), qw)
    with pytest.raises(ValueError, match="K=48 must be a positive multiple of 32"):
        quant_cpu.quantize_activations(torch.randn(1, 48))
    with pytest.raises(ValueError, match=r"bias must be a contiguous float32 CPU tensor \[4\]"):
        quant_cpu.linear(torch.randn(1, 64), qw, torch.randn(5))
    with pytest.raises(ValueError, match="accumulate=True needs an `out`"):
        quant_cpu.linear(torch.randn(1, 64), qw, accumulate=True)
    with pytest.raises(ValueError, match="xq from quantize_activations"):
        quant_cpu.gemv(quant_cpu.quantize_activations(torch.randn(1, 96)), qw)
    with pytest.raises(IndexError, match=r"rows out of range \[0, 4\): 0..4"):
        quant_cpu.embedding(torch.tensor([0, 4]), qw)
    with pytest.raises(ValueError, match="1-D int64"):
        quant_cpu.embedding(torch.tensor([0, 1], dtype=torch.int32), qw)
    with pytest.raises(ValueError, match="one kind and in_features"):
        quant_cpu.concat_rows([qw, quant_cpu.from_gguf(random_gguf("q4_1", 2, 96), GT.Q4_1, (2, 96))])
    with pytest.raises(ValueError, match=r"rows in \[0, 4\)"):
        quant_cpu.permute_rows(qw, [0, 4])
    with pytest.raises(ValueError, match="contiguous uint8 CPU tensor"):
        quant_cpu.QuantizedWeight("q4_1", 4, 64, torch.zeros(4, 41, dtype=torch.uint8))


def test_unavailable_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_CPU_KERNEL", "0")
    quant_cpu._library.cache_clear()
    try:
        assert not quant_cpu.available()
        with pytest.raises(RuntimeError, match="unavailable"):
            quant_cpu.linear(torch.randn(1, 64), quant_cpu.from_gguf(random_gguf("q8_0", 2, 64), GT.Q8_0, (2, 64)))
    finally:
        quant_cpu._library.cache_clear()


# ---------------------------------------------------------------------------------------------
# the other code paths, built here with fewer instruction sets


COMPILER = shutil.which("c++") or shutil.which("g++")


def _x86_with_avx2() -> bool:
    try:
        return COMPILER is not None and "avx2" in Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False


X86 = _x86_with_avx2()


@pytest.mark.skipif(not X86, reason="the fallbacks are built for x86 (AVX2 and plain x86-64)")
def test_the_avx2_and_scalar_paths_compute_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    cases = []
    for kind in ("q4_1", "q8_0"):
        for k in (96, 576, 672):
            raw = random_gguf(kind, 9, k, seed=k + 3)
            qw = quant_cpu.from_gguf(raw, TYPES[kind], (9, k))
            x = torch.randn(5, k)
            cases.append((qw, x, quant_cpu.dequantize(qw), quant_cpu.quantize_activations(x), quant_cpu.linear(x, qw)))
    for name, flags in (("avx2", ["-march=haswell"]), ("scalar", ["-march=x86-64"])):
        target = tmp_path / f"{name}.so"
        subprocess.run([COMPILER, "-O1", "-std=c++17", "-fopenmp", "-fPIC", "-shared", *flags, str(quant_cpu.SOURCE),
                        "-o", str(target)], check=True, capture_output=True, timeout=120)
        lib = ctypes.CDLL(str(target))
        for fn, (argtypes, restype) in quant_cpu._SIGNATURES.items():
            getattr(lib, fn).argtypes, getattr(lib, fn).restype = argtypes, restype
        monkeypatch.setattr(quant_cpu, "_library", lambda lib=lib: lib)
        assert quant_cpu.isa() == name
        for qw, x, weight, xq, y in cases:
            assert torch.equal(quant_cpu.dequantize(qw), weight)
            used = qw.in_features + 12 * (qw.in_features // 32)  # K int8, dx, sx, qsum; then padding
            assert torch.equal(quant_cpu.quantize_activations(x)[:, :used], xq[:, :used])
            torch.testing.assert_close(quant_cpu.linear(x, qw), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_the_header_compiles_inside_the_decoder_kernels(tmp_path: Path) -> None:
    """decoder_cpu.cpp may include quant_cpu.h for a fused decode step: no name may clash."""
    csrc = quant_cpu.SOURCE.parent
    unit = tmp_path / "fused.cpp"
    unit.write_text(f'#include "{csrc / "decoder_cpu.cpp"}"\n#include "{csrc / "quant_cpu.h"}"\n'
                    "void f(const float* x, uint8_t* xq) { loraplex_quant::quantize_activations(x, 64, 1, 64, xq, 1); }\n")
    subprocess.run([COMPILER, "-fsyntax-only", "-std=c++17", "-fopenmp", "-march=native", str(unit)], check=True,
                   capture_output=True, timeout=120)
