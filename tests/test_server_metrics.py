"""loraplex.entrypoints.openai.metrics: the Prometheus exposition, checked against what a real
AsyncLLMEngine did (the outputs it streamed and its LoRA manager's statistics).

Each request is run as the server runs it: a RequestTimer opened before submission, fed with the
tokens of every DELTA output, closed with the finish reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex import AsyncLLMEngine, EngineArgs, LoRARequest, RequestOutputKind, SamplingParams
from loraplex.entrypoints.openai.metrics import E2E_BUCKETS, TTFT_BUCKETS, ServerMetrics, token_buckets
from loraplex.errors import InvalidRequestError, LoRAAdapterNotFoundError
from resolver_helpers import DictResolver, RaisingResolver, isolated_registry, tiny_lora  # noqa: F401

MODEL = "tiny-served"
PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog.", "One two three"]
MAX_MODEL_LEN = 128


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a test coroutine; the time limit only turns a hang into a failure."""
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


@pytest.fixture
def engines(tiny_lora) -> Iterator[Any]:
    """make(**options) -> a fresh AsyncLLMEngine on the tiny Llama; all are shut down afterwards."""
    made: list[AsyncLLMEngine] = []

    def make(**options: Any) -> AsyncLLMEngine:
        options = {"enable_lora": True, "max_loras": 1, "max_cpu_loras": 1, "max_lora_rank": 8,
                   "kv_cache_memory_bytes": 1 << 20, "max_model_len": MAX_MODEL_LEN, "device": "cpu",
                   "dtype": "float32", "served_model_name": MODEL, **options}
        made.append(AsyncLLMEngine.from_engine_args(EngineArgs(model=str(tiny_lora.base), **options)))
        return made[-1]

    yield make
    for engine in made:
        engine.shutdown()


def greedy(max_tokens: int | None, **options: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens,
                          output_kind=RequestOutputKind.DELTA, **options)


async def serve(engine: AsyncLLMEngine, metrics: ServerMetrics, request_id: str, prompt: str,
                params: SamplingParams, lora: LoRARequest | None = None) -> list[list[int]]:
    """One request, timed as the server times it; the token ids of each output (all samples)."""
    prompt_ids = engine.engine.tokenizer.encode(prompt)
    timer = metrics.request_started(lora.lora_name if lora else None, len(prompt_ids))
    deltas, finish_reason = [], None
    try:
        async for out in engine.generate({"prompt_token_ids": prompt_ids}, params, request_id, lora):
            deltas.append([t for c in out.outputs for t in c.token_ids])
            timer.tokens(len(deltas[-1]))
            if out.finished:
                finish_reason = next(c.finish_reason for c in out.outputs if c.finish_reason)
    finally:
        timer.finished(finish_reason)
    return deltas


