"""loraplex.engine.async_engine: concurrent callers share batches; leaving aborts; failures end cleanly.

Each test drives a real AsyncLLMEngine on a tiny model from asyncio (asyncio.run inside the test)
and compares with the offline LLM.generate of the same requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from loraplex import AsyncLLM, AsyncLLMEngine, EngineArgs, LoRARequest, RequestOutputKind, SamplingParams
from loraplex.errors import EngineDeadError, InvalidRequestError
from tiny_models import PROMPTS, TINY_KV_BYTES, TINY_MAX_MODEL_LEN, tiny  # noqa: F401

GREEDY = dict(temperature=0.0, ignore_eos=True)
CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY
LONG = SamplingParams(max_tokens=None, **GREEDY)  # runs to max_model_len: ~250 steps unless aborted


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a test coroutine; the time limit only turns a hang into a failure."""
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


@pytest.fixture
def engines(tiny) -> Iterator[Any]:
    """make(**options) -> a fresh AsyncLLMEngine on the tiny Llama; all are shut down afterwards."""
    made: list[AsyncLLMEngine] = []

    def make(**options: Any) -> AsyncLLMEngine:
        made.append(AsyncLLMEngine(tiny.engine("llama", **options)))
        return made[-1]

    yield make
    for engine in made:
        engine.shutdown()


def offline(tiny, prompt, params: SamplingParams):
    return tiny.llm("llama").generate([prompt], params, use_tqdm=False)[0]


async def consume(engine: AsyncLLMEngine, prompt, params: SamplingParams, request_id: str, **kw) -> list:
    return [out async for out in engine.generate(prompt, params, request_id, **kw)]


def joined(outputs: list, kind: RequestOutputKind) -> tuple[str, list[int], str | None]:
    """(text, token ids, finish reason) of sample 0 at the end, whatever the output kind."""
    if kind is DELTA:
        pieces = [c for out in outputs for c in out.outputs if c.index == 0]
        return "".join(c.text for c in pieces), [t for c in pieces for t in c.token_ids], pieces[-1].finish_reason
    last = outputs[-1].outputs[0]
    return last.text, list(last.token_ids), last.finish_reason


async def idle(engine: AsyncLLMEngine) -> None:
    """Wait until every command submitted so far has run on the engine thread."""
    await engine.abort("no-such-request")  # commands run in order: this one runs after them


# ---- results and batching ------------------------------------------------------------------------


def test_concurrent_requests_share_batches_and_get_the_offline_results(tiny, engines) -> None:
    engine = engines()
    kinds = [CUMULATIVE, DELTA, FINAL_ONLY]
    requests = {f"r{i}": (prompt, SamplingParams(max_tokens=10 + 3 * i, output_kind=kinds[i % 3], **GREEDY))
                for i, prompt in enumerate(PROMPTS + ["A fifth prompt", "And a sixth"])}

    async def main():
        return await asyncio.gather(*(consume(engine, p, sp, rid) for rid, (p, sp) in requests.items()))

    results = dict(zip(requests, run(main())))
    for rid, (prompt, params) in requests.items():
        want = offline(tiny, prompt, params).outputs[0]
        assert joined(results[rid], params.output_kind) == (want.text, want.token_ids, "length"), rid
        assert results[rid][-1].finished and not any(out.finished for out in results[rid][:-1])
        if params.output_kind is FINAL_ONLY:
            assert len(results[rid]) == 1
    stats = engine.stats()
    assert stats.max_batch_size > 1  # the requests ran together
    assert stats.generation_tokens_total == sum(p.max_tokens for _, p in requests.values())
    assert stats.prompt_tokens_total == sum(len(engine.engine.tokenizer.encode(p)) for p, _ in requests.values())
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert not engine.engine.has_unfinished_requests()


def test_cumulative_outputs_only_grow_and_carry_every_sample(tiny, engines) -> None:
    engine = engines()
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, logprobs=1, ignore_eos=True)
    outputs = run(consume(engine, "Two samples", params, "c"))
    texts = [(out.outputs[0].text, out.outputs[1].text) for out in outputs]
    assert all([c.index for c in out.outputs] == [0, 1] for out in outputs)
    assert all(b[i].startswith(a[i]) for a, b in zip(texts, texts[1:]) for i in (0, 1))
    want = offline(tiny, "Two samples", params)
    for got, expected in zip(outputs[-1].outputs, want.outputs):
        assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids, "length")
        assert got.logprobs == expected.logprobs and got.cumulative_logprob == expected.cumulative_logprob


def test_from_engine_args_and_the_vllm_alias(tiny) -> None:
    assert AsyncLLM is AsyncLLMEngine
    args = EngineArgs(model=str(tiny.path("llama")), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=TINY_MAX_MODEL_LEN)
    engine = AsyncLLM.from_engine_args(args)
    try:
        assert engine.is_running and engine.engine.max_model_len == TINY_MAX_MODEL_LEN
        params = SamplingParams(max_tokens=4, output_kind=FINAL_ONLY, **GREEDY)
        out = run(consume(engine, "Built from args", params, "a"))
        assert out[0].outputs[0].token_ids == offline(tiny, "Built from args", params).outputs[0].token_ids
    finally:
        engine.shutdown()


