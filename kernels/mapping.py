"""`LoRABatchMapping`: the per-step view of which token uses which adapter slot.

Built once per forward from the batch's token slots and shared by every LoRA-wrapped linear of
that forward (~200 of them), so the sorting, grouping and host<->device traffic happen once.

Terms used across `loraplex.kernels`:

- token slot: the device slot index of a token's adapter, or -1 for "base model only";
- active token: a token whose slot is >= 0;
- segment: the active tokens that share a slot, in the order of `sorted_token_ids`;
- tile: up to `block_m` consecutive tokens of one segment (the unit of the segment form);
- run: consecutive tokens in batch order sharing one active slot;
- slot group: consecutive runs whose slots rise through a range, batched by the CPU path as one
  GEMM per slice over that slot range (see `SlotGroup`).
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["LoRABatchMapping", "SlotGroup"]

_INDEX_DTYPES = (torch.int32, torch.int64)

# A run joins a slot group when the padding that adds costs less than a group of its own: one
# more GEMM per slice costs about as much as this many more padded rows (CPU, small models).
_GROUP_COST_IN_ROWS = 16
# Idle slots a group may step over: reading one idle slot's weights is cheaper than a new GEMM.
_MAX_SLOT_GAP = 2


@dataclass(frozen=True, eq=False)
class SlotGroup:
    """Batch rows [start, end) whose runs use slots rising within [lo, hi), as one padded batch.

    Position `g * max_len + l` of the padded batch `[hi - lo, max_len]` is token `l` of slot
    `lo + g`. `gather` (`[(hi - lo) * max_len]`, rows relative to `start`) fills it, padding with
    row 0; `scatter` (`[end - start]`) is each row's padded position. Both are None when no
    padding is needed: then rows `start:end` already are the padded batch, viewed in place.
    """

    lo: int
    hi: int
    max_len: int
    start: int
    end: int
    gather: torch.Tensor | None
    scatter: torch.Tensor | None


def _device_table(index: int, doc: str) -> property:
    """A read-only field of `LoRABatchMapping`: one of its device tables, built on first use."""
    return property(lambda mapping: mapping._tables[index], doc=doc)


@dataclass(frozen=True, eq=False)
class LoRABatchMapping:
    """Which slot each token of one step uses, grouped for the kernels.

    Build it with `LoRABatchMapping.from_token_slots`; the fields are read-only. The `*_host`
    tuples are the step's facts as Python ints, for code that must size grids or loop over
    segments without a device sync. The device tables (`token_slots`, `sorted_token_ids`, ...)
    live on `device` (the activations' device) and are built, in one host->device copy, when a
    kernel first reads one: the native CPU kernel needs none of them.
    """

    num_tokens: int  # T, active or not
    num_slots: int  # S, the number of device slots the stacked weights hold
    device: torch.device
    seg_indptr_host: tuple[int, ...]  # [A + 1], segment s = sorted tokens [indptr[s], indptr[s+1])
    seg_slots_host: tuple[int, ...]  # [A], ascending slot of each segment
    max_segment_len: int
    runs_host: tuple[tuple[int, int, int], ...]  # (slot, start, end) of each run, in batch order
    any_active: bool  # False when no token uses a LoRA: a layer can skip the LoRA path entirely
    _slots_host: tuple[int, ...] = field(repr=False)  # [T]
    # Tile tables per block size, made on first use (see `segment_tiles`).
    _tiles: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_token_slots(
        cls,
        token_slots: torch.Tensor | Sequence[int],
        num_slots: int,
        *,
        device: torch.device | str | None = None,
    ) -> LoRABatchMapping:
        """Group the tokens of one step by slot.

        `token_slots` is `[T]` int32/int64 (or a list of ints); -1 means no LoRA for that
        token. `num_slots` is the number of slots in the stacked weight buffers; every slot must
        be in [-1, num_slots). `device` defaults to the device of `token_slots`. This reads the
        slots on the host once (one device sync when they live on a GPU).
        """
        slots = _slots_to_host(token_slots)
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(
                f"LoRABatchMapping.from_token_slots: `num_slots` must be a positive int (the number "
                f"of device slots, i.e. lora_a.shape[0]); got {num_slots!r}."
            )
        if device is None:
            device = token_slots.device if isinstance(token_slots, torch.Tensor) else torch.device("cpu")
        _check_slot_values(slots, num_slots)

        # A step has at most a few thousand tokens: plain Python beats a dozen small torch ops.
        counts: dict[int, int] = {}
        for slot in slots:
            if slot >= 0:
                counts[slot] = counts.get(slot, 0) + 1
        seg_slots = sorted(counts)
        seg_lens = [counts[slot] for slot in seg_slots]
        return cls(
            num_tokens=len(slots),
            num_slots=num_slots,
            device=torch.device(device),
            seg_indptr_host=tuple(itertools.accumulate(seg_lens, initial=0)),
            seg_slots_host=tuple(seg_slots),
            max_segment_len=max(seg_lens, default=0),
            runs_host=_runs(slots),
            any_active=bool(seg_slots),
            _slots_host=slots,
        )

    @functools.cached_property
    def _tables(self) -> tuple[torch.Tensor, ...]:
        """The device tables, views into one int32 buffer copied to `device` at once."""
        slots = torch.tensor(self._slots_host, dtype=torch.int64)  # [T]
        # Stable sort keeps the tokens of one slot in batch order (prefill rows stay contiguous).
        active_ids = torch.nonzero(slots >= 0).flatten()  # [T_active]
        order = torch.sort(slots[active_ids], stable=True).indices  # [T_active]
        seg_indptr = torch.tensor(self.seg_indptr_host, dtype=torch.int64)  # [A + 1]
        seg_slots = torch.tensor(self.seg_slots_host, dtype=torch.int64)  # [A]
        seg_lens = seg_indptr.diff()  # [A]
        token_segment = torch.repeat_interleave(torch.arange(seg_slots.numel()), seg_lens)  # [T_active]
        slot_indptr = torch.zeros(self.num_slots + 1, dtype=torch.int64)  # [S + 1]
        slot_indptr[seg_slots + 1] = seg_lens
        slot_indptr = slot_indptr.cumsum(0)
        parts = [slots, active_ids[order], seg_indptr, seg_slots, slot_indptr, token_segment]
        packed = torch.cat(parts).to(torch.int32).to(self.device)
        return tuple(torch.split(packed, [p.numel() for p in parts]))

    token_slots = _device_table(0, "[T] int32, each token's slot, -1 = base only.")
    sorted_token_ids = _device_table(1, "[T_active] int32, the active tokens grouped by slot (stable).")
    seg_indptr = _device_table(2, "[A + 1] int32, segment s = sorted_token_ids[indptr[s]:indptr[s+1]].")
    seg_slots = _device_table(3, "[A] int32, the ascending slot of each segment.")
    slot_indptr = _device_table(4, "[S + 1] int32, slot s = sorted_token_ids[ptr[s]:ptr[s+1]] (maybe empty).")
    token_segment = _device_table(5, "[T_active] int32, the segment index of each sorted token.")

    @functools.cached_property
    def runs_table(self) -> torch.Tensor:
        """`runs_host` as the native CPU kernel reads it: [n_runs, 3] int64 (start, end, slot)."""
        runs = [(start, end, slot) for slot, start, end in self.runs_host]
        return torch.tensor(runs, dtype=torch.int64).reshape(-1, 3)

    @functools.cached_property
    def slot_groups(self) -> tuple[SlotGroup, ...]:
        """The runs batched into slot groups (see `SlotGroup`), in batch order; made on first use."""
        return _slot_groups(self.runs_host, self.device)

    @property
    def num_active_tokens(self) -> int:
        return self.seg_indptr_host[-1]

    @property
    def num_segments(self) -> int:
        """The number of distinct active slots."""
        return len(self.seg_slots_host)

    @property
    def max_slot(self) -> int:
        """The highest slot in use, or -1 when none is."""
        return self.seg_slots_host[-1] if self.seg_slots_host else -1

    @property
    def mean_segment_len(self) -> float:
        return self.num_active_tokens / self.num_segments if self.seg_slots_host else 0.0

    def segment_tiles(self, block_m: int) -> tuple[torch.Tensor, int]:
        """Tiles of at most `block_m` tokens that never straddle two segments.

        Returns `(tiles, n_tiles)` where `tiles` is `[n_tiles, 3]` int32 on `device`, each row
        `(slot, start, end)` indexing `sorted_token_ids[start:end]`. Made on the host once per
        block size and cached, so the kernels' grids are exact (no idle programs).
        """
        cached = self._tiles.get(block_m)
        if cached is not None:
            return cached
        rows: list[tuple[int, int, int]] = []
        for s, slot in enumerate(self.seg_slots_host):
            start, end = self.seg_indptr_host[s], self.seg_indptr_host[s + 1]
            rows.extend((slot, m, min(m + block_m, end)) for m in range(start, end, block_m))
        tiles = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).to(self.device)  # [n_tiles, 3]
        self._tiles[block_m] = (tiles, len(rows))
        return tiles, len(rows)

    def to(self, device: torch.device | str) -> LoRABatchMapping:
        """The same mapping with its tensors on `device` (returns self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return LoRABatchMapping.from_token_slots(self._slots_host, self.num_slots, device=device)


def _slots_to_host(token_slots: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    if isinstance(token_slots, torch.Tensor):
        if token_slots.dim() != 1 or token_slots.dtype not in _INDEX_DTYPES:
            raise ValueError(
                "LoRABatchMapping.from_token_slots: `token_slots` must be a 1-D int32 or int64 tensor "
                f"[T]; got dtype {token_slots.dtype} with shape {list(token_slots.shape)}. "
                "Pass one slot per token, e.g. torch.tensor(slots, dtype=torch.int32)."
            )
        return tuple(token_slots.tolist())
    try:
        slots = tuple(operator.index(slot) for slot in token_slots)
    except TypeError as exc:
        raise ValueError(
            "LoRABatchMapping.from_token_slots: `token_slots` must be a 1-D int tensor or a sequence "
            f"of ints; got {type(token_slots).__name__} ({exc})."
        ) from None
    return slots


def _runs(slots: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """(slot, start, end) of each maximal run of equal, active slots in batch order."""
    runs = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            if slots[start] >= 0:
                runs.append((slots[start], start, i))
            start = i
    return tuple(runs)


def _slot_groups(runs: tuple[tuple[int, int, int], ...], device: torch.device) -> tuple[SlotGroup, ...]:
    """Greedy in batch order: a run joins the open group when it starts where the group ends, its
    slot is above the group's last within `_MAX_SLOT_GAP` idle slots, and the padded batch grows by
    at most the run's rows plus `_GROUP_COST_IN_ROWS`."""
    groups: list[SlotGroup] = []
    members: list[tuple[int, int, int]] = []
    max_len = 0
    for slot, start, end in runs:
        if members:
            first_slot, (last_slot, _, last_end) = members[0][0], members[-1]
            padded = (last_slot + 1 - first_slot) * max_len
            joined = (slot + 1 - first_slot) * max(max_len, end - start)
            rising = 0 < slot - last_slot <= _MAX_SLOT_GAP + 1
            if start == last_end and rising and joined <= padded + (end - start) + _GROUP_COST_IN_ROWS:
                members.append((slot, start, end))
                max_len = max(max_len, end - start)
                continue
            groups.append(_make_group(members, device))
        members, max_len = [(slot, start, end)], end - start
    if members:
        groups.append(_make_group(members, device))
    return tuple(groups)


def _make_group(runs: list[tuple[int, int, int]], device: torch.device) -> SlotGroup:
    lo, start, end = runs[0][0], runs[0][1], runs[-1][2]
    hi = runs[-1][0] + 1
    max_len = max(e - b for _, b, e in runs)
    if (hi - lo) * max_len == end - start:  # every slot of the range has max_len rows: no padding
        return SlotGroup(lo, hi, max_len, start, end, None, None)
    gather = torch.zeros(hi - lo, max_len, dtype=torch.int64)  # [G, L], padding reads row 0
    scatter = torch.empty(end - start, dtype=torch.int64)  # [rows]
    for slot, b, e in runs:
        g = slot - lo
        gather[g, : e - b] = torch.arange(b - start, e - start)
        scatter[b - start : e - start] = torch.arange(g * max_len, g * max_len + e - b)
    return SlotGroup(lo, hi, max_len, start, end, gather.flatten().to(device), scatter.to(device))


def _check_slot_values(slots: tuple[int, ...], num_slots: int) -> None:
    bad = [i for i, slot in enumerate(slots) if not -1 <= slot < num_slots]
    if bad:
        i = bad[0]
        raise ValueError(
            f"LoRABatchMapping.from_token_slots: token {i} has slot {slots[i]}, outside "
            f"[-1, {num_slots}) ({len(bad)} token(s) out of range). Use -1 for tokens without "
            f"LoRA and a slot below num_slots={num_slots} (the stacked weights' first dimension)."
        )
