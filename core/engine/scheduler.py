"""Continuous batching: which sequences run in the next step, and preemption when blocks run out.

Every step runs all running sequences one decode token further, and admits waiting sequences
first-come-first-served (whole prompts, within `max_num_batched_tokens` and `max_num_seqs`) while
the block pool has room. When a running sequence needs a block and none is free, the most recently
admitted sequence is preempted: its blocks are freed and it goes back to the front of the queue
to be recomputed later, so a burst larger than the cache slows down instead of failing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import LoRAError
from .block_pool import BlockPool
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    prefills: list[Sequence] = field(default_factory=list)  # compute every token of these
    decodes: list[Sequence] = field(default_factory=list)  # compute the last token of these
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # could not be started at all

    @property
    def sequences(self) -> list[Sequence]:
        """Batch order: prefills first, then decodes (the attention layout relies on it)."""
        return self.prefills + self.decodes

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class AdapterSlots(Protocol):
    """What the scheduler needs of the LoRA manager: a device slot per running adapter."""

    def acquire(self, name: str) -> bool: ...
    def release(self, name: str) -> None: ...
    def slot_of(self, name: str | None) -> int: ...


# How many steps later waiting sequences may overtake one that waits for an adapter slot; after
# that, admission is strictly first-come-first-served until it gets one, so no adapter starves.
MAX_OVERTAKING_STEPS = 16


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 adapters: AdapterSlots | None = None) -> None:
        self.pool = pool
        self.adapters = adapters
        self._slot_wait_steps = 0
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # keep ~1% of blocks free when admitting, so new prompts rarely cause preemption at once
        self.watermark_blocks = max(1, pool.num_blocks // 100) if pool.num_blocks > 100 else 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._schedule_decodes(batch)
        self._admit_waiting(batch)
        # one adapter's tokens side by side, adapters in slot order: the LoRA kernels then see few
        # runs, over rising slots, which the CPU path batches into one GEMM per slice
        batch.decodes.sort(key=self._slot_order)
        batch.prefills.sort(key=self._slot_order)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch) -> None:
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            need = self.pool.blocks_needed(seq.num_tokens, len(seq.block_ids))
            while need > self.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                seq.block_ids.extend(self.pool.allocate(need))
                batch.decodes.append(seq)

    def _admit_waiting(self, batch: ScheduledBatch) -> None:
        budget = self.max_num_batched_tokens - len(batch.decodes)
        blocked_on_slot = False
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs:
                break
            tokens = seq.num_tokens
            need = self.pool.blocks_needed(tokens, 0)
            reserve = self.watermark_blocks if self.running else 0  # an idle engine may use every block
            if tokens > budget or need > self.pool.num_free - reserve:
                break  # memory is handed out strictly first come, first served
            if blocked_on_slot:
                # an earlier sequence waits for an adapter slot: later ones may pass it only for a
                # bounded number of steps, and only if they need no slot of their own
                if self._slot_wait_steps >= MAX_OVERTAKING_STEPS:
                    break
                if seq.lora_name is not None and seq.lora_name not in self._busy_adapters():
                    continue
            if seq.lora_name is not None and self.adapters is not None:
                try:
                    acquired = self.adapters.acquire(seq.lora_name)
                except LoRAError as exc:  # e.g. its files vanished since it was evicted from the CPU cache
                    self.waiting.remove(seq)
                    batch.failed.append((seq, exc))
                    continue
                if not acquired:
                    blocked_on_slot = True
                    continue
            self.waiting.remove(seq)
            seq.block_ids = self.pool.allocate(need)
            seq.num_cached_tokens = 0
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.prefills.append(seq)
            budget -= tokens
        self._slot_wait_steps = self._slot_wait_steps + 1 if blocked_on_slot else 0

    def _slot_order(self, seq: Sequence) -> int:
        return -1 if self.adapters is None else self.adapters.slot_of(seq.lora_name)

    def _busy_adapters(self) -> set[str]:
        return {seq.lora_name for seq in self.running if seq.lora_name is not None}

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.pool.release(seq.block_ids)
        self._release_adapter(seq)
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def free(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence, returning its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self._release_adapter(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.block_ids)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_name is not None and self.adapters is not None:
            self.adapters.release(seq.lora_name)

