"""loraplex.lora.catalog: the id rule, what HTTP's resolve may reach, the manager touched only on the
engine thread while requests resolve adapters concurrently, and in-place reloads that never mix
weights within a request. PEFT is the oracle for every token.
"""

from __future__ import annotations

import asyncio
import shutil
import threading

import pytest

from lora_helpers import LOGPROB_ATOL, TinyAdapters, assert_matches_oracle, greedy, lora_engine, step_until_done
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex import AsyncLLMEngine, LoRARequest
from loraplex.errors import InvalidLoRAAdapterError, LoRAAdapterNotFoundError
from resolver_helpers import DictResolver, isolated_registry  # noqa: F401
from tiny_models import PROMPTS, tiny  # noqa: F401

NAMES = ["A", "B", "C", "D"]


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> TinyAdapters:
    return TinyAdapters(tiny.path("llama"), tmp_path_factory.mktemp("catalog_adapters"), NAMES)


@pytest.fixture
def make_engine(tiny):
    return lambda **options: lora_engine(tiny.path("llama"), **options)


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_MISS_TTL", "0")


def generate(engine, names_and_loras: list[tuple[str, object]], num_tokens: int = 4) -> list:
    """One request per (id, lora_request), prompts in turn, stepped to the end; outputs in order."""
    for i, (request_id, lora) in enumerate(names_and_loras):
        engine.add_request(request_id, PROMPTS[i % len(PROMPTS)], greedy(num_tokens), lora_request=lora)
    finished = step_until_done(engine)
    return [finished[request_id] for request_id, _ in names_and_loras]


# ---- ids ------------------------------------------------------------------------------------------------


def test_ids_are_kept_when_free_shared_ids_serve_the_loaded_adapter_strings_get_fresh_ids(make_engine, adapters) -> None:
    engine = make_engine(max_loras=2, max_cpu_loras=4)
    assert engine.add_lora(LoRARequest("A", 7, str(adapters.paths["A"]))) is True
    assert engine.list_adapters()["A"].lora_int_id == 7  # a caller's free id is kept
    # a string gets the next free id, never one in use
    out = generate(engine, [("by-path", str(adapters.paths["B"]))])[0]
    by_path = engine.list_adapters()[str(adapters.paths["B"])]
    assert by_path.lora_int_id not in {7} and out.lora_request is not None
    assert_matches_oracle([out], ["B"], adapters.oracle, LOGPROB_ATOL["tiny"])
    # another name carrying A's id is served with A, as vLLM does, whatever its path
    twin = LoRARequest("twin", 7, str(adapters.paths["C"]))
    outs = generate(engine, [("twin-1", twin), ("twin-2", twin)])
    assert_matches_oracle(outs, ["A", "A"], adapters.oracle, LOGPROB_ATOL["tiny"])
    assert [o.lora_request.lora_name for o in outs] == ["A", "A"]
    assert engine.add_lora(twin) is False and "twin" not in engine.list_adapters()
    # ids the catalog hands out never collide with what callers added
    ids = [r.lora_int_id for r in engine.list_adapters().values()]
    assert len(ids) == len(set(ids))
    request = engine.lora_catalog.request_for("D", str(adapters.paths["D"]))
    assert request.lora_int_id not in ids


def test_a_resolvers_id_that_is_taken_gets_a_fresh_one(make_engine, adapters, isolated_registry, allowed) -> None:  # noqa: F811
    class FixedId(DictResolver):
        async def resolve_lora(self, base_model_name, lora_name):
            found = await super().resolve_lora(base_model_name, lora_name)
            return None if found is None else LoRARequest(lora_name, 1, found.lora_path)

    isolated_registry.register_resolver("fixed", FixedId({"found": adapters.paths["B"]}))
    engine = make_engine(max_loras=2)
    engine.add_lora(LoRARequest("A", 1, str(adapters.paths["A"])))
    found = asyncio.run(engine.resolve_lora("found"))
    assert found.lora_int_id != 1  # never served as A
    outs = generate(engine, [("a", "A"), ("found", "found")])
    assert_matches_oracle(outs, ["A", "B"], adapters.oracle, LOGPROB_ATOL["tiny"])


