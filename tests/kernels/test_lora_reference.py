"""The oracle checked against an independent, vectorised formula (mirrors reference.py)."""

from __future__ import annotations

import pytest
import torch
from lora_cases import make_case
from loraplex.kernels import reference


def _dense_delta(case) -> tuple[torch.Tensor, torch.Tensor]:
    """y and out via a one-hot mix of all slots' weights: no loops, no grouping."""
    slots = case.token_slots
    onehot = torch.nn.functional.one_hot(slots.clamp(min=0), case.lora_a.shape[0]).double()  # [T, S]
    onehot[slots < 0] = 0
    a = torch.einsum("ts,srk->trk", onehot, case.lora_a.double())  # [T, nR, in]
    y = torch.einsum("trk,tk->tr", a, case.x.double())  # [T, nR]
    out = case.base.double().clone()  # [T, N]
    for i in range(case.n_slices):
        lo, hi = case.offsets[i], case.offsets[i + 1]
        b = torch.einsum("ts,snr->tnr", onehot, case.lora_b[:, lo:hi].double())  # [T, N_i, R]
        out[:, lo:hi] += torch.einsum("tnr,tr->tn", b, y[:, i * case.rank : (i + 1) * case.rank])
    return y, out


@pytest.mark.parametrize("widths", [(7,), (9, 4, 4)])
def test_reference_matches_dense_formula(widths: tuple[int, ...]) -> None:
    case = make_case(num_tokens=9, in_features=13, rank=3, num_slots=4, slice_widths=widths, slots="decode")
    mapping = case.mapping()
    y = reference.shrink(case.x, case.lora_a, mapping, case.n_slices, torch.empty(9, 3 * len(widths)))
    out = reference.expand(y, case.lora_b, mapping, case.base.clone(), case.offsets)
    y_dense, out_dense = _dense_delta(case)
    torch.testing.assert_close(y.double(), y_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), out_dense, atol=1e-5, rtol=1e-5)


def test_reference_zeroes_base_rows_of_y_and_leaves_their_output_untouched() -> None:
    case = make_case(num_tokens=6, in_features=8, rank=2, num_slots=2, slice_widths=(5,), slots=[0, -1, 1, -1, 0, 1])
    mapping = case.mapping()
    y = reference.shrink(case.x, case.lora_a, mapping, 1, torch.full((6, 2), float("nan")))
    assert torch.equal(y[[1, 3]], torch.zeros(2, 2))
    out = reference.expand(y, case.lora_b, mapping, case.base.clone(), case.offsets)
    assert torch.equal(out[[1, 3]], case.base[[1, 3]])
