"""loraplex.engine.scheduler and loraplex.engine.block_pool: admission, limits, preemption, no leaks.

Unit tests drive the Scheduler with hand-made Sequences (no model); the last tests run a tiny
model through an engine and watch the scheduler's limits and the block pool from outside.
"""

from __future__ import annotations

import itertools

import pytest

from loraplex import SamplingParams
from loraplex.engine.block_pool import BlockPool
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.errors import ConfigError
from tiny_models import drain, run_engine, tiny  # noqa: F401

_ids = itertools.count()


def make_seq(num_prompt_tokens: int, request_id: str | None = None) -> Sequence:
    seq_id = next(_ids)
    return Sequence(seq_id, request_id or f"r{seq_id}", 0, list(range(3, 3 + num_prompt_tokens)),
                    SamplingParams(), float(seq_id))


def grow(*seqs: Sequence) -> None:
    """What a step does to each scheduled sequence: one more (sampled) token."""
    for seq in seqs:
        seq.output_token_ids.append(7)


def finish(scheduler: Scheduler, seq: Sequence) -> None:
    seq.finish("stop")
    scheduler.free(seq)


# ---- block pool --------------------------------------------------------------------------------


def test_block_pool_hands_out_distinct_blocks_and_takes_them_back() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert a == [0, 1, 2]  # low ids first
    assert sorted(a + b) == list(range(8)) and pool.num_free == 0
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks with 0 free"):
        pool.allocate(1)
    pool.release(a)
    assert a == []  # the caller's list is emptied: no block can be released twice through it
    assert pool.num_free == 3
    assert sorted(pool.allocate(3)) == [0, 1, 2]


def test_blocks_needed_rounds_up_and_counts_what_is_held() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    assert [pool.blocks_needed(n, 0) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert pool.blocks_needed(9, 2) == 1
    assert pool.blocks_needed(8, 2) == 0
    assert pool.blocks_needed(3, 2) == 0  # never negative


def test_block_pool_without_blocks_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes"):
        BlockPool(num_blocks=0, block_size=16)


# ---- admission -------------------------------------------------------------------------------


def test_waiting_sequences_are_admitted_first_come_first_served() -> None:
    scheduler = Scheduler(BlockPool(64, 4), max_num_seqs=8, max_num_batched_tokens=256)
    seqs = [make_seq(n) for n in (9, 2, 5)]
    for seq in seqs:
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.prefills == seqs and batch.decodes == [] and batch.sequences == seqs
    assert [len(s.block_ids) for s in seqs] == [3, 1, 2]  # ceil(tokens / block_size)
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)
    grow(*seqs)
    batch = scheduler.schedule()
    assert batch.prefills == [] and batch.decodes == seqs  # then they decode, in admission order


def test_max_num_seqs_caps_the_running_set() -> None:
    scheduler = Scheduler(BlockPool(64, 4), max_num_seqs=2, max_num_batched_tokens=256)
    a, b, c = (make_seq(3) for _ in range(3))
    for seq in (a, b, c):
        scheduler.add(seq)
    assert scheduler.schedule().prefills == [a, b]
    assert list(scheduler.waiting) == [c]
    grow(a, b)
    batch = scheduler.schedule()
    assert batch.decodes == [a, b] and batch.prefills == []
    finish(scheduler, a)
    grow(b)
    batch = scheduler.schedule()
    assert batch.decodes == [b] and batch.prefills == [c]
    assert len(scheduler.running) == 2