# ---- what HTTP's resolve may reach ------------------------------------------------------------------------


def test_http_resolve_never_takes_a_path_or_a_hub_id(make_engine, adapters, isolated_registry, allowed,  # noqa: F811
                                                      monkeypatch) -> None:
    import huggingface_hub

    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: downloads.append(a) or str(adapters.paths["C"]))
    resolver = DictResolver({"known-to-resolver": adapters.paths["A"]})
    isolated_registry.register_resolver("dict", resolver)
    engine = make_engine(max_loras=2)
    for name in (str(adapters.paths["B"]), "org/repo"):
        with pytest.raises(LoRAAdapterNotFoundError, match="no resolver found it"):
            asyncio.run(engine.resolve_lora(name))
    assert downloads == [] and engine.list_adapters() == {}
    assert asyncio.run(engine.resolve_lora("known-to-resolver")).lora_path == str(adapters.paths["A"])
    # the Python API takes both: a local directory, and a Hub id when no resolver has the name
    assert engine.lora_catalog.lookup(str(adapters.paths["B"])).lora_path == str(adapters.paths["B"])
    assert engine.lora_catalog.lookup("org/repo").lora_path == str(adapters.paths["C"])
    assert downloads == [("org/repo",)]


# ---- threads --------------------------------------------------------------------------------------------


MUTATIONS = ["add", "replace", "remove", "pin", "ensure_cpu", "acquire", "release", "activate", "record_request",
             "record_generated", "_cache_put", "_activate"]


def test_the_manager_is_changed_on_the_engine_thread_only(tiny, adapters, isolated_registry, allowed) -> None:  # noqa: F811
    isolated_registry.register_resolver("dict", DictResolver({f"r-{n}": adapters.paths[n] for n in "BCD"}, delay=0.01))
    engine = AsyncLLMEngine(lora_engine(tiny.path("llama"), max_loras=2, max_cpu_loras=3))
    manager = engine.engine.lora_manager
    threads: set[str] = set()
    for method in MUTATIONS:
        original = getattr(manager, method)

        def wrapper(*args, _original=original, **kwargs):
            threads.add(threading.current_thread().name)
            return _original(*args, **kwargs)

        setattr(manager, method, wrapper)

    async def one(i: int, name: str | None):
        if name is None:
            lora = None
        elif name.startswith("r-"):
            lora = await engine.resolve_lora(name)  # HTTP's way
        else:
            lora = str(adapters.paths[name])  # the Python API's: a directory
        outs = [o async for o in engine.generate(PROMPTS[i % len(PROMPTS)], greedy(4), f"req-{i}", lora_request=lora)]
        return outs[-1]

    async def main():
        names = [None, "A", "r-B", "r-C", "r-D", "A", "r-B", None] * 3
        return names, await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))

    try:
        names, outs = asyncio.run(asyncio.wait_for(main(), timeout=300))
    finally:
        engine.shutdown()
    assert threads == {"loraplex-engine"}
    assert_matches_oracle(outs, [n[2:] if n and n.startswith("r-") else n for n in names], adapters.oracle,
                          LOGPROB_ATOL["tiny"])


# ---- in-place reload --------------------------------------------------------------------------------------


