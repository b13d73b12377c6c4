"""loraplex.lora.resolver_loop and its use in resolution: a resolver cannot take the process down.

A resolver that raises SystemExit, KeyboardInterrupt, another BaseException or a CancelledError
of its own, or that blocks its event loop with synchronous work, fails that lookup only: it is
reported like an error, the next resolver is asked, the timeout holds, and later lookups work.
A real cancellation of the resolution still propagates. Each resolver runs on an event loop
thread of its own, the same one on every call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from loraplex import LLM, SamplingParams
from loraplex.errors import LoRAAdapterNotFoundError
from loraplex.lora.request import LoRARequest
from loraplex.lora.resolution import LoRAResolution
from loraplex.resolver import LoRAResolver, _LoRAResolverRegistry
from resolver_helpers import DictResolver, isolated_registry, tiny_lora  # noqa: F401

WAIT = 30.0  # an upper bound for things that happen at once; never reached when the code is right


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")


def make(*resolvers, timeout: float = 5.0) -> LoRAResolution:
    registry = _LoRAResolverRegistry()
    for i, resolver in enumerate(resolvers):
        registry.register_resolver(f"r{i}", resolver)
    return LoRAResolution(registry, "tiny-llama", lambda request: None, timeout=timeout, miss_ttl=0.0)


class Quit(BaseException):
    """A BaseException of a resolver's own, like KeyboardInterrupt."""


class RaisingAnything(LoRAResolver):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    async def resolve_lora(self, base_model_name, lora_name):
        self.calls += 1
        raise self.exc


