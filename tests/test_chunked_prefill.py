"""Chunked prefill (loraplex.engine.scheduler, model_runner, models.attention).

With a small `max_num_batched_tokens`, a long prompt is prefilled over several steps: each chunk
attends to the K/V of the chunks before it (and of cached prefix blocks) through the paged cache.
Results must equal whole-prompt prefill and transformers / PEFT exactly (greedy tokens,
log-probabilities within the usual tolerance), with sliding windows too, while running requests
keep decoding in the steps the long prompt is prefilled.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lora_helpers import LOGPROB_ATOL, TinyAdapters, assert_matches_oracle, greedy, lora_engine, step_until_done
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex import SamplingParams
from loraplex.engine.block_pool import BlockPool
from loraplex.engine.model_runner import KVCache
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from tiny_models import PROMPTS, hf_greedy, run_engine, tiny  # noqa: F401

# 60 to 110 tokens: many 16-token chunks, and far past Mistral's window of 8
LONG = [PROMPTS[2] + " " + PROMPTS[1] * k for k in (1, 3)] + [PROMPTS[3] * 6]
NUM_TOKENS = 8

_ids = itertools.count()


def _seq(num_tokens: int) -> Sequence:
    i = next(_ids)
    return Sequence(i, f"c{i}", 0, list(range(100, 100 + num_tokens)), SamplingParams(), float(i))


def test_decodes_go_first_and_prefills_share_what_is_left_of_the_budget() -> None:
    scheduler = Scheduler(BlockPool(64, 4), max_num_seqs=8, max_num_batched_tokens=16, enable_chunked_prefill=True)
    a = _seq(5)
    scheduler.add(a)
    assert scheduler.schedule().chunks == {a: 5}
    a.output_token_ids.append(7)
    b, c = _seq(40), _seq(3)
    scheduler.add(b)
    scheduler.add(c)
    chunks = []
    for _ in range(3):
        batch = scheduler.schedule()
        assert batch.decodes == [a]  # every step: the running request decodes first
        chunks.append(batch.chunks[b])
        assert (b in batch.sampled) == (b.num_cached_tokens == b.num_tokens)  # no token before the last chunk
        assert sum(batch.chunks.values()) + len(batch.decodes) <= 16
        for seq in batch.sampled:
            seq.output_token_ids.append(7)
    assert chunks == [15, 15, 10] and b.output_token_ids == [7]
    assert len(b.block_ids) == 10  # blocks are taken chunk by chunk, as the prompt is computed
    assert c.num_cached_tokens == 3  # admitted with the last chunk's leftover budget (FCFS behind b)


def test_without_chunking_a_prompt_over_the_budget_waits() -> None:
    scheduler = Scheduler(BlockPool(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    a, b = _seq(5), _seq(16)
    scheduler.add(a)
    scheduler.schedule()
    a.output_token_ids.append(7)
    scheduler.add(b)
    batch = scheduler.schedule()
    assert batch.chunks == {} and batch.decodes == [a]  # 1 decode token + 16 > 16
    a.finish("stop")
    scheduler.free(a)
    assert scheduler.schedule().chunks == {b: 16}


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2_sliding"])
@pytest.mark.parametrize("budget", [16, 32])
def test_chunked_prefill_equals_whole_prompt_prefill_and_transformers(tiny, variant: str, budget: int) -> None:
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=NUM_TOKENS, logprobs=5)
    requests = {f"r{i}": ({"prompt": p}, params) for i, p in enumerate(LONG)}
    whole = run_engine(tiny.engine(variant, enable_chunked_prefill=False, enable_prefix_caching=False), requests)
    engine = tiny.engine(variant, max_num_batched_tokens=budget, enable_prefix_caching=False)
    chunked = run_engine(engine, requests)
    hf = tiny.hf(variant)
    for rid, out in chunked.items():
        assert len(out.prompt_token_ids) > budget  # really chunked
        assert out.outputs[0].token_ids == whole[rid].outputs[0].token_ids
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, NUM_TOKENS)
        for ours, theirs in zip(out.outputs[0].logprobs, whole[rid].outputs[0].logprobs):
            for token, lp in ours.items():
                assert lp.logprob == pytest.approx(theirs[token].logprob, abs=1e-4)


def test_running_requests_keep_decoding_while_a_long_prompt_is_prefilled(tiny) -> None:
    engine = tiny.engine("mistral", max_num_batched_tokens=16)
    engine.add_request("short", PROMPTS[0], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=40))
    engine.step()
    engine.step()
    short = engine.requests["short"].seqs[0]
    engine.add_request("long", LONG[1], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=NUM_TOKENS))
    long = engine.requests["long"].seqs[0]
    steps = 0
    while not long.output_token_ids:
        before, prefilled = len(short.output_token_ids), long.num_cached_tokens
        outputs = {out.request_id: out for out in engine.step()}
        steps += 1
        assert long.num_cached_tokens > prefilled  # the next chunk
        assert len(short.output_token_ids) == before + 1  # the stream never stalls
        assert ("long" in outputs) == bool(long.output_token_ids)  # no token before the last chunk
    assert steps >= len(long.prompt_token_ids) / 15 > 4  # 15 prefill tokens a step next to one decode
    finished = step_until_done(engine)
    reference = tiny.llm("mistral").generate([LONG[1]], SamplingParams(temperature=0.0, ignore_eos=True,
                                                                        max_tokens=NUM_TOKENS), use_tqdm=False)
    assert finished["long"].outputs[0].token_ids == reference[0].outputs[0].token_ids
    alone = tiny.llm("mistral").generate([PROMPTS[0]], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=40),
                                         use_tqdm=False)
    assert finished["short"].outputs[0].token_ids == alone[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> TinyAdapters:
    return TinyAdapters(tiny.path("llama"), tmp_path_factory.mktemp("chunked_adapters"), ["A", "B"])


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_chunked_prefill_with_adapters_matches_peft(tiny, adapters, caching: bool) -> None:
    """Long prompts over base and two adapters, in 16-token chunks; with the prefix cache, the
    second round's chunks start after cached blocks (the same system prompt, per adapter)."""
    engine = lora_engine(tiny.path("llama"), max_loras=2, max_cpu_loras=2, max_lora_rank=8,
                         max_num_batched_tokens=16, enable_prefix_caching=caching)
    jobs = [(prompt, name) for prompt in LONG[:2] for name in (None, "A", "B")]
    for _ in range(2):
        ids = []
        for prompt, name in jobs:
            ids.append(f"j{next(_ids)}")
            engine.add_request(ids[-1], prompt, greedy(NUM_TOKENS), lora_request=adapters.requests[name] if name else None)
        finished = step_until_done(engine)
        assert_matches_oracle([finished[i] for i in ids], [name for _, name in jobs], adapters.oracle, LOGPROB_ATOL["tiny"])
    assert (engine.scheduler.prefix_cache.hits > 0) == caching


