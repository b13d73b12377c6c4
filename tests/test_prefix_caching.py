"""Automatic prefix caching (loraplex.engine.block_pool, loraplex.engine.scheduler).

Full KV blocks are shared between sequences whose prefix and weights are the same: the base
model, or one adapter at one version. The block pool is tested alone (ref counts, LRU eviction);
then engines on a tiny Llama with two PEFT adapters: generation with the cache gives the tokens
and log-probabilities of generation without it and of PEFT, hits are counted where they must be
and never across the base model, adapters or adapter versions.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lora_helpers import LOGPROB_ATOL, TinyAdapters, assert_matches_oracle, greedy, lora_engine, step_until_done
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex import SamplingParams
from loraplex.engine.block_pool import BlockPool, block_hash
from loraplex.engine.model_runner import KVCache
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from tiny_models import tiny  # noqa: F401

SYSTEM = ("You are a careful assistant. Answer in one short sentence, cite no sources, and never "
          "repeat the question back to the user. Keep a friendly tone at all times. ")  # 2+ blocks of 16
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?"]
LANES = [None, "A", "B"]
NUM_TOKENS = 6


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> TinyAdapters:
    return TinyAdapters(tiny.path("llama"), tmp_path_factory.mktemp("prefix_adapters"), ["A", "B"])


def make_engine(tiny, caching: bool, **options):
    return lora_engine(tiny.path("llama"), max_loras=2, max_cpu_loras=2, max_lora_rank=8,
                       enable_prefix_caching=caching, **options)


_ids = itertools.count()


def run(engine, adapters: TinyAdapters, jobs: list[tuple[str, str | None]], num_tokens: int = NUM_TOKENS) -> list:
    """Add every (prompt, adapter) job at once, step to the end; the outputs in job order."""
    ids = []
    for prompt, name in jobs:
        ids.append(f"q{next(_ids)}")
        engine.add_request(ids[-1], prompt, greedy(num_tokens), lora_request=adapters.requests[name] if name else None)
    finished = step_until_done(engine)
    return [finished[i] for i in ids]


def same_outputs(ours: list, reference: list) -> None:
    for a, b in zip(ours, reference, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for token, lp in step_a.items():
                assert lp.logprob == pytest.approx(step_b[token].logprob, abs=1e-4)


# ---- the block pool ------------------------------------------------------------------------------


def test_a_released_cached_block_stays_findable_until_evicted_least_recently_released_first() -> None:
    pool = BlockPool(num_blocks=4, block_size=2, enable_caching=True)
    keys = [block_hash(None, None, [i, i]) for i in range(3)]
    a = pool.allocate(3)
    for block, key in zip(a, keys):
        pool.cache(block, key)
    assert pool.lookup(keys) == a and pool.num_cached == 3
    held = list(a)
    pool.release(a)  # refcount 0: evictable, still cached and still counted as free
    assert pool.num_free == 4 and pool.lookup(keys) == held
    pool.take(held[:1])  # found again: referenced, no longer evictable
    assert pool.num_free == 3
    assert pool.allocate(1) == [3]  # a never-cached block goes first
    # then the evictable ones, the last block of the released sequence first (reverse release order)
    assert pool.allocate(1) == [held[2]]
    assert pool.lookup(keys) == held[:2]  # the chain is cut where the evicted block was
    assert pool.allocate(1) == [held[1]]
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks with 0 free"):
        pool.allocate(1)  # the taken block is in use: never evicted
    assert pool.lookup(keys) == held[:1]


def test_sharing_refcounts_and_reset() -> None:
    pool = BlockPool(num_blocks=2, block_size=2, enable_caching=True)
    key = block_hash(None, None, [5, 6])
    first = pool.allocate(1)
    pool.cache(first[0], key)
    second = pool.lookup([key])
    pool.take(second)  # two sequences now hold block 0
    pool.release(first)
    assert pool.num_free == 1  # still held by the second
    pool.cache(pool.allocate(1)[0], key)  # the same content again: the first registration is kept
    assert pool.lookup([key]) == second
    pool.reset_prefix_cache()
    assert pool.lookup([key]) == [] and pool.num_cached == 0
    pool.release(second)
    assert pool.num_free == 1  # block 1 is still allocated


def test_the_hash_depends_on_adapter_version_parent_and_tokens() -> None:
    base = block_hash(None, None, [1, 2])
    variants = {block_hash(None, ("A", 0), [1, 2]), block_hash(None, ("A", 1), [1, 2]),
                block_hash(None, ("B", 0), [1, 2]), block_hash(base, None, [1, 2]), block_hash(None, None, [1, 3])}
    assert base not in variants and len(variants) == 5
    assert block_hash(None, ("A", 0), [1, 2]) == block_hash(None, ("A", 0), (1, 2))


def test_a_disabled_cache_finds_nothing() -> None:
    pool = BlockPool(num_blocks=2, block_size=2)
    key = block_hash(None, None, [1, 2])
    pool.cache(pool.allocate(1)[0], key)
    assert pool.lookup([key]) == []


# ---- the scheduler ---------------------------------------------------------------------------


def _seq(tokens: list[int], lora: str | None = None, version: int = 0, **params) -> Sequence:
    i = next(_ids)
    return Sequence(i, f"s{i}", 0, list(tokens), SamplingParams(**params), float(i), lora_name=lora,
                    adapter_version=version)


def test_the_scheduler_reuses_whole_blocks_and_always_computes_the_last_token() -> None:
    scheduler = Scheduler(BlockPool(32, 4, enable_caching=True), max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(10, 22))  # 12 tokens: 3 full blocks
    first = _seq(prompt)
    scheduler.add(first)
    scheduler.schedule()
    same = _seq(prompt)  # the last block would be a full hit: it is computed again, for the logits
    longer = _seq(prompt + [99])
    other = _seq([7] + prompt[1:])  # differs in the first token: no block matches
    for seq in (same, longer, other):
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.chunks == {same: 4, longer: 1, other: 12}
    assert same.block_ids[:2] == first.block_ids[:2] and same.block_ids[2] != first.block_ids[2]
    assert longer.block_ids[:3] == first.block_ids
    assert scheduler.prefix_cache.queries == 12 + 12 + 13 + 12 and scheduler.prefix_cache.hits == 8 + 12


@pytest.mark.parametrize("second", [dict(lora="A"), dict(lora="B"), dict(lora="A", version=1), dict(lora=None)],
                         ids=["same-adapter", "other-adapter", "reloaded-adapter", "base-model"])
def test_blocks_are_shared_only_by_the_same_weights(second: dict) -> None:
    scheduler = Scheduler(BlockPool(32, 4, enable_caching=True), max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(30, 43))
    scheduler.add(_seq(prompt, lora="A"))
    scheduler.schedule()
    scheduler.add(_seq(prompt, **second))
    scheduler.schedule()
    hits = scheduler.prefix_cache.hits
    assert hits == (12 if second == dict(lora="A") else 0)
    assert scheduler.lora_prefix_cache["A"].hits == hits


def test_requests_for_prompt_logprobs_do_not_use_cached_blocks() -> None:
    scheduler = Scheduler(BlockPool(32, 4, enable_caching=True), max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(50, 63))
    scheduler.add(_seq(prompt))
    scheduler.schedule()
    wants = _seq(prompt, prompt_logprobs=1)
    scheduler.add(wants)
    batch = scheduler.schedule()
    assert batch.chunks[wants] == len(prompt) and scheduler.prefix_cache.hits == 0
    assert scheduler.prefix_cache.queries == len(prompt)  # only the first was looked up


# ---- through the engine ------------------------------------------------------------------------


def test_a_shared_system_prompt_over_base_and_two_adapters_gives_uncached_and_peft_results(tiny, adapters) -> None:
    jobs = [(SYSTEM + q, name) for q in QUESTIONS for name in LANES]
    reference = run(make_engine(tiny, caching=False), adapters, jobs)
    engine = make_engine(tiny, caching=True)
    first = run(engine, adapters, jobs)  # one batch: later sequences of a lane share the first's blocks
    scheduler = engine.scheduler
    assert scheduler.prefix_cache.hits > 0
    second = run(engine, adapters, jobs)  # again: every full prompt block is found
    for outputs in (first, second):
        same_outputs(outputs, reference)
        assert_matches_oracle(outputs, [name for _, name in jobs], adapters.oracle, LOGPROB_ATOL["tiny"])
    bs = engine.args.block_size
    full = sum((len(o.prompt_token_ids) - 1) // bs * bs for o in second)
    assert scheduler.prefix_cache.queries == 2 * sum(len(o.prompt_token_ids) for o in first)
    assert scheduler.prefix_cache.hits >= full  # the whole second run, plus the first's sharing
    for name in ("A", "B"):
        assert 0 < scheduler.lora_prefix_cache[name].hits < scheduler.lora_prefix_cache[name].queries
    assert scheduler.pool.num_free == scheduler.pool.num_blocks  # cached blocks are evictable, not held


def test_base_and_adapter_requests_never_hit_each_others_blocks(tiny, adapters) -> None:
    engine = make_engine(tiny, caching=True)
    scheduler = engine.scheduler
    prompt = SYSTEM + QUESTIONS[0]
    order = [("A", 0), (None, 0), ("B", 0), ("A", 1), (None, 1), ("B", 1)]  # (lane, hits expected: blocks of its own)
    for name, expect_hit in order:
        before = scheduler.prefix_cache.hits
        out = run(engine, adapters, [(prompt, name)])
        assert (scheduler.prefix_cache.hits > before) == bool(expect_hit), (name, expect_hit)
        assert_matches_oracle(out, [name], adapters.oracle, LOGPROB_ATOL["tiny"])


def test_a_new_adapter_version_never_reads_the_old_versions_blocks(tiny, adapters) -> None:
    engine = make_engine(tiny, caching=True)
    scheduler = engine.scheduler
    prompt = SYSTEM + QUESTIONS[1]
    run(engine, adapters, [(prompt, "A")])
    hits = scheduler.prefix_cache.hits
    engine.add_request("bumped", prompt, greedy(NUM_TOKENS), lora_request=adapters.requests["A"])
    for seq in engine.requests["bumped"].seqs:
        seq.adapter_version += 1  # what an in-place reload gives the requests that run on the new weights
    step_until_done(engine)
    assert scheduler.prefix_cache.hits == hits
    run(engine, adapters, [(prompt, "A")])  # the old version's blocks are still there for its own requests
    assert scheduler.prefix_cache.hits > hits


def test_eviction_under_a_small_cache_stays_exact(tiny, adapters) -> None:
    """Twelve blocks for requests of ~2-3 blocks each: cached blocks are evicted (and sequences
    preempted) all the time; every result still equals the uncached engine's."""
    per_token = KVCache.bytes_per_token(2, 2, 16, torch.float32)  # the tiny Llama's
    jobs = [(SYSTEM + q + " " + "more " * i, name) for i, q in enumerate(QUESTIONS * 2) for name in LANES]
    jobs += [(f"Unrelated prompt number {i} " * 3, None) for i in range(3)]
    reference = run(make_engine(tiny, caching=False), adapters, jobs, num_tokens=12)
    engine = make_engine(tiny, caching=True, max_model_len=64, kv_cache_memory_bytes=12 * 16 * per_token)
    assert engine.scheduler.pool.num_blocks == 12
    for _ in range(2):
        same_outputs(run(engine, adapters, jobs, num_tokens=12), reference)
    assert engine.scheduler.prefix_cache.hits > 0 and engine.scheduler.num_preemptions > 0
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_prefix_cache_counters_reach_engine_stats_and_metrics(tiny, adapters) -> None:
    from loraplex import AsyncLLMEngine
    from loraplex.entrypoints.openai.metrics import ServerMetrics

    engine = AsyncLLMEngine(make_engine(tiny, caching=True))
    try:
        async def main() -> None:
            for i, name in enumerate(["A", "A", None]):
                lora = adapters.requests[name] if name else None
                async for _ in engine.generate(SYSTEM + QUESTIONS[0], greedy(2), f"m{i}", lora_request=lora):
                    pass

        asyncio.run(asyncio.wait_for(main(), timeout=120))
        stats = engine.stats()
        assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries > stats.prefix_cache_hits
        assert stats.lora_prefix_cache["A"].hits == stats.prefix_cache_hits  # the base request found nothing
        text = ServerMetrics(engine, "tiny").render()[0].decode()
        samples = {(s.name, s.labels.get("lora_name")): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("vllm:prefix_cache_queries_total", None)] == stats.prefix_cache_queries
        assert samples[("vllm:prefix_cache_hits_total", None)] == stats.prefix_cache_hits
        assert samples[("loraplex:lora_prefix_cache_hits_total", "A")] == stats.prefix_cache_hits
    finally:
        engine.shutdown()