class Blocking(LoRAResolver):
    """Blocks its event loop with synchronous work (until released) inside `async def`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ended = threading.Event()
        self.calls = 0

    async def resolve_lora(self, base_model_name, lora_name):
        self.calls += 1
        self.release.wait(WAIT)  # synchronous: nothing else runs on this loop meanwhile
        self.ended.set()
        return None


class LoopRecorder(DictResolver):
    """Records the loop and thread each call runs on."""

    def __init__(self, table) -> None:
        super().__init__(table)
        self.seen: list[tuple[asyncio.AbstractEventLoop, threading.Thread]] = []

    async def resolve_lora(self, base_model_name, lora_name):
        self.seen.append((asyncio.get_running_loop(), threading.current_thread()))
        return await super().resolve_lora(base_model_name, lora_name)


FAULTS = [
    pytest.param(SystemExit(3), "SystemExit: 3", id="SystemExit"),
    pytest.param(KeyboardInterrupt(), "KeyboardInterrupt", id="KeyboardInterrupt"),
    pytest.param(Quit("bye"), "Quit: bye", id="BaseException"),
    pytest.param(asyncio.CancelledError(), "CancelledError", id="own-CancelledError"),
]


@pytest.mark.parametrize("exc, reason", FAULTS)
def test_a_resolver_raising_a_base_exception_fails_that_lookup_only(allowed, caplog, exc, reason) -> None:
    bad, good = RaisingAnything(exc), DictResolver({"a": "/p/a"})
    resolution = make(bad, good)
    with caplog.at_level(logging.WARNING, logger="loraplex.lora.resolution"):
        assert asyncio.run(resolution.resolve("a")).lora_path == "/p/a"  # the next resolver is asked
    assert f"LoRA resolver 'r0' failed resolving adapter 'a': {reason}" in caplog.text
    alone = make(bad)
    with pytest.raises(LoRAAdapterNotFoundError, match=rf"'r0': error \({reason}\)"):
        asyncio.run(alone.resolve("b"))
    # later lookups work, and the faulty resolver is asked again each time
    assert asyncio.run(resolution.resolve("a")).lora_path == "/p/a"
    assert resolution.resolve_sync("a").lora_path == "/p/a"
    assert bad.calls == 4


def test_a_blocking_resolver_times_out_blocks_only_itself_and_is_not_piled_on(allowed, caplog) -> None:
    blocking, good = Blocking(), DictResolver({"a": "/p/a", "b": "/p/b", "c": "/p/c"})
    resolution = make(blocking, good, timeout=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="loraplex.lora.resolution"):
            assert asyncio.run(resolution.resolve("a")).lora_path == "/p/a"
            # the answer came while the resolver is still blocked: the timeout held
            assert not blocking.ended.is_set()
            assert "'r0' timed out resolving adapter 'a'" in caplog.text
            # still stuck: the next lookups do not queue more work behind it, they skip it
            assert asyncio.run(resolution.resolve("b")).lora_path == "/p/b"
            with pytest.raises(LoRAAdapterNotFoundError, match=r"'r0': busy \(not asked: an earlier call is still running"):
                asyncio.run(make(blocking).resolve("zz"))
        assert blocking.calls == 1
        assert not blocking.ended.is_set()
    finally:
        blocking.release.set()
    assert blocking.ended.wait(WAIT)
    # once its call has ended, it is asked again
    deadline = time.monotonic() + WAIT
    while blocking.calls == 1 and time.monotonic() < deadline:
        assert asyncio.run(resolution.resolve("c")).lora_path == "/p/c"
    assert blocking.calls == 2


def test_a_blocking_resolver_does_not_stall_the_callers_loop(allowed) -> None:
    blocking = Blocking()
    resolution = make(blocking, DictResolver({"a": "/p/a"}), timeout=0.5)
    ticks = []

    async def scenario():
        async def ticker():
            while True:
                if blocking.calls and not blocking.ended.is_set():
                    ticks.append(1)  # this loop ran while the resolver was blocked
                await asyncio.sleep(0.01)

        tick = asyncio.ensure_future(ticker())
        request = await resolution.resolve("a")
        tick.cancel()
        return request, len(ticks)

    try:
        request, ticked = asyncio.run(scenario())
    finally:
        blocking.release.set()
    assert request.lora_path == "/p/a"
    assert ticked > 1  # the caller's loop kept running other work while the resolver was blocked


def test_each_resolver_keeps_one_loop_of_its_own_across_calls(allowed) -> None:
    recorder = LoopRecorder({"a": "/p/a", "b": "/p/b", "c": "/p/c"})
    resolution = make(recorder)
    callers = []

    async def resolve(name):
        callers.append(asyncio.get_running_loop())
        return await resolution.resolve(name)

    asyncio.run(resolve("a"))
    asyncio.run(resolve("b"))
    resolution.resolve_sync("c")
    loops = {loop for loop, _ in recorder.seen}
    threads = {thread for _, thread in recorder.seen}
    assert len(recorder.seen) == 3 and len(loops) == 1 and len(threads) == 1
    assert not loops & set(callers) and threading.main_thread() not in threads


class CancelledWatcher(LoRAResolver):
    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def resolve_lora(self, base_model_name, lora_name):
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return None


def test_a_real_cancellation_of_the_resolution_propagates_and_cancels_the_resolver(allowed) -> None:
    watcher = CancelledWatcher()
    resolution = make(watcher, DictResolver({"a": "/p/a"}), timeout=3600)
    outcome = {}

    async def scenario():
        caller = asyncio.ensure_future(resolution.resolve("a"))
        while not watcher.started.is_set():
            await asyncio.sleep(0.01)
        leader = next(iter(resolution._tasks))
        leader.cancel()  # the resolution itself is cancelled, not by the resolver
        try:
            await caller
        except BaseException as exc:  # noqa: BLE001 - what the waiting caller got
            outcome["caller"] = exc
        outcome["leader_cancelled"] = leader.cancelled()

    asyncio.run(scenario())
    assert outcome["leader_cancelled"] is True
    assert "interrupted (CancelledError)" in str(outcome["caller"])  # an error, not someone else's cancellation
    assert watcher.cancelled.wait(WAIT)  # the resolver's call was cancelled too
    assert not resolution._inflight
    watcher.started.clear()
    resolution.timeout = 0.1
    assert asyncio.run(resolution.resolve("a")).lora_path == "/p/a"  # and later lookups work


def test_a_resolver_whose_resolve_lora_is_not_async_is_an_error(allowed) -> None:
    class Sync(LoRAResolver):
        def resolve_lora(self, base_model_name, lora_name):  # not async
            return LoRARequest(lora_name, 1, "/p/sync")

    with pytest.raises(LoRAAdapterNotFoundError, match=r"'r0': error \(TypeError: resolve_lora returned a LoRARequest, "
                                                        r"not an awaitable; define it with `async def`\)"):
        asyncio.run(make(Sync()).resolve("a"))


# ---- through the engine -------------------------------------------------------------------------


def test_generate_survives_a_resolver_that_calls_sys_exit(tiny_lora, isolated_registry, allowed) -> None:
    from loraplex.testing import peft_greedy_tokens

    exiting = RaisingAnything(SystemExit(1))
    isolated_registry.register_resolver("exiting", exiting)
    isolated_registry.register_resolver("dict", DictResolver({"some-name": tiny_lora.adapter}))
    llm = LLM(str(tiny_lora.base), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes=1 << 20,
              max_model_len=128, device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = llm.generate("Resolvers fail", params, use_tqdm=False, lora_request="some-name")[0]
    assert out.outputs[0].token_ids == peft_greedy_tokens(tiny_lora.base, tiny_lora.adapter, "Resolvers fail", 6)
    assert exiting.calls == 1
    with pytest.raises(LoRAAdapterNotFoundError, match=r"'exiting': error \(SystemExit: 1\)"):
        llm.generate("Resolvers fail", params, use_tqdm=False, lora_request="other-name")
    assert llm.generate("Resolvers fail", params, use_tqdm=False)[0].finished  # the engine still serves
