"""LoRABatchMapping: grouping of tokens by slot (mirrors loraplex/kernels/mapping.py)."""

from __future__ import annotations

import pytest
import torch
from loraplex.kernels import LoRABatchMapping

SLOTS = [2, -1, 0, 2, 2, 0, -1, 1]


def test_groups_active_tokens_by_slot_in_batch_order() -> None:
    m = LoRABatchMapping.from_token_slots(torch.tensor(SLOTS, dtype=torch.int32), num_slots=4)
    assert m.num_tokens == 8 and m.num_slots == 4 and m.device == torch.device("cpu")
    assert m.token_slots.tolist() == SLOTS
    assert m.sorted_token_ids.tolist() == [2, 5, 7, 0, 3, 4]
    assert m.seg_slots.tolist() == [0, 1, 2] and m.seg_slots_host == (0, 1, 2)
    assert m.seg_indptr.tolist() == [0, 2, 3, 6] and m.seg_indptr_host == (0, 2, 3, 6)
    assert m.slot_indptr.tolist() == [0, 2, 3, 6, 6]  # slot 3 is idle: an empty group
    assert m.token_segment.tolist() == [0, 0, 1, 2, 2, 2]
    assert m.runs_host == ((2, 0, 1), (0, 2, 3), (2, 3, 5), (0, 5, 6), (1, 7, 8))
    assert m.any_active and m.num_active_tokens == 6 and m.num_segments == 3
    assert m.max_slot == 2 and m.max_segment_len == 3 and m.mean_segment_len == 2.0
    for t in (m.token_slots, m.sorted_token_ids, m.seg_indptr, m.seg_slots, m.slot_indptr, m.token_segment):
        assert t.dtype == torch.int32


def _groups(slots: list[int]) -> list[tuple[int, int, int, int, int, bool]]:
    mapping = LoRABatchMapping.from_token_slots(slots, 16)
    return [(g.lo, g.hi, g.max_len, g.start, g.end, g.gather is not None) for g in mapping.slot_groups]


def test_slot_groups_batch_rising_slots_without_copies() -> None:
    # slot order, equal runs: one group whose rows are the padded batch as they stand
    assert _groups([3, 3, 4, 4, 5, 5]) == [(3, 6, 2, 0, 6, False)]
    # base-only tokens and a falling slot start new groups
    assert _groups([-1, 0, 1, -1, 1, 0]) == [(0, 2, 1, 1, 3, False), (1, 2, 1, 4, 5, False), (0, 1, 1, 5, 6, False)]


def test_slot_groups_pad_uneven_runs_and_idle_slots() -> None:
    mapping = LoRABatchMapping.from_token_slots([0, 0, 0, 1, 3], 16)  # slot 2 idle, runs 3, 1, 1
    (group,) = mapping.slot_groups
    assert (group.lo, group.hi, group.max_len, group.start, group.end) == (0, 4, 3, 0, 5)
    # padded position g * 3 + l holds token l of slot g; padding repeats row 0
    assert group.gather.tolist() == [0, 1, 2, 3, 0, 0, 0, 0, 0, 4, 0, 0]
    assert group.scatter.tolist() == [0, 1, 2, 3, 9]


def test_slot_groups_split_where_padding_would_dominate() -> None:
    # a 40-token prompt beside one-token runs would pad every slot to 40 rows
    assert _groups([0] * 40 + [1, 2, 3]) == [(0, 1, 40, 0, 40, False), (1, 4, 1, 40, 43, False)]
    # uneven decode runs pad a little and stay together
    assert _groups([0, 0, 0, 1, 2, 3, 4, 5, 6, 7]) == [(0, 8, 3, 0, 10, True)]
    # more than two idle slots between runs: reading their weights would cost more than a GEMM
    assert _groups([0, 4]) == [(0, 1, 1, 0, 1, False), (4, 5, 1, 1, 2, False)]


def test_segment_tiles_never_straddle_segments_and_are_cached() -> None:
    m = LoRABatchMapping.from_token_slots(SLOTS, num_slots=4)
    tiles, n = m.segment_tiles(2)
    assert n == 4
    assert tiles.tolist() == [[0, 0, 2], [1, 2, 3], [2, 3, 5], [2, 5, 6]]
    assert m.segment_tiles(2)[0] is tiles
    assert m.segment_tiles(16)[0].tolist() == [[0, 0, 2], [1, 2, 3], [2, 3, 6]]


@pytest.mark.parametrize("slots", [[], [-1, -1, -1]], ids=["empty", "all_base"])
def test_no_active_token(slots: list[int]) -> None:
    m = LoRABatchMapping.from_token_slots(torch.tensor(slots, dtype=torch.int64), num_slots=3)
    assert not m.any_active
    assert m.num_tokens == len(slots) and m.num_active_tokens == 0 and m.num_segments == 0
    assert m.max_slot == -1 and m.max_segment_len == 0 and m.runs_host == ()
    assert m.sorted_token_ids.numel() == 0 and m.segment_tiles(16)[1] == 0
    assert m.slot_indptr.tolist() == [0, 0, 0, 0]


def test_accepts_a_list_and_places_tensors_on_the_given_device() -> None:
    m = LoRABatchMapping.from_token_slots([0, 0, 1], num_slots=2, device="meta")
    assert m.device == torch.device("meta") and m.sorted_token_ids.device.type == "meta"
    assert m.seg_indptr_host == (0, 2, 3)  # host facts need no device
    cpu = LoRABatchMapping.from_token_slots([0, 0, 1], num_slots=2)
    assert cpu.to("cpu") is cpu


@pytest.mark.parametrize(
    ("slots", "num_slots", "match"),
    [
        ([0, 3], 3, r"token 1 has slot 3, outside \[-1, 3\)"),
        ([-2, 0], 3, r"token 0 has slot -2"),
        (torch.zeros(2, 2, dtype=torch.int32), 3, r"`token_slots` must be a 1-D int32 or int64 tensor"),
        (torch.zeros(2), 3, r"got dtype torch.float32"),
        (["a"], 3, r"sequence of ints"),
        ([0, 1.5], 3, r"sequence of ints"),
        ([0], 0, r"`num_slots` must be a positive int"),
    ],
)
def test_rejects_bad_input_with_a_fix(slots: object, num_slots: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoRABatchMapping.from_token_slots(slots, num_slots)  # type: ignore[arg-type]
