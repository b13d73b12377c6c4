"""The native CPU kernel against the reference (mirrors loraplex/kernels/native_cpu.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from lora_cases import assert_close, inactive_rows, make_case, reference_expand, reference_shrink
from loraplex.kernels import dispatch, lora_apply, lora_expand, lora_shrink, native_cpu, resolve_backend

# Without a C++ compiler the CPU path is torch's, and only the tests of that fallback apply.
needs_kernel = pytest.mark.skipif(
    not native_cpu.available(), reason=f"the native CPU kernel is unavailable: {native_cpu.unavailable_reason()}"
)

RANKS = (1, 5, 16, 64)
HIDDEN = (7, 64, 129)  # below, at and past the kernel's SIMD width
SLOTS = (1, 3, 64)
WIDTHS = ((24,), (24, 8), (70, 8, 8), (24, 0, 8), (130,))  # column blocks of 64 and partial ones
PATTERNS = ("decode", "prefill", "spread", "ordered", "none")
GRID = list(itertools.product(RANKS, HIDDEN, SLOTS, WIDTHS))


def _native(case, threads: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shrink, expand of the reference y, apply) through the public operations."""
    mapping = case.mapping()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = torch.full((case.x.shape[0], case.lora_a.shape[1]), float("nan"))
        lora_shrink(case.x, case.lora_a, None, case.n_slices, y, mapping=mapping, backend="cpu")
        expanded = lora_expand(
            reference_shrink(case), case.lora_b, None, case.base.clone(), case.offsets, mapping=mapping, backend="cpu"
        )
        applied = lora_apply(case.x, case.lora_a, case.lora_b, mapping, case.base.clone(), case.offsets, backend="cpu")
    finally:
        torch.set_num_threads(previous)
    return y, expanded, applied


@needs_kernel
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-weights"])
@pytest.mark.parametrize(("rank", "hidden", "slots", "widths"), GRID)
def test_matches_reference(rank: int, hidden: int, slots: int, widths: tuple[int, ...], weight_dtype) -> None:
    """fp32 tokens; the weights fp32 or bf16 (lora_dtype), which the reference widens the same way."""
    pattern = PATTERNS[GRID.index((rank, hidden, slots, widths)) % len(PATTERNS)]
    case = make_case(
        12, hidden, rank, slots, widths, slots=pattern, seed=rank + hidden + slots, b_transposed=True,
        weight_dtype=weight_dtype,
    )
    y_ref = reference_shrink(case)
    out_ref = reference_expand(case, y_ref)
    y, expanded, applied = _native(case)
    assert_close(y, y_ref)
    assert_close(expanded, out_ref)
    assert_close(applied, out_ref)
    assert torch.equal(applied[inactive_rows(case)], case.base[inactive_rows(case)])


@needs_kernel
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-weights"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pattern", ["decode", "prefill", "ordered"])
def test_parallel_region_matches_reference(threads: int, pattern: str, weight_dtype: torch.dtype) -> None:
    """Big enough to fork: runs longer than a token block, slots spread over the items."""
    case = make_case(
        70, 576, 16, 8, (576, 192, 192), slots=pattern, seed=threads, b_transposed=True, weight_dtype=weight_dtype
    )
    y_ref = reference_shrink(case)
    out_ref = reference_expand(case, y_ref)
    for result in _native(case, threads):
        assert_close(result, y_ref if result.shape == y_ref.shape else out_ref)


@needs_kernel
def test_strided_rows_of_x_and_out() -> None:
    """Rows of a wider tensor (a packed projection's output, a slice of activations)."""
    case = make_case(9, 40, 8, 3, (16, 8), b_transposed=True)
    wide_x = torch.randn(9, 100)
    wide_x[:, 30:70] = case.x
    wide_out = torch.randn(9, 60)
    wide_out[:, 11:35] = case.base
    expected = reference_expand(case, reference_shrink(case))
    lora_apply(wide_x[:, 30:70], case.lora_a, case.lora_b, case.mapping(), wide_out[:, 11:35], case.offsets, backend="cpu")
    assert_close(wide_out[:, 11:35], expected)