def test_a_reload_serves_running_requests_the_old_weights_and_later_ones_the_new(make_engine, adapters, tmp_path) -> None:
    swap_dir = tmp_path / "swap"
    shutil.copytree(adapters.paths["A"], swap_dir)
    engine = make_engine(max_loras=2, max_cpu_loras=2)
    engine.add_lora(engine.lora_catalog.request_for("swap", str(swap_dir)))
    swap_id = engine.list_adapters()["swap"].lora_int_id
    engine.add_request("old", PROMPTS[0], greedy(8), lora_request="swap")
    engine.step()
    engine.step()  # "old" runs on A's weights
    # the operator rewrites the files in place, then reloads
    shutil.rmtree(swap_dir)
    shutil.copytree(adapters.paths["B"], swap_dir)
    assert engine.add_lora(LoRARequest("swap", swap_id, str(swap_dir), load_inplace=True)) is True
    engine.add_request("new", PROMPTS[1], greedy(8), lora_request="swap")
    versions = {seq.request_id: seq.adapter_version for r in engine.requests.values() for seq in r.seqs}
    assert versions == {"old": 1, "new": 2}
    finished = step_until_done(engine)
    assert_matches_oracle([finished["old"]], ["A"], adapters.oracle, LOGPROB_ATOL["tiny"])
    assert_matches_oracle([finished["new"]], ["B"], adapters.oracle, LOGPROB_ATOL["tiny"])
    assert_matches_oracle(generate(engine, [("later", "swap")]), ["B"], adapters.oracle, LOGPROB_ATOL["tiny"])
    # evicted, then read from disk again: the new files are the adapter's now (fingerprint accepted)
    for name in "CD":
        engine.add_lora(engine.lora_catalog.request_for(name, str(adapters.paths[name])))
    assert "swap" not in engine.lora_manager.cpu_cache
    assert swap_id not in engine.list_loras() and "swap" in engine.list_adapters()  # vLLM's list_loras: cached ids
    assert_matches_oracle(generate(engine, [("reread", "swap")]), ["B"], adapters.oracle, LOGPROB_ATOL["tiny"])
    assert swap_id in engine.list_loras()


def test_a_bad_reload_leaves_the_old_adapter_serving(make_engine, adapters, tmp_path) -> None:
    engine = make_engine(max_loras=2)
    engine.add_lora(engine.lora_catalog.request_for("swap", str(adapters.paths["A"])))
    before = engine.list_adapters()["swap"]
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "nowhere"):
        with pytest.raises(LoRAAdapterNotFoundError, match="'swap'"):
            engine.add_lora(LoRARequest("swap", before.lora_int_id, str(bad), load_inplace=True))
    with pytest.raises(InvalidLoRAAdapterError, match="names base model"):
        engine.add_lora(LoRARequest("swap", before.lora_int_id, str(adapters.paths["B"]), base_model_name="other/model",
                                    load_inplace=True))
    assert engine.list_adapters()["swap"].lora_path == before.lora_path
    assert engine.lora_catalog.version("swap") == 1 and not engine.lora_catalog.pending_reloads()
    assert_matches_oracle(generate(engine, [("still-a", "swap")]), ["A"], adapters.oracle, LOGPROB_ATOL["tiny"])


def test_async_add_lora_returns_once_the_new_weights_serve(tiny, adapters) -> None:
    engine = AsyncLLMEngine(lora_engine(tiny.path("llama"), max_loras=2))
    order: list[str] = []

    async def main():
        await engine.add_lora(LoRARequest("swap", 1, str(adapters.paths["A"])))

        async def old():
            outs = [o async for o in engine.generate(PROMPTS[0], greedy(12), "old", lora_request="swap")]
            return outs[-1]

        task = asyncio.ensure_future(old())
        while not engine.engine.scheduler.running:
            await asyncio.sleep(0.001)
        assert await engine.add_lora(LoRARequest("swap", 1, str(adapters.paths["B"]), load_inplace=True)) is True
        # it returned once the request started on the old weights had ended, not before
        order.append("reloaded" if "old" not in engine.engine.requests else "reloaded while old ran")
        new = [o async for o in engine.generate(PROMPTS[1], greedy(4), "new", lora_request="swap")][-1]
        return await task, new

    try:
        old_out, new_out = asyncio.run(asyncio.wait_for(main(), timeout=120))
    finally:
        engine.shutdown()
    assert order == ["reloaded"]
    assert_matches_oracle([old_out], ["A"], adapters.oracle, LOGPROB_ATOL["tiny"])
    assert_matches_oracle([new_out], ["B"], adapters.oracle, LOGPROB_ATOL["tiny"])
