"""Fixtures of the kernels tests.

The Triton tests run the real kernels on a GPU when there is one, and otherwise on CPU tensors
through Triton's interpreter. `TRITON_INTERPRET` is set here, before Triton is first imported,
and only while a test that asks for the `triton_ops` fixture runs: the interpreter reads it when
the kernels are decorated and again while they run, and no other test should see it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    # These tests use tiny tensors: intra-op threads gain nothing, and on a busy machine
    # OpenMP's spin-waiting made them ~5x slower. Restored afterwards for the rest of the suite.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def triton_ops() -> Iterator[ModuleType]:
    """`loraplex.kernels.triton_ops`, interpreted on CPU when no GPU is present."""
    previous = os.environ.get("TRITON_INTERPRET")
    if not HAS_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        try:
            from loraplex.kernels import triton_ops as module
        except ImportError as exc:
            pytest.skip(f"Triton does not import: {exc}")
        if not HAS_CUDA and not module.INTERPRETED:
            pytest.skip("the Triton kernels were compiled (imported before TRITON_INTERPRET=1) and there is no GPU")
        yield module
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture
def kernel_device() -> str:
    """Where the Triton tests put their tensors."""
    return "cuda" if HAS_CUDA else "cpu"