def test_max_num_batched_tokens_caps_the_tokens_of_a_step() -> None:
    scheduler = Scheduler(BlockPool(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a, b, c = make_seq(10), make_seq(10), make_seq(5)
    for seq in (a, b, c):
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.prefills == [a]  # b would make 20 > 16 tokens; c must not jump the queue (FCFS)
    grow(a)
    batch = scheduler.schedule()  # 1 decode token + 10 + 5 prefill tokens = 16
    assert batch.decodes == [a] and batch.prefills == [b, c]


def test_a_prompt_that_does_not_fit_the_free_blocks_waits_and_blocks_the_queue() -> None:
    scheduler = Scheduler(BlockPool(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = make_seq(8), make_seq(12), make_seq(2)
    for seq in (a, b, c):
        scheduler.add(seq)
    assert scheduler.schedule().prefills == [a]  # b needs 3 blocks, 2 are free; c waits behind b
    assert list(scheduler.waiting) == [b, c]
    finish(scheduler, a)
    assert scheduler.schedule().prefills == [b, c]
    assert scheduler.pool.num_free == 0


def test_the_watermark_keeps_a_few_blocks_free_while_others_run() -> None:
    pool = BlockPool(200, 1)
    scheduler = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=1000)
    assert scheduler.watermark_blocks == 2
    first = make_seq(150)
    scheduler.add(first)
    assert scheduler.schedule().prefills == [first]
    grow(first)
    second = make_seq(48)  # fits the 49 free blocks, not the 47 outside the watermark
    scheduler.add(second)
    batch = scheduler.schedule()
    assert batch.decodes == [first] and batch.prefills == []
    assert list(scheduler.waiting) == [second]


# ---- preemption -------------------------------------------------------------------------------


def test_the_most_recent_sequence_is_preempted_when_blocks_run_out() -> None:
    pool = BlockPool(4, 4)
    scheduler = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq(6), make_seq(6)
    scheduler.add(a)
    scheduler.add(b)
    assert scheduler.schedule().prefills == [a, b] and pool.num_free == 0
    grow(a, b)
    grow(a, b)
    assert scheduler.schedule().decodes == [a, b]  # 8 tokens each: still 2 blocks each
    grow(a, b)  # 9 tokens: a third block each, none free
    batch = scheduler.schedule()
    assert batch.preempted == [b] and batch.decodes == [a] and batch.prefills == []
    assert scheduler.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and b.block_ids == [] and b.num_cached_tokens == 0
    assert list(scheduler.waiting) == [b]  # at the front, to be recomputed first
    assert len(a.block_ids) == 3 and pool.num_free == 1
    finish(scheduler, a)
    batch = scheduler.schedule()
    assert batch.prefills == [b] and b.num_tokens == 9  # recomputed: prompt and generated tokens
    assert len(b.block_ids) == 3


def test_preempted_sequences_keep_their_arrival_order_in_the_queue() -> None:
    pool = BlockPool(3, 4)
    scheduler = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c, d = (make_seq(4) for _ in range(4))
    for seq in (a, b, c, d):
        scheduler.add(seq)
    assert scheduler.schedule().prefills == [a, b, c]
    grow(a, b, c)  # each needs a second block: a gets c's by preempting it, b then preempts itself
    batch = scheduler.schedule()
    assert batch.decodes == [a] and batch.preempted == [c, b]
    assert list(scheduler.waiting) == [b, c, d]
    assert scheduler.num_preemptions == 2


def test_a_sequence_that_outgrows_the_whole_pool_preempts_itself_without_crashing() -> None:
    pool = BlockPool(2, 4)
    scheduler = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    a = make_seq(8)
    scheduler.add(a)
    assert scheduler.schedule().prefills == [a]
    grow(a)
    batch = scheduler.schedule()
    assert not batch and batch.preempted == [a]
    assert list(scheduler.waiting) == [a] and pool.num_free == 2


# ---- freeing ----------------------------------------------------------------------------------


def test_free_returns_the_blocks_of_running_and_waiting_sequences() -> None:
    pool = BlockPool(4, 4)
    scheduler = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq(16), make_seq(4)
    scheduler.add(a)
    scheduler.add(b)
    scheduler.schedule()
    assert pool.num_free == 0 and list(scheduler.waiting) == [b]
    scheduler.free(b)  # aborted while waiting
    assert not scheduler.waiting
    scheduler.free(a)  # finished while running
    assert not scheduler.running and not scheduler.has_unfinished()
    assert pool.num_free == pool.num_blocks


# ---- through the engine -------------------------------------------------------------------------


def _record_batches(engine) -> list:
    batches = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        batches.append((list(batch.prefills), list(batch.decodes)))
        return batch

    engine.scheduler.schedule = recording
    return batches


def test_engine_respects_max_num_seqs_and_max_num_batched_tokens(tiny) -> None:
    engine = tiny.engine("llama", max_num_seqs=3, max_num_batched_tokens=300, max_model_len=256,
                         enable_chunked_prefill=False)  # whole prompts (chunks: test_chunked_prefill)
    batches = _record_batches(engine)
    prompts = [list(range(100 + i, 200 + 11 * i)) for i in range(6)]  # 100 to 150 tokens
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4)
    outputs = run_engine(engine, {str(i): ({"prompt_token_ids": p}, params) for i, p in enumerate(prompts)})
    assert sorted(outputs) == [str(i) for i in range(6)]
    assert all(len(o.outputs[0].token_ids) == 4 for o in outputs.values())
    for prefills, decodes in batches:
        assert len(prefills) + len(decodes) <= 3
        assert sum(s.num_tokens for s in prefills) + len(decodes) <= 300
    admitted = [s.request_id for prefills, _ in batches for s in prefills]
    assert admitted == [str(i) for i in range(6)]  # first come, first served
    assert len(batches[0][0]) == 2  # the token budget bit: 100 + 110 + 120 > 300
    assert max(len(p) + len(d) for p, d in batches) == 3  # and so did max_num_seqs


def test_no_block_leaks_after_requests_finish_or_are_aborted(tiny) -> None:
    engine = tiny.engine("llama")
    pool = engine.scheduler.pool
    assert pool.num_free == pool.num_blocks
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=20)
    for i in range(4):
        engine.add_request(f"a{i}", f"Request number {i} says hello", greedy)
    engine.add_request("n", "Three samples", SamplingParams(n=3, max_tokens=7, seed=1))
    for _ in range(5):
        engine.step()
    assert pool.num_free < pool.num_blocks
    engine.abort_request(["a1", "n"])
    engine.add_request("late", "Joined late", SamplingParams(max_tokens=3))
    engine.abort_request("late")  # aborted before it ever ran
    drain(engine)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert pool.num_free == pool.num_blocks