def scrape(metrics: ServerMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the exposition by sample name: [(labels, value), ...]."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    matches = [v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples in {samples.get(name)}"
    return matches[0]


async def idle(engine: AsyncLLMEngine) -> None:
    """Wait until every command submitted so far has run on the engine thread."""
    await engine.abort("no-such-request")  # commands run in order: this one runs after them


def test_counts_and_histograms_match_what_the_engine_generated(tiny_lora, engines) -> None:
    engine = engines()
    metrics = ServerMetrics(engine, MODEL)
    a = LoRARequest("ada", 1, str(tiny_lora.adapter))
    b = LoRARequest("bob", 2, str(tiny_lora.other_adapter))
    # max_loras = max_cpu_loras = 1: the two adapters evict each other
    requests = [(PROMPTS[0], greedy(5), None), (PROMPTS[1], greedy(4), a), (PROMPTS[2], greedy(3), b),
                (PROMPTS[0], greedy(2, n=2), a), (PROMPTS[1], greedy(6), None)]

    async def main():
        return await asyncio.gather(*(serve(engine, metrics, f"r{i}", prompt, params, lora)
                                      for i, (prompt, params, lora) in enumerate(requests)))

    results = run(main())
    samples = scrape(metrics)
    model = {"model_name": MODEL}

    tokenizer = engine.engine.tokenizer
    prompt_tokens = sum(len(tokenizer.encode(prompt)) for prompt, _, _ in requests)
    generated = sum(len(delta) for deltas in results for delta in deltas)
    assert generated == 5 + 4 + 3 + 2 * 2 + 6
    assert value(samples, "vllm:prompt_tokens_total", **model) == prompt_tokens
    assert value(samples, "vllm:generation_tokens_total", **model) == generated
    assert value(samples, "vllm:request_success_total", finished_reason="length", **model) == len(requests)
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_prompt_tokens", "vllm:request_generation_tokens"):
        assert value(samples, f"{name}_count", **model) == len(requests), name
    assert value(samples, "vllm:request_prompt_tokens_sum", **model) == prompt_tokens
    assert value(samples, "vllm:request_generation_tokens_sum", **model) == generated
    # every token after a request's first output is one inter-token sample
    first_output_tokens = sum(len(deltas[0]) for deltas in results)
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert value(samples, f"{name}_count", **model) == generated - first_output_tokens, name
    # vLLM's buckets, so that quantiles compare with a vLLM server's
    def bounds(name: str) -> list[float]:
        return [float(lab["le"]) for lab, _ in samples[name]]

    assert bounds("vllm:time_to_first_token_seconds_bucket") == [*TTFT_BUCKETS, float("inf")]
    assert bounds("vllm:e2e_request_latency_seconds_bucket") == [*E2E_BUCKETS, float("inf")]
    assert bounds("vllm:request_prompt_tokens_bucket") == [1, 2, 5, 10, 20, 50, 100, float("inf")]  # max_model_len 128

    # per adapter: exactly the manager's statistics
    stats = engine.engine.lora_manager.stats
    assert set(stats) == {"ada", "bob"}
    assert sum(s.evictions for s in stats.values()) > 0  # one slot, two adapters
    for lora_name, adapter in stats.items():
        lab = {"model_name": MODEL, "lora_name": lora_name}
        assert value(samples, "loraplex:lora_requests_total", **lab) == adapter.requests
        assert value(samples, "loraplex:lora_prompt_tokens_total", **lab) == adapter.prompt_tokens
        assert value(samples, "loraplex:lora_generation_tokens_total", **lab) == adapter.generated_tokens
        assert value(samples, "loraplex:lora_loads_total", **lab) == adapter.loads
        assert value(samples, "loraplex:lora_load_seconds_total", **lab) == pytest.approx(adapter.load_seconds)
        assert value(samples, "loraplex:lora_activations_total", **lab) == adapter.activations
        assert value(samples, "loraplex:lora_cache_hits_total", **lab) == adapter.cache_hits
        assert value(samples, "loraplex:lora_cache_misses_total", **lab) == adapter.cache_misses
        assert value(samples, "loraplex:lora_evictions_total", **lab) == adapter.evictions
    assert value(samples, "loraplex:lora_requests_total", lora_name="ada") == 2
    assert value(samples, "loraplex:lora_prompt_tokens_total", lora_name="ada") == len(
        tokenizer.encode(PROMPTS[1])) + len(tokenizer.encode(PROMPTS[0]))
    assert value(samples, "loraplex:lora_generation_tokens_total", lora_name="ada") == 4 + 2 * 2
    assert value(samples, "loraplex:lora_time_to_first_token_seconds_count", lora_name="ada") == 2
    assert value(samples, "loraplex:lora_time_to_first_token_seconds_count", lora_name="bob") == 1

    # all done: nothing running or waiting, no KV block held, nobody preempted in this roomy cache
    assert value(samples, "vllm:num_requests_running", **model) == 0
    assert value(samples, "vllm:num_requests_waiting", **model) == 0
    assert value(samples, "vllm:kv_cache_usage_perc", **model) == 0
    assert value(samples, "vllm:num_preemptions_total", **model) == 0
    info = samples["vllm:lora_requests_info"]
    assert [lab for lab, _ in info] == [{"max_lora": "1", "waiting_lora_adapters": "", "running_lora_adapters": ""}]


def test_engine_state_is_read_at_scrape_time(tiny_lora, engines) -> None:
    engine = engines(max_num_seqs=1)
    metrics = ServerMetrics(engine, MODEL)
    ada = LoRARequest("ada", 1, str(tiny_lora.adapter))
    model = {"model_name": MODEL}

    async def main():
        # max_num_seqs=1: the base request runs to max_model_len while the adapter's request waits
        base = engine.generate(PROMPTS[0], greedy(None), "base")
        await anext(base)
        lora = engine.generate(PROMPTS[1], greedy(None), "lora", ada)
        first_lora = asyncio.ensure_future(anext(lora))
        while "lora" not in engine.engine.requests:  # the adapter is read off the engine thread, then submitted
            await asyncio.sleep(0.001)
        await idle(engine)
        before = time.time()
        waiting = scrape(metrics)
        after = time.time()
        await base.aclose()  # aborts it: the adapter's request runs
        await first_lora
        running = scrape(metrics)
        await lora.aclose()
        await idle(engine)
        return waiting, running, before, after

    waiting, running, before, after = run(main())
    assert value(waiting, "vllm:num_requests_running", **model) == 1
    assert value(waiting, "vllm:num_requests_waiting", **model) == 1
    assert 0 < value(waiting, "vllm:kv_cache_usage_perc", **model) < 1
    (labels, stamp), = waiting["vllm:lora_requests_info"]
    assert labels == {"max_lora": "1", "waiting_lora_adapters": "ada", "running_lora_adapters": ""}
    assert before <= stamp <= after  # vLLM's value: the time of the reading
    assert value(running, "vllm:num_requests_running", **model) == 1
    assert value(running, "vllm:num_requests_waiting", **model) == 0
    assert [lab for lab, _ in running["vllm:lora_requests_info"]] == [
        {"max_lora": "1", "waiting_lora_adapters": "", "running_lora_adapters": "ada"}]


def test_a_timer_counts_once_and_a_refused_request_is_not_observed(engines) -> None:
    engine = engines(enable_lora=False)
    metrics = ServerMetrics(engine, MODEL)
    timer = metrics.request_started(None, 7)
    timer.tokens(1)
    timer.tokens(2)
    timer.finished("stop")
    timer.finished("stop")
    timer.tokens(5)  # late tokens after the end change nothing
    gone = metrics.request_started(None, 3)
    gone.tokens(1)
    gone.finished(None)  # the client left: its latency counts, not a success

    async def refused():
        with pytest.raises(InvalidRequestError, match="LoRA is not enabled"):
            await serve(engine, metrics, "refused", PROMPTS[0], greedy(2), LoRARequest("ada", 1, "/nowhere"))

    run(refused())
    samples = scrape(metrics)
    assert samples["vllm:request_success_total"] == [({"model_name": MODEL, "finished_reason": "stop"}, 1)]
    assert value(samples, "vllm:e2e_request_latency_seconds_count") == 2
    assert value(samples, "vllm:request_prompt_tokens_sum") == 7 + 3
    assert value(samples, "vllm:request_generation_tokens_sum") == 3 + 1
    assert value(samples, "vllm:time_to_first_token_seconds_count") == 2
    assert value(samples, "vllm:inter_token_latency_seconds_count") == 2
    # the engine counts what it processed, not what the timers were told
    assert value(samples, "vllm:prompt_tokens_total") == 0
    assert value(samples, "vllm:generation_tokens_total") == 0
    # without LoRA, no LoRA series (as in vLLM)
    assert "vllm:lora_requests_info" not in samples
    assert not [name for name in samples if name.startswith("loraplex:")]


def test_two_servers_in_one_process_keep_their_own_metrics(engines) -> None:
    engine = engines(enable_lora=False)
    first, second = ServerMetrics(engine, "first"), ServerMetrics(engine, "second")
    timer = first.request_started(None, 4)
    timer.tokens(1)
    timer.finished("stop")
    assert value(scrape(first), "vllm:request_success_total", model_name="first") == 1
    assert "vllm:request_success_total" not in scrape(second)


def test_resolver_outcomes_are_counted_per_resolver(tiny_lora, isolated_registry, engines, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_MISS_TTL", "0")
    isolated_registry.register_resolver("broken", RaisingResolver())
    isolated_registry.register_resolver("table", DictResolver({"found-name": tiny_lora.adapter}))
    engine = engines()
    metrics = ServerMetrics(engine, MODEL)

    async def main():
        found = await engine.resolve_lora("found-name")
        await serve(engine, metrics, "r", PROMPTS[0], greedy(2), found)
        with pytest.raises(LoRAAdapterNotFoundError, match="'no-such-name'"):
            await engine.resolve_lora("no-such-name")

    run(main())
    samples = scrape(metrics)
    outcomes = samples.get("loraplex:lora_resolver_outcomes_total", [])
    assert sorted((lab["resolver"], lab["outcome"], v) for lab, v in outcomes) == [
        ("broken", "error", 2), ("table", "found", 1), ("table", "not_found", 1)]
    assert value(samples, "loraplex:lora_requests_total", lora_name="found-name") == 1


def test_token_buckets_are_vllms() -> None:
    assert token_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert token_buckets(4096) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