def test_preemption_during_chunked_prefill_recomputes_exactly(tiny) -> None:
    """Six 16-token blocks for prompts of ~40-60 tokens in 16-token chunks: sequences are preempted
    mid-prefill and mid-decode and recomputed (from their cached blocks when still there)."""
    per_token = KVCache.bytes_per_token(2, 2, 16, torch.float32)  # the tiny Llama's
    prompts = [PROMPTS[2], PROMPTS[2] + " " + PROMPTS[1], PROMPTS[3] * 3, PROMPTS[1] * 3]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=20)
    requests = {f"p{i}": ({"prompt": p}, params) for i, p in enumerate(prompts)}
    seeded = SamplingParams(temperature=1.0, seed=3, ignore_eos=True, max_tokens=20)
    requests["seeded"] = ({"prompt": PROMPTS[2]}, seeded)
    for caching in (False, True):
        engine = tiny.engine("llama", max_model_len=96, max_num_batched_tokens=16, enable_prefix_caching=caching,
                             kv_cache_memory_bytes=6 * 16 * per_token)
        assert engine.scheduler.pool.num_blocks == 6
        outputs = run_engine(engine, requests)
        assert engine.scheduler.num_preemptions > 0
        llm = tiny.llm("llama")
        for rid, (prompt, p) in requests.items():
            alone = llm.generate([prompt["prompt"]], p, use_tqdm=False)[0].outputs[0].token_ids
            assert outputs[rid].outputs[0].token_ids == alone, (caching, rid)
        assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_the_default_budget_chunks_long_prompts_on_cpu_and_fits_whole_prompts_without_chunking(tiny) -> None:
    from loraplex.engine.llm_engine import default_max_num_batched_tokens

    assert tiny.engine("llama").max_num_batched_tokens == 512  # a 2048-token step stalls CPU streams for seconds
    assert default_max_num_batched_tokens(True, torch.device("cuda"), 8192) == 2048  # vLLM's on a GPU
    unchunked = tiny.engine("llama", enable_chunked_prefill=False)
    assert unchunked.max_num_batched_tokens == max(unchunked.max_model_len, 2048)
    assert tiny.engine("llama", max_num_batched_tokens=64).max_num_batched_tokens == 64
