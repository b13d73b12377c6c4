"""Continuous batching: which sequences run in the next step, and preemption when blocks run out.

A step computes, for each scheduled sequence, the tokens whose K/V are not cached yet: one for a
decode, a chunk of the prompt for a prefill. Running sequences are scheduled first, decodes before
anything else (a running stream is never held back), then partially prefilled sequences take
chunks of what is left of `max_num_batched_tokens`, then waiting sequences are admitted
first-come-first-served within that budget and `max_num_seqs` while the block pool has room.
Without chunked prefill a prompt is admitted whole or waits; with it, a long prompt is prefilled
over several steps while the running sequences keep decoding, and yields no token until its last
chunk.

With prefix caching, a waiting sequence first looks its full blocks up in the pool (hashed with
its adapter and the adapter's version, see block_pool) and computes only the tokens after the
longest cached prefix, at least its last token so that it gets logits. Requests that ask for
prompt log-probabilities skip the lookup: they need logits for every prompt token.

When a running sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed later
(its blocks usually still cached), so a burst larger than the cache slows down instead of failing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import LoRAError
from .block_pool import BlockHash, BlockPool, PrefixCacheStats, block_hash
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    # The scheduler advances each scheduled sequence's num_cached_tokens to what the step leaves
    # cached, so a prefill computes tokens [num_cached_tokens - chunks[seq], num_cached_tokens).
    prefills: list[Sequence] = field(default_factory=list)  # compute a chunk of the tokens of these
    decodes: list[Sequence] = field(default_factory=list)  # compute the last token of these
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # could not be started at all
    chunks: dict[Sequence, int] = field(default_factory=dict)  # new tokens of each prefill this step
    partial: set[Sequence] = field(default_factory=set)  # prefills whose prompt this chunk does not finish

    @property
    def sequences(self) -> list[Sequence]:
        """Batch order: prefills first, then decodes (the attention layout relies on it)."""
        return self.prefills + self.decodes

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token this step (the runner's logits rows), in batch order."""
        return [seq for seq in self.prefills if seq not in self.partial] + self.decodes

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


