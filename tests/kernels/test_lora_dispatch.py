"""Public operations and backend choice (mirrors loraplex/kernels/dispatch.py)."""

from __future__ import annotations

import pytest
import torch
from lora_cases import assert_close, inactive_rows, make_case, reference_expand, reference_shrink
from loraplex.kernels import (
    LoRABatchMapping,
    bind_lora_apply,
    dispatch,
    get_backend,
    lora_apply,
    lora_expand,
    lora_shrink,
    native_cpu,
    resolve_backend,
    set_backend,
    torch_ops,
    use_backend,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _automatic_backend():
    set_backend(None)
    yield
    set_backend(None)


def test_automatic_choice_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_cpu, "available", lambda: True)
    assert resolve_backend(CPU) == "cpu"
    monkeypatch.setattr(native_cpu, "available", lambda: False)  # no C++ compiler
    assert resolve_backend(CPU) == "torch"
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert resolve_backend(CUDA) == "triton"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert resolve_backend(CUDA) == "torch"


def test_argument_beats_process_choice_which_beats_automatic() -> None:
    automatic = resolve_backend(CPU)
    set_backend("reference")
    assert get_backend() == "reference" and resolve_backend(CPU) == "reference"
    assert resolve_backend(CPU, "torch") == "torch"
    set_backend(None)
    assert get_backend() is None and resolve_backend(CPU) == automatic


def test_use_backend_restores_even_on_error() -> None:
    set_backend("torch")
    with pytest.raises(RuntimeError), use_backend("reference"):
        assert resolve_backend(CPU) == "reference"
        raise RuntimeError("boom")
    assert get_backend() == "torch"


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match=r"set_backend: `backend` must be one of 'reference', 'torch', 'cpu', 'triton'"):
        set_backend("cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 'tritn'"):
        lora_shrink(torch.zeros(1, 4), torch.zeros(1, 2, 4), torch.zeros(1, dtype=torch.int32), 1, backend="tritn")  # type: ignore[arg-type]


def test_triton_without_triton_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_triton_import", lambda: (None, "ImportError: No module named 'triton'"))
    with pytest.raises(ValueError, match=r"does not import \(ImportError: No module.*pip install 'loraplex\[triton\]'"):
        resolve_backend(CUDA, "triton")