@needs_kernel
def test_automatic_choice_takes_it_for_float32_only() -> None:
    fp32 = make_case(6, 32, 4, 2, (16,), b_transposed=True)
    assert resolve_backend(fp32.x.device) == "cpu"
    out = lora_apply(fp32.x, fp32.lora_a, fp32.lora_b, fp32.mapping(), fp32.base.clone(), fp32.offsets)
    assert_close(out, reference_expand(fp32, reference_shrink(fp32)))
    bf16 = make_case(6, 32, 4, 2, (16,), dtype=torch.bfloat16, b_transposed=True)  # automatic: torch serves it
    out = lora_apply(bf16.x, bf16.lora_a, bf16.lora_b, bf16.mapping(), bf16.base.clone(), bf16.offsets)
    assert_close(out, reference_expand(bf16, reference_shrink(bf16)))


@needs_kernel
@pytest.mark.parametrize(
    ("case_kwargs", "message"),
    [
        (dict(dtype=torch.bfloat16, b_transposed=True), r"it takes float32 activations only, and x, out are not"),
        (dict(weight_dtype=torch.float16, b_transposed=True), r"float32 or bfloat16 weights only, not torch.float16"),
        (dict(b_transposed=False), r"lora_b \[S, N, R\] must be stored transposed"),
    ],
)
def test_operands_it_cannot_take_are_refused_by_name(case_kwargs: dict, message: str) -> None:
    case = make_case(6, 32, 4, 2, (16,), **case_kwargs)
    with pytest.raises(ValueError, match=rf"LoRA backend 'cpu' cannot run these operands: .*{message}.* Use backend 'torch'"):
        lora_apply(case.x, case.lora_a, case.lora_b, case.mapping(), case.base.clone(), case.offsets, backend="cpu")
    # the automatic choice falls back to torch and still gives the right answer
    out = lora_apply(case.x, case.lora_a, case.lora_b, case.mapping(), case.base.clone(), case.offsets)
    assert_close(out, reference_expand(case, reference_shrink(case)))


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """A process that has not built or loaded the kernel yet, with its own cache directory."""
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    native_cpu._library.cache_clear()
    yield tmp_path
    native_cpu._library.cache_clear()


def test_without_a_compiler_the_cpu_path_is_torch(fresh_build, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    assert not native_cpu.available()
    assert "no-such-compiler" in native_cpu.unavailable_reason()
    assert resolve_backend(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match=r"backend 'cpu' was requested but the native CPU kernel is unavailable .*"
                       r"Install a C\+\+ compiler, or use backend 'torch'"):
        resolve_backend(torch.device("cpu"), "cpu")
    case = make_case(6, 32, 4, 2, (16,), b_transposed=True)
    out = lora_apply(case.x, case.lora_a, case.lora_b, case.mapping(), case.base.clone(), case.offsets)
    assert_close(out, reference_expand(case, reference_shrink(case)))
    assert not list(fresh_build.rglob("*.so")) and not list(fresh_build.rglob("*.tmp*"))  # nothing half-built left


@needs_kernel  # a compiler to fail with
def test_a_compile_error_names_the_compiler_and_leaves_nothing(fresh_build, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = fresh_build / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native_cpu, "SOURCE", broken)
    assert not native_cpu.available()
    assert "failed to build broken.cpp" in native_cpu.unavailable_reason()
    assert not list((fresh_build / "kernels").iterdir())


def test_disabled_by_the_environment(fresh_build, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_CPU_KERNEL", "0")
    assert not native_cpu.available()
    assert native_cpu.unavailable_reason() == "disabled by LORAPLEX_CPU_KERNEL=0"
    assert dispatch.resolve_backend(torch.device("cpu")) == "torch"


@needs_kernel
def test_built_once_then_loaded_from_the_cache(fresh_build, monkeypatch: pytest.MonkeyPatch) -> None:
    assert native_cpu.available()
    (built,) = (fresh_build / "kernels").glob("lora_cpu-*.so")
    native_cpu._library.cache_clear()  # as in a new process: the compiler must not run again
    monkeypatch.setattr(native_cpu.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached kernel"))
    assert native_cpu.available() and native_cpu.build_library() == built