# ---- leaving early, aborting, bad requests ----------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "aclose"])
def test_a_reader_that_leaves_aborts_its_request(engines, how: str) -> None:
    engine = engines()
    pool = engine.engine.scheduler.pool

    async def main():
        got_one = asyncio.Event()
        if how == "cancel":  # e.g. the HTTP handler's task, cancelled when its client disconnects
            async def reader():
                async for _ in engine.generate("Leaving early", LONG, "r"):
                    got_one.set()

            task = asyncio.create_task(reader())
            await got_one.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            stream = engine.generate("Leaving early", LONG, "r")
            await stream.__anext__()
            await stream.aclose()
        await idle(engine)
        assert not engine.engine.has_unfinished_requests()
        assert pool.num_free == pool.num_blocks
        assert engine.stats().generation_tokens_total < TINY_MAX_MODEL_LEN // 2  # it did not run to its end

    run(main())


def test_abort_ends_the_reader_with_finish_reason_abort(engines) -> None:
    engine = engines()

    async def main():
        outputs = []
        async for out in engine.generate("To be aborted", SamplingParams(max_tokens=None, output_kind=DELTA, **GREEDY), "r"):
            outputs.append(out)
            if len(outputs) == 2:
                await engine.abort("r")
        return outputs

    outputs = run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert not engine.engine.has_unfinished_requests()


def test_a_bad_request_fails_alone(tiny, engines) -> None:
    """Too long a prompt, or an id in use: the caller gets InvalidRequestError at once, and a
    request already running (with that very id, too) is not disturbed."""
    engine = engines()
    good = SamplingParams(max_tokens=30, output_kind=DELTA, **GREEDY)

    async def main():
        first = asyncio.Event()
        outputs = []

        async def good_reader():
            async for out in engine.generate("A good request", good, "good"):
                outputs.append(out)
                first.set()

        task = asyncio.create_task(good_reader())
        await first.wait()
        with pytest.raises(InvalidRequestError, match="more than max_model_len"):
            await consume(engine, list(range(100, 100 + TINY_MAX_MODEL_LEN + 1)), good, "bad")
        with pytest.raises(InvalidRequestError, match="'good' is already in use"):
            await consume(engine, "Same id", good, "good")
        await task
        return outputs

    outputs = run(main())
    want = offline(tiny, "A good request", good).outputs[0]
    assert joined(outputs, DELTA) == (want.text, want.token_ids, "length")


# ---- the loop's end ---------------------------------------------------------------------------------


def test_shutdown_stops_the_thread_and_ends_running_requests(engines) -> None:
    engine = engines()

    async def main():
        stream = engine.generate("Running when the engine stops", LONG, "r")
        await stream.__anext__()
        engine.shutdown()
        assert not engine._thread.is_alive() and not engine.is_running and not engine.errored
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await consume(engine, "After the end", LONG, "late")
        with pytest.raises(EngineDeadError):
            await engine.check_health()

    run(main())
    engine.shutdown()  # again: nothing happens
    assert not engine.engine.has_unfinished_requests()  # its requests were aborted on the way out


def test_a_failing_step_kills_the_engine_and_every_reader_hears_of_it(engines, monkeypatch) -> None:
    engine = engines()
    runner = engine.engine.runner
    execute, calls = runner.execute, []

    def failing(batch):
        calls.append(len(batch.sequences))
        if len(calls) == 6:
            raise RuntimeError("device lost")
        return execute(batch)

    monkeypatch.setattr(runner, "execute", failing)

    async def reader(request_id: str) -> BaseException:
        try:
            async for _ in engine.generate(f"Request {request_id}", LONG, request_id):
                pass
        except EngineDeadError as exc:
            return exc
        raise AssertionError("the request ended without an error")

    async def main():
        await engine.check_health()
        errors = await asyncio.gather(*(reader(rid) for rid in ("a", "b", "c")))
        with pytest.raises(EngineDeadError, match="RuntimeError: device lost"):
            await engine.check_health()
        with pytest.raises(EngineDeadError):
            await consume(engine, "After the failure", LONG, "late")
        with pytest.raises(EngineDeadError):
            await engine.abort("a")
        return errors

    errors = run(main())
    assert all(isinstance(e.__cause__, RuntimeError) for e in errors) and len({id(e) for e in errors}) == 3
    assert engine.errored and not engine.is_running


# ---- adapters -----------------------------------------------------------------------------------------


def test_adapters_are_added_listed_used_and_removed_through_the_engine_thread(tiny, engines, tmp_path) -> None:
    from lora_helpers import lora_llm, make_adapter
    from tiny_models import load_hf

    path = make_adapter(load_hf(tiny.path("llama")), tmp_path / "ad", seed=5, r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"])
    adapter = LoRARequest("ad", 1, str(path))
    engine = engines(enable_lora=True, dtype="float32")
    params = SamplingParams(max_tokens=8, output_kind=FINAL_ONLY, **GREEDY)

    async def main():
        assert await engine.add_lora(adapter) is True
        assert await engine.list_loras() == {1}
        assert (await engine.resolve_lora("ad")).lora_int_id == 1
        by_name = await consume(engine, "With an adapter", params, "n", lora_request="ad")
        by_request = await consume(engine, "With an adapter", params, "r", lora_request=adapter)
        base = await consume(engine, "With an adapter", params, "b")
        assert engine.stats().lora_stats["ad"].requests == 2
        assert await engine.remove_lora("ad") is True
        assert await engine.list_loras() == set()
        return by_name[0], by_request[0], base[0]

    by_name, by_request, base = run(main())
    want = lora_llm(tiny.path("llama")).generate(["With an adapter"], params, lora_request=adapter, use_tqdm=False)[0]
    assert by_name.outputs[0].token_ids == by_request.outputs[0].token_ids == want.outputs[0].token_ids
    assert base.outputs[0].token_ids != want.outputs[0].token_ids  # the adapter mattered