@dataclass
class _SeqHashes:
    """A sequence's full-block hashes, and how many of its blocks are registered in the pool."""

    adapter: Hashable
    hashes: list[BlockHash] = field(default_factory=list)
    registered: int = 0


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
                 adapters: AdapterSlots | None = None, enable_chunked_prefill: bool = False) -> None:
        self.pool = pool
        self.adapters = adapters
        self._slot_wait_steps = 0
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # keep ~1% of blocks free when admitting, so new prompts rarely cause preemption at once
        self.watermark_blocks = max(1, pool.num_blocks // 100) if pool.num_blocks > 100 else 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # adapter name -> version of its pending in-place reload: sequences of that version (or
        # later) wait until the engine swaps the weights in; older ones finish on the old weights
        self.held_versions: dict[str, int] = {}
        self.prefix_cache = PrefixCacheStats()  # every lookup
        self.lora_prefix_cache: dict[str, PrefixCacheStats] = {}  # the lookups of each adapter's sequences
        self._hashes: dict[Sequence, _SeqHashes] = {}
        self._prefilling: set[Sequence] = set()  # running, their prompt not computed to the end yet

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch)
        self._admit_waiting(batch, budget)
        # one adapter's tokens side by side, adapters in slot order: the LoRA kernels then see few
        # runs, over rising slots, which the CPU path batches into one GEMM per slice
        batch.decodes.sort(key=self._slot_order)
        batch.prefills.sort(key=self._slot_order)
        return batch

    def _schedule_running(self, batch: ScheduledBatch) -> int:
        """Decodes, then the next chunks of partial prefills; the token budget left for admissions."""
        for seq in list(self.running):
            if seq.status is SequenceStatus.RUNNING and seq not in self._prefilling and self._grow(seq, seq.num_tokens, batch):
                batch.decodes.append(seq)
        budget = self.max_num_batched_tokens - len(batch.decodes)
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq not in self._prefilling:
                continue
            if budget <= 0:
                break
            chunk = min(seq.num_tokens - seq.num_cached_tokens, budget)
            if self._grow(seq, seq.num_cached_tokens + chunk, batch):
                self._add_prefill(batch, seq, chunk)
                budget -= chunk
        # only now: no sequence of this batch can be preempted any more
        for seq in batch.decodes:
            self._computed(seq, seq.num_tokens)
        for seq in batch.prefills:
            self._computed(seq, seq.num_cached_tokens + batch.chunks[seq])
        return budget

    def _grow(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Blocks for `num_tokens` of a running sequence, preempting the latest admitted as needed;
        False when `seq` itself had to go."""
        need = self.pool.blocks_needed(num_tokens, len(seq.block_ids))
        while need > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is seq:
                return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        blocked_on_slot = False
        bs = self.pool.block_size
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs or budget <= 0:
                break
            held = self.held_versions.get(seq.lora_name) if seq.lora_name is not None else None
            if held is not None and seq.adapter_version >= held:
                continue  # it runs on its adapter's reloaded weights, which are not in yet
            use_cache = self.pool.enable_caching and getattr(seq.params, "prompt_logprobs", None) is None
            # at most the blocks before the last token: that one is always computed, for its logits
            hits = self.pool.lookup(self._block_hashes(seq, (seq.num_tokens - 1) // bs)) if use_cache else []
            computed = len(hits) * bs
            remaining = seq.num_tokens - computed
            chunk = min(remaining, budget) if self._may_chunk(seq) else remaining
            need = self.pool.blocks_needed(computed + chunk, len(hits))
            reserve = self.watermark_blocks if self.running else 0  # an idle engine may use every block
            # unchunkable (see _may_chunk) and over the whole budget: prefilled with no other prompt
            alone = chunk > self.max_num_batched_tokens and not batch.prefills
            if (chunk > budget and not alone) or need + self.pool.num_evictable(hits) > self.pool.num_free - reserve:
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
            self.pool.take(hits)
            seq.block_ids = hits + self.pool.allocate(need)
            seq.num_cached_tokens = computed
            if use_cache:
                self._count_lookup(seq, computed)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_prefill(batch, seq, chunk)
            # at once: a later sequence of this step with the same prefix may read these blocks,
            # whose K/V every layer writes before any attention reads the cache
            self._computed(seq, computed + chunk)
            budget -= chunk
        self._slot_wait_steps = self._slot_wait_steps + 1 if blocked_on_slot else 0

    def _may_chunk(self, seq: Sequence) -> bool:
        # prompt log-probabilities are computed over the whole prompt in one step when it fits
        whole = getattr(seq.params, "prompt_logprobs", None) is not None and seq.num_tokens <= self.max_num_batched_tokens
        return self.enable_chunked_prefill and not whole

    def _add_prefill(self, batch: ScheduledBatch, seq: Sequence, chunk: int) -> None:
        batch.prefills.append(seq)
        batch.chunks[seq] = chunk
        if seq.num_cached_tokens + chunk < seq.num_tokens:
            batch.partial.add(seq)
            self._prefilling.add(seq)
        else:
            self._prefilling.discard(seq)

    # ---- prefix caching -------------------------------------------------------------------------------

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[BlockHash]:
        """The hashes of the first `num_blocks` full blocks of `seq`, computed once per sequence."""
        # the weights that compute the K/V: an adapter reloaded in place gets a new version
        adapter = None if seq.lora_name is None else (seq.lora_name, seq.adapter_version)
        state = self._hashes.get(seq)
        if state is None or state.adapter != adapter:
            state = self._hashes[seq] = _SeqHashes(adapter)
        hashes = state.hashes
        if len(hashes) < num_blocks:
            bs = self.pool.block_size
            tokens = seq.all_token_ids()
            images = seq.multi_modal
            for i in range(len(hashes), num_blocks):
                extra = images.block_keys(i * bs, (i + 1) * bs) if images is not None else ()
                hashes.append(block_hash(hashes[-1] if hashes else None, adapter, tokens[i * bs:(i + 1) * bs], extra))
        return hashes[:num_blocks]

    def _computed(self, seq: Sequence, num_tokens: int) -> None:
        """The step computes `seq` up to `num_tokens`: note it, and register the blocks it fills."""
        seq.num_cached_tokens = num_tokens
        if not self.pool.enable_caching or getattr(seq.params, "prompt_logprobs", None) is not None:
            return
        num_full = num_tokens // self.pool.block_size
        hashes = self._block_hashes(seq, num_full)
        state = self._hashes[seq]
        for i in range(state.registered, num_full):
            self.pool.cache(seq.block_ids[i], hashes[i])
        state.registered = max(state.registered, num_full)

    def _count_lookup(self, seq: Sequence, hit_tokens: int) -> None:
        stats = [self.prefix_cache]
        if seq.lora_name is not None:
            stats.append(self.lora_prefix_cache.setdefault(seq.lora_name, PrefixCacheStats()))
        for s in stats:
            s.queries += seq.num_tokens
            s.hits += hit_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (e.g. after the cache's contents were replaced)."""
        self.pool.reset_prefix_cache()
        for state in self._hashes.values():
            state.registered = 0

    # ---- adapters, preemption, freeing ----------------------------------------------------------------

    def _slot_order(self, seq: Sequence) -> int:
        return -1 if self.adapters is None else self.adapters.slot_of(seq.lora_name)

    def _busy_adapters(self) -> set[str]:
        return {seq.lora_name for seq in self.running if seq.lora_name is not None}

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self._prefilling.discard(seq)
        if seq in batch.chunks:  # scheduled earlier in this step (a decode, when a later chunk needs blocks)
            batch.prefills.remove(seq)
            del batch.chunks[seq]
            batch.partial.discard(seq)
        elif seq in batch.decodes:
            batch.decodes.remove(seq)
        self.pool.release(seq.block_ids)
        self._release_adapter(seq)
        seq.num_cached_tokens = 0
        if seq in self._hashes:
            self._hashes[seq].registered = 0
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
        self._hashes.pop(seq, None)
        self._prefilling.discard(seq)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_name is not None and self.adapters is not None:
            self.adapters.release(seq.lora_name)
