"""loraplex.lora.resolution: unknown adapter names found through the resolvers, in registry order,
with timeouts, single-flight, negative caching and validation; and the engine's use of it."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading

import pytest

from loraplex import LLM, SamplingParams
from loraplex.errors import ConfigError, InvalidLoRAAdapterError, LoRAAdapterNotFoundError, LoRAError
from loraplex.lora.request import LoRARequest
from loraplex.lora.resolution import LoRAResolution
from loraplex.resolver import _LoRAResolverRegistry
from resolver_helpers import DictResolver, HangingResolver, RaisingResolver, isolated_registry, tiny_lora  # noqa: F401


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")


class Validator:
    """A validate callback that records what it saw and refuses paths it is told to."""

    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.seen: list[LoRARequest] = []
        self.refuse = set(refuse)

    def __call__(self, request: LoRARequest) -> None:
        self.seen.append(request)
        if request.lora_path in self.refuse:
            raise InvalidLoRAAdapterError(f"LoRA adapter {request.lora_name!r}: it is a DoRA adapter (use_dora=true)")


def make(*resolvers, validate=None, **options) -> tuple[LoRAResolution, Validator]:
    registry = _LoRAResolverRegistry()
    for i, resolver in enumerate(resolvers):
        registry.register_resolver(f"r{i}", resolver)
    validate = validate or Validator()
    options = {"timeout": 5.0, "miss_ttl": 0.0, **options}
    return LoRAResolution(registry, "tiny-llama", validate, **options), validate


# ---- order, gate ------------------------------------------------------------------------------------


def test_resolvers_are_asked_in_registry_order_and_the_first_find_wins(allowed) -> None:
    r0, r1, r2 = DictResolver(), DictResolver({"a": "/p/one"}), DictResolver({"a": "/p/two"})
    resolution, validate = make(r0, r1, r2)
    request = asyncio.run(resolution.resolve("a"))
    assert request.lora_path == "/p/one" and request.lora_name == "a"
    assert r0.calls == [("tiny-llama", "a")] and r1.calls == [("tiny-llama", "a")] and r2.calls == []
    assert validate.seen == [request]


def test_resolution_needs_runtime_updating(monkeypatch) -> None:
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    resolver = DictResolver({"a": "/p"})
    resolution, _ = make(resolver)
    assert not resolution.enabled
    with pytest.raises(LoRAAdapterNotFoundError, match=r"'a'.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        asyncio.run(resolution.resolve("a"))
    assert resolver.calls == []
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    assert resolution.enabled
    assert not make()[0].enabled  # allowed, but no resolver registered


# ---- single flight ----------------------------------------------------------------------------------


def test_fifty_concurrent_requests_for_one_name_run_the_resolvers_once(allowed) -> None:
    resolver = DictResolver({"new": "/p/new"}, delay=0.05)
    resolution, validate = make(resolver)

    async def fifty():
        return await asyncio.gather(*(resolution.resolve("new") for _ in range(50)))

    results = asyncio.run(fifty())
    assert len(resolver.calls) == 1 and len(validate.seen) == 1
    assert all(r is results[0] for r in results)


def test_concurrent_misses_share_one_run_and_one_error(allowed) -> None:
    resolver = DictResolver(delay=0.05)
    resolution, _ = make(resolver)

    async def twenty():
        return await asyncio.gather(*(resolution.resolve("ghost") for _ in range(20)), return_exceptions=True)

    errors = asyncio.run(twenty())
    assert len(resolver.calls) == 1
    assert all(isinstance(e, LoRAAdapterNotFoundError) for e in errors)
    assert len({str(e) for e in errors}) == 1


def test_single_flight_across_threads_and_event_loops(allowed) -> None:
    resolver = DictResolver({"new": "/p/new"}, delay=0.1)
    resolution, _ = make(resolver)
    results: list[LoRARequest] = []
    barrier = threading.Barrier(6)

    def sync_caller():
        barrier.wait()
        results.append(resolution.resolve_sync("new"))

    def async_caller():
        barrier.wait()
        results.append(asyncio.run(resolution.resolve("new")))

    threads = [threading.Thread(target=sync_caller) for _ in range(3)] + [threading.Thread(target=async_caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 6 and all(r is results[0] for r in results)
    assert len(resolver.calls) == 1


def test_a_cancelled_caller_does_not_cancel_the_others(allowed) -> None:
    resolver = DictResolver({"new": "/p/new"}, delay=0.1)
    resolution, _ = make(resolver)

    async def scenario():
        first = asyncio.ensure_future(resolution.resolve("new"))
        second = asyncio.ensure_future(resolution.resolve("new"))
        await asyncio.sleep(0.02)
        first.cancel()
        return await second, first

    request, first = asyncio.run(scenario())
    assert request.lora_path == "/p/new" and first.cancelled()
    assert len(resolver.calls) == 1


def test_resolve_sync_works_inside_a_running_event_loop(allowed) -> None:
    resolution, _ = make(DictResolver({"a": "/p/a"}))

    async def inside():
        return resolution.resolve_sync("a")  # blocks this loop, runs on the private one

    assert asyncio.run(inside()).lora_path == "/p/a"


# ---- failures: raising, hanging, wrong answers --------------------------------------------------------


def test_a_raising_resolver_is_reported_and_the_next_one_asked(allowed, caplog) -> None:
    broken, good = RaisingResolver(), DictResolver({"a": "/p/a"})
    resolution, _ = make(broken, good)
    with caplog.at_level(logging.WARNING, logger="loraplex.lora.resolution"):
        assert asyncio.run(resolution.resolve("a")).lora_path == "/p/a"
    assert broken.calls == 1
    assert "'r0'" in caplog.text and "ConnectionError: S3 endpoint unreachable" in caplog.text


def test_a_hanging_resolver_times_out_and_the_next_one_is_asked(allowed, caplog) -> None:
    hanging, good = HangingResolver(), DictResolver({"a": "/p/a"})
    resolution, _ = make(hanging, good, timeout=0.05)
    with caplog.at_level(logging.WARNING, logger="loraplex.lora.resolution"):
        assert asyncio.run(resolution.resolve("a")).lora_path == "/p/a"
    assert hanging.calls == 1 and hanging.cancelled == 1
    assert "'r0' timed out" in caplog.text and "0.05 s" in caplog.text


def test_not_found_names_the_adapter_and_every_resolver_with_its_outcome(allowed) -> None:
    resolution, _ = make(DictResolver(), RaisingResolver(PermissionError("access denied")), HangingResolver(), timeout=0.05)
    with pytest.raises(LoRAAdapterNotFoundError) as info:
        asyncio.run(resolution.resolve("ghost"))
    message = str(info.value)
    assert "'ghost'" in message
    assert "'r0': not found" in message
    assert "'r1': error (PermissionError: access denied)" in message
    assert "'r2': timeout (no answer within 0.05 s" in message


class _WrongAnswers(DictResolver):
    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer

    async def resolve_lora(self, base_model_name, lora_name):
        return self.answer


@pytest.mark.parametrize("answer, reason", [
    (LoRARequest("other", 1, "/p/other"), "returned an adapter named 'other' for the name 'a'"),
    ("/p/a", "returned a str, not a LoRARequest or None"),
])
def test_wrong_answers_are_errors_and_the_next_resolver_is_asked(allowed, answer, reason) -> None:
    resolution, _ = make(_WrongAnswers(answer), DictResolver({"a": "/p/a"}))
    assert asyncio.run(resolution.resolve("a")).lora_path == "/p/a"
    resolution, _ = make(_WrongAnswers(answer))
    with pytest.raises(LoRAAdapterNotFoundError, match=reason):
        asyncio.run(resolution.resolve("a"))


# ---- negative caching -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_misses_are_remembered_for_the_ttl_then_forgotten(allowed) -> None:
    resolver, clock = DictResolver(), Clock()
    resolution, _ = make(resolver, miss_ttl=10.0, clock=clock)
    with pytest.raises(LoRAAdapterNotFoundError):
        asyncio.run(resolution.resolve("ghost"))
    for _ in range(100):  # a flood of requests for a bad name
        with pytest.raises(LoRAAdapterNotFoundError, match=r"remembered.*LORAPLEX_LORA_RESOLVER_MISS_TTL"):
            asyncio.run(resolution.resolve("ghost"))
    assert len(resolver.calls) == 1
    clock.now += 9.9
    with pytest.raises(LoRAAdapterNotFoundError, match="remembered"):
        asyncio.run(resolution.resolve("ghost"))
    clock.now += 0.2  # past the TTL: asked again, and now the adapter is there
    resolver.table["ghost"] = "/p/ghost"
    assert asyncio.run(resolution.resolve("ghost")).lora_path == "/p/ghost"
    assert len(resolver.calls) == 2


def test_a_zero_ttl_remembers_nothing(allowed) -> None:
    resolver = DictResolver()
    resolution, _ = make(resolver, miss_ttl=0)
    for _ in range(3):
        with pytest.raises(LoRAAdapterNotFoundError):
            asyncio.run(resolution.resolve("ghost"))
    assert len(resolver.calls) == 3


def test_timeout_and_ttl_come_from_the_environment(allowed, monkeypatch) -> None:
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_TIMEOUT", "2.5")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_MISS_TTL", "0")
    resolution = LoRAResolution(_LoRAResolverRegistry(), "m", Validator())
    assert (resolution.timeout, resolution.miss_ttl) == (2.5, 0.0)
    monkeypatch.delenv("LORAPLEX_LORA_RESOLVER_TIMEOUT")
    monkeypatch.delenv("LORAPLEX_LORA_RESOLVER_MISS_TTL")
    resolution = LoRAResolution(_LoRAResolverRegistry(), "m", Validator())
    assert (resolution.timeout, resolution.miss_ttl) == (30.0, 10.0)
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="LORAPLEX_LORA_RESOLVER_TIMEOUT='soon'"):
        LoRAResolution(_LoRAResolverRegistry(), "m", Validator())


# ---- validation -------------------------------------------------------------------------------------------


def test_an_invalid_adapter_is_an_error_naming_the_resolver_and_is_not_remembered(allowed) -> None:
    resolver = DictResolver({"a": "/p/dora"})
    resolution, validate = make(resolver, validate=Validator(refuse={"/p/dora"}), miss_ttl=60.0)
    with pytest.raises(InvalidLoRAAdapterError) as info:
        asyncio.run(resolution.resolve("a"))
    message = str(info.value)
    assert "'a' was found but could not be loaded" in message
    assert "'r0': invalid (found at '/p/dora' but refused: InvalidLoRAAdapterError" in message and "DoRA" in message
    resolver.table["a"] = "/p/fixed"  # fixed at the source: the next request finds it at once
    assert asyncio.run(resolution.resolve("a")).lora_path == "/p/fixed"
    assert len(resolver.calls) == 2


def test_after_an_invalid_find_the_next_resolver_is_asked(allowed) -> None:
    resolution, _ = make(DictResolver({"a": "/p/dora"}), DictResolver({"a": "/p/good"}), validate=Validator(refuse={"/p/dora"}))
    assert asyncio.run(resolution.resolve("a")).lora_path == "/p/good"


def test_validate_may_be_async(allowed) -> None:
    seen = []

    async def validate(request):
        await asyncio.sleep(0)
        seen.append(request.lora_path)
        if request.lora_path == "/p/bad":
            raise InvalidLoRAAdapterError("refused")

    resolution, _ = make(DictResolver({"a": "/p/bad"}), DictResolver({"a": "/p/a"}), validate=validate)
    assert asyncio.run(resolution.resolve("a")).lora_path == "/p/a"
    assert seen == ["/p/bad", "/p/a"]
    assert resolution.outcome_counts == {("r0", "invalid"): 1, ("r1", "found"): 1}


# ---- the engine ---------------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPT = "Resolvers find adapters"


def tiny_llm(tiny_lora, **options) -> LLM:
    options = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "kv_cache_memory_bytes": 1 << 20,
               "max_model_len": 128, "device": "cpu", **options}
    return LLM(str(tiny_lora.base), **options)


def test_generate_with_a_name_only_a_resolver_knows_gives_pefts_tokens(tiny_lora, isolated_registry, allowed) -> None:
    from loraplex.testing import peft_greedy_tokens

    resolver = DictResolver({"some-name": tiny_lora.adapter})
    isolated_registry.register_resolver("dict", resolver)
    llm = tiny_llm(tiny_lora)
    out = llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request="some-name")[0]
    assert out.outputs[0].token_ids == peft_greedy_tokens(tiny_lora.base, tiny_lora.adapter, PROMPT, 8)
    assert out.lora_request.lora_name == "some-name"
    # resolvers get the model as it was named, like vLLM's model_config.model
    assert resolver.calls == [(str(tiny_lora.base), "some-name")]
    llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request="some-name")  # now known: not asked again
    assert len(resolver.calls) == 1
    base = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert base == peft_greedy_tokens(tiny_lora.base, None, PROMPT, 8) != out.outputs[0].token_ids


def test_the_engine_loads_plugins_once_when_lora_is_enabled(tiny_lora, isolated_registry, monkeypatch) -> None:
    import loraplex.plugins

    calls = []
    monkeypatch.setattr(loraplex.plugins, "load_plugins", lambda *a, **k: calls.append(1) or [])
    tiny_llm(tiny_lora, enable_lora=False)
    assert calls == []
    tiny_llm(tiny_lora)
    assert calls == [1]


def test_without_runtime_updating_resolvers_are_not_asked(tiny_lora, isolated_registry, monkeypatch) -> None:
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    resolver = DictResolver({"some-name": tiny_lora.adapter})
    isolated_registry.register_resolver("dict", resolver)
    llm = tiny_llm(tiny_lora)
    with pytest.raises(LoRAAdapterNotFoundError, match="'some-name'"):
        llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request="some-name")
    assert resolver.calls == []
    with pytest.raises(LoRAAdapterNotFoundError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
        asyncio.run(llm.llm_engine.resolve_lora("some-name"))


def test_an_invalid_adapter_from_a_resolver_fails_that_request_only(tiny_lora, isolated_registry, allowed, tmp_path) -> None:
    dora = tmp_path / "dora"
    shutil.copytree(tiny_lora.adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    isolated_registry.register_resolver("dict", DictResolver({"dora": dora, "misshapen": tiny_lora.misshapen_adapter,
                                                              "good": tiny_lora.adapter}))
    llm = tiny_llm(tiny_lora)
    with pytest.raises(InvalidLoRAAdapterError, match=r"'dora' was found but could not be loaded.*'dict': invalid.*DoRA"):
        llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request="dora")
    with pytest.raises(InvalidLoRAAdapterError, match=r"'misshapen'.*'dict': invalid.*shapes"):
        llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request="misshapen")
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request="good")[0].finished
    assert set(llm.llm_engine.list_adapters()) == {"good"}


def test_async_resolve_lora_and_id_collisions(tiny_lora, isolated_registry, allowed) -> None:
    class FixedId(DictResolver):
        async def resolve_lora(self, base_model_name, lora_name):
            request = await super().resolve_lora(base_model_name, lora_name)
            return None if request is None else LoRARequest(lora_name, 1, request.lora_path)

    isolated_registry.register_resolver("fixed", FixedId({"one": tiny_lora.adapter, "two": tiny_lora.other_adapter}))
    engine = tiny_llm(tiny_lora).llm_engine
    one = asyncio.run(engine.resolve_lora("one"))
    two = asyncio.run(engine.resolve_lora("two"))  # also id 1 from the resolver: given a fresh id
    assert (one.lora_int_id, two.lora_int_id) == (1, 2)
    assert asyncio.run(engine.resolve_lora("one")) is one  # known: straight from the manager
    assert engine.list_loras() == {1, 2}
    with pytest.raises(LoRAAdapterNotFoundError, match=r"'three'.*'fixed': not found"):
        asyncio.run(engine.resolve_lora("three"))


def test_local_directories_and_added_names_come_before_resolvers(tiny_lora, isolated_registry, allowed) -> None:
    resolver = DictResolver({str(tiny_lora.adapter): tiny_lora.other_adapter, "added": tiny_lora.other_adapter})
    isolated_registry.register_resolver("dict", resolver)
    llm = tiny_llm(tiny_lora)
    llm.llm_engine.add_lora(LoRARequest("added", 5, str(tiny_lora.adapter)))
    llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=str(tiny_lora.adapter))
    llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request="added")
    assert resolver.calls == []


def test_a_sync_call_cannot_wait_on_its_own_loop(allowed) -> None:
    resolution, _ = make(DictResolver({"a": "/p/a"}, delay=0.05))

    async def scenario():
        leader = asyncio.ensure_future(resolution.resolve("a"))
        await asyncio.sleep(0.01)
        with pytest.raises(LoRAError, match="being resolved on this thread's event loop"):
            resolution.resolve_sync("a")
        return await leader

    assert asyncio.run(scenario()).lora_path == "/p/a"


# ---- Hub ids: containment -------------------------------------------------------------------------------

HOSTILE_HUB_IDS = ["org/repo/../../x", "org/repo/..", "org/repo//x", "org/../x", "/abs/path", "org/repo/sub\\..\\x",
                   "~/adapters", "~user/repo", "org/repo/./x", "org", "org/re po", "org/repo/x\n"]


@pytest.mark.parametrize("name", HOSTILE_HUB_IDS)
def test_a_hub_id_that_could_leave_the_cache_is_refused_before_any_download(name, monkeypatch) -> None:
    import huggingface_hub

    from loraplex.lora.hub import download_adapter

    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: downloads.append(args) or "/nowhere")
    with pytest.raises(LoRAAdapterNotFoundError, match=r"is neither a local directory nor an added adapter's name nor a Hub"):
        download_adapter(name)
    assert downloads == []
    assert download_adapter("org/repo/sub") == "/nowhere/sub"  # a plain id is downloaded
    assert downloads == [("org/repo",)]


def test_a_hub_adapter_directory_linking_out_of_the_snapshot_is_refused(tmp_path) -> None:
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--org--repo"
    snapshot = repo / "snapshots" / "abc123"
    (snapshot / "good").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (tmp_path / "outside").mkdir()
    for directory in (snapshot / "good", tmp_path / "outside"):
        (directory / "adapter_config.json").write_text("{}")
    (snapshot / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
    code = ("from loraplex.lora.hub import download_adapter\n"
            "print(download_adapter('org/repo/good'))\n"
            "try:\n    download_adapter('org/repo/sub')\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    # HF_HUB_CACHE and HF_HUB_OFFLINE are read once, at import: a fresh process with a pre-built cache
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    good, refused = result.stdout.strip().splitlines()
    assert good == str(snapshot / "good")
    assert refused.startswith("InvalidLoRAAdapterError LoRA adapter 'org/repo/sub'")
    assert f"leads to '{tmp_path / 'outside'}', outside the downloaded snapshot" in refused