def test_triton_on_cpu_needs_the_interpreter(triton_ops, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    with pytest.raises(ValueError, match=r"needs CUDA tensors; got tensors on cpu.*TRITON_INTERPRET=1"):
        resolve_backend(CPU, "triton")


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apply_shrink_expand_agree_with_reference(request, backend: str, dtype: torch.dtype) -> None:
    device = "cpu"
    if backend == "triton":
        request.getfixturevalue("triton_ops")
        device = request.getfixturevalue("kernel_device")
    if backend == "cpu" and (dtype != torch.float32 or not native_cpu.available()):
        pytest.skip("the native CPU kernel takes float32 only (see test_lora_native_cpu.py) and needs a compiler")
    # B stored as the LoRA manager stores it, which the native CPU kernel requires
    case = make_case(9, 40, 8, 3, (16, 8, 8), dtype=dtype, slots="decode", device=device, b_transposed=True)
    y_ref = reference_shrink(case)
    out_ref = reference_expand(case, y_ref)
    mapping = case.mapping()

    y = lora_shrink(case.x, case.lora_a, case.token_slots, 3, backend=backend)  # mapping built inside
    assert y.dtype == dtype and y.shape == (9, 24)
    assert_close(y, y_ref)
    out = lora_expand(y_ref, case.lora_b, None, case.base.clone(), case.offsets, mapping=mapping, backend=backend)
    assert_close(out, out_ref)
    out = lora_apply(case.x, case.lora_a, case.lora_b, mapping, case.base.clone(), list(case.offsets), backend=backend)
    assert_close(out, out_ref)
    assert torch.equal(out[inactive_rows(case)], case.base[inactive_rows(case)])


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
@pytest.mark.parametrize("pattern", ["decode", "prefill"])
def test_weights_stored_in_another_dtype(request, backend: str, pattern: str) -> None:
    """lora_dtype: bf16 weights for fp32 tokens are widened as read, so the result is the fp32
    reference's on the same (bf16-valued) weights."""
    device = "cpu"
    if backend == "triton":
        request.getfixturevalue("triton_ops")
        device = request.getfixturevalue("kernel_device")
    if backend == "cpu" and not native_cpu.available():
        pytest.skip(f"the native CPU kernel is unavailable: {native_cpu.unavailable_reason()}")
    case = make_case(
        20, 48, 8, 3, (16, 8), slots=pattern, device=device, b_transposed=True, weight_dtype=torch.bfloat16
    )
    expected = reference_expand(case, reference_shrink(case))
    mapping = case.mapping()
    out = lora_apply(case.x, case.lora_a, case.lora_b, mapping, case.base.clone(), case.offsets, backend=backend)
    assert_close(out, expected)
    y = lora_shrink(case.x, case.lora_a, None, 2, mapping=mapping, backend=backend)
    assert y.dtype == torch.float32
    assert_close(y, reference_shrink(case))


def test_one_mapping_serves_modules_of_different_shapes() -> None:
    slots = [0, 2, -1, 1, 2]
    qkv = make_case(5, 24, 4, 3, (24, 8, 8), slots=slots, seed=1)
    down = make_case(5, 48, 4, 3, (24,), slots=slots, seed=2)
    mapping = LoRABatchMapping.from_token_slots(torch.tensor(slots), num_slots=3)
    for case in (qkv, down):
        out = lora_apply(case.x, case.lora_a, case.lora_b, mapping, case.base.clone(), case.offsets)
        assert_close(out, reference_expand(case, reference_shrink(case)))


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_bound_apply_serves_later_steps_and_refuses_a_stale_mapping(backend: str) -> None:
    if backend == "cpu" and not native_cpu.available():
        pytest.skip(f"the native CPU kernel is unavailable: {native_cpu.unavailable_reason()}")
    first = make_case(8, 32, 4, 3, (16, 8), b_transposed=True)
    apply = bind_lora_apply(first.x, first.lora_a, first.lora_b, first.mapping(), first.base, first.offsets, backend=backend)
    # a later step: other tokens and slots, the same weights (one slot rewritten in place)
    first.lora_a[1].mul_(-2.0)
    later = make_case(5, 32, 4, 3, (16, 8), slots=[2, -1, 1, 1, 0], seed=7, b_transposed=True)
    later.lora_a, later.lora_b = first.lora_a, first.lora_b
    out = later.base.clone()
    assert apply(later.x, later.mapping(), out) is out
    assert_close(out, reference_expand(later, reference_shrink(later)))
    stale = LoRABatchMapping.from_token_slots([0, 1, 2], 3)  # built for another step's 3 tokens
    with pytest.raises(ValueError, match=r"built for T=5 tokens .* got one for 3"):
        apply(later.x, stale, later.base.clone())


def test_bound_apply_checks_its_operands_once() -> None:
    case = make_case(8, 32, 4, 3, (16, 8))
    with pytest.raises(ValueError, match="slice_offsets"):
        bind_lora_apply(case.x, case.lora_a, case.lora_b, case.mapping(), case.base, (0, 16, 99))


def test_skips_all_work_when_no_token_uses_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("no LoRA work should run")

    monkeypatch.setattr(torch_ops, "shrink", forbidden)
    monkeypatch.setattr(torch_ops, "expand", forbidden)
    case = make_case(4, 16, 4, 2, (8,), slots="none")
    mapping = case.mapping()
    assert not mapping.any_active
    out = case.base.clone()
    assert lora_apply(case.x, case.lora_a, case.lora_b, mapping, out, case.offsets) is out
    assert torch.equal(out, case.base)
    assert torch.equal(lora_expand(torch.ones(4, 4), case.lora_b, case.token_slots, out, case.offsets), case.base)
    y = lora_shrink(case.x, case.lora_a, case.token_slots, 1, torch.full((4, 4), 5.0))
    assert not y.any()


def test_empty_batch() -> None:
    case = make_case(0, 16, 4, 2, (8, 8), slots=[])
    y = lora_shrink(case.x, case.lora_a, case.token_slots, 2)
    assert y.shape == (0, 8)
    out = lora_apply(case.x, case.lora_a, case.lora_b, case.mapping(), case.base.clone(), case.offsets)
    assert out.shape == (0, 16)


def test_float32_out_for_shrink_and_float32_y_for_expand() -> None:
    case = make_case(6, 32, 8, 2, (16,), dtype=torch.bfloat16)
    y = lora_shrink(case.x, case.lora_a, case.token_slots, 1, torch.empty(6, 8))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, reference_shrink(case, torch.float32), atol=2e-2, rtol=2e-2)
    out = lora_expand(y, case.lora_b, case.token_slots, case.base.clone(), case.offsets)
    assert_close(out, reference_expand(case, y))
