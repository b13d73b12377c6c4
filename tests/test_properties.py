"""Property tests: generated hostile input never breaks the engine.

Hypothesis throws generated sampling parameters, engine options, prompts and adapter configs at
loraplex. The invariants, for every example:

* the answer is a result or a `LoraplexError` (whose message names what was wrong), never another
  exception and never a hang (each test runs under pytest-timeout);
* a refused request leaves the engine exactly as it was;
* the next good request still equals the oracle (transformers for the base model, PEFT for an
  adapter), so nothing a hostile request did reached anyone else.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_helpers import PeftOracle, greedy, lora_engine, make_adapter
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex import EngineArgs, LoRARequest, SamplingParams
from loraplex.errors import LoraplexError
from tiny_models import PROMPTS, drain, load_hf, tiny  # noqa: F401

# Values of every type a JSON body or a careless caller can produce.
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-5, 60000), st.text(max_size=3), st.floats()), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

SAMPLING_FIELDS = ["n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop",
                   "stop_token_ids", "ignore_eos", "logprobs", "include_stop_str_in_output", "skip_special_tokens"]
ENGINE_FIELDS = ["dtype", "device", "seed", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                 "kv_cache_memory_bytes", "gpu_memory_utilization", "enable_lora", "max_loras", "max_lora_rank",
                 "max_cpu_loras", "lora_dtype"]

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY_SETTINGS
@given(st.dictionaries(st.sampled_from(SAMPLING_FIELDS), ANY_VALUE, max_size=4))
def test_sampling_params_accept_or_name_the_field(fields: dict) -> None:
    try:
        params = SamplingParams(**fields)
    except LoraplexError as exc:
        assert any(name in str(exc) for name in fields), f"{exc} names none of {sorted(fields)}"
        return
    # what was accepted is usable: numbers are finite and in range
    assert isinstance(params.n, int) and params.n >= 1
    assert math.isfinite(params.temperature) and params.temperature >= 0


@PROPERTY_SETTINGS
@given(st.dictionaries(st.sampled_from(ENGINE_FIELDS), ANY_VALUE, max_size=3))
def test_engine_args_accept_or_name_the_field(fields: dict) -> None:
    try:
        EngineArgs(**fields)
    except LoraplexError as exc:
        assert any(name in str(exc) for name in fields), f"{exc} names none of {sorted(fields)}"


# ---- requests against a live engine ---------------------------------------------------------------

PROMPT_VALUES = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.integers(-3, 60000), st.booleans(), st.floats(), st.text(max_size=2)), max_size=12),
    st.fixed_dictionaries({"prompt_token_ids": st.lists(st.one_of(st.integers(-3, 60000), st.floats()), max_size=12)}),
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=20), st.integers())}),
    st.integers(),
    st.none(),
)
GOOD_SAMPLING = st.builds(
    SamplingParams,
    n=st.integers(1, 3),
    temperature=st.sampled_from([0.0, 0.7, 1.5]),
    top_p=st.sampled_from([1.0, 0.9, 0.1]),
    top_k=st.sampled_from([0, 1, 5]),
    min_p=st.sampled_from([0.0, 0.2]),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
    max_tokens=st.integers(1, 6),
    stop=st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    logprobs=st.one_of(st.none(), st.integers(0, 5)),
)


class ServedEngine:
    """One tiny engine with one adapter, and its oracle answers computed once."""

    def __init__(self, tiny, root: Path) -> None:
        path = tiny.path("llama")
        self.adapter_dir = make_adapter(load_hf(path), root / "good", seed=3, r=4, lora_alpha=8, target_modules="all-linear")
        self.good = LoRARequest("good", 1, str(self.adapter_dir))
        self.engine = lora_engine(path, max_loras=2, max_cpu_loras=2, max_lora_rank=8)
        self.engine.add_lora(self.good)
        prompt_ids = self.engine.tokenizer.encode(PROMPTS[1])
        oracle = PeftOracle(load_hf(path), {"good": self.adapter_dir})
        self.prompt_ids = prompt_ids
        self.expected = {name: _oracle_greedy(oracle, name, prompt_ids, 6) for name in (None, "good")}

    def snapshot(self) -> tuple:
        engine = self.engine
        scheduler = engine.scheduler
        manager = engine.lora_manager
        return (engine.get_num_unfinished_requests(), len(scheduler.waiting), len(scheduler.running),
                scheduler.pool.num_free, sorted(engine.list_adapters()), dict(manager.in_use),
                {name: stats.requests for name, stats in manager.stats.items()})

    def assert_still_serves(self) -> None:
        for name, request in ((None, None), ("good", self.good)):
            self.engine.add_request(f"check-{name}", {"prompt_token_ids": self.prompt_ids}, greedy(6, logprobs=None),
                                    lora_request=request)
        outputs = drain(self.engine, max_steps=200)
        assert outputs["check-None"].outputs[0].token_ids == self.expected[None]
        assert outputs["check-good"].outputs[0].token_ids == self.expected["good"]


def _oracle_greedy(oracle: PeftOracle, adapter: str | None, prompt_ids: list[int], count: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(count):
        ids.append(int(oracle.logprobs(adapter, ids)[-1].argmax()))
    return ids[len(prompt_ids):]


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory) -> ServedEngine:
    return ServedEngine(tiny, tmp_path_factory.mktemp("properties"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=PROMPT_VALUES, params=GOOD_SAMPLING, use_adapter=st.booleans(), abort_after=st.integers(0, 3))
def test_any_request_is_served_or_refused_cleanly(served: ServedEngine, prompt, params, use_adapter: bool,
                                                  abort_after: int) -> None:
    engine = served.engine
    before = served.snapshot()
    try:
        engine.add_request("fuzz", prompt, params, lora_request=served.good if use_adapter else None)
    except LoraplexError:
        assert served.snapshot() == before, "a refused request changed the engine"
    else:
        for _ in range(abort_after):
            engine.step()
        engine.abort_request("fuzz")
        drain(engine, max_steps=200)
    served.assert_still_serves()


# ---- adapter configs --------------------------------------------------------------------------------

CONFIG_FIELDS = {
    "r": ANY_VALUE,
    "lora_alpha": ANY_VALUE,
    "use_rslora": ANY_VALUE,
    "rank_pattern": st.one_of(ANY_VALUE, st.dictionaries(st.text(max_size=6), ANY_VALUE, max_size=2)),
    "alpha_pattern": st.one_of(ANY_VALUE, st.dictionaries(st.text(max_size=6), ANY_VALUE, max_size=2)),
    "target_modules": st.one_of(ANY_VALUE, st.text(max_size=10)),
    "peft_type": st.one_of(st.just("LORA"), ANY_VALUE),
    "base_model_name_or_path": ANY_VALUE,
    "layers_to_transform": ANY_VALUE,
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.fixed_dictionaries({}, optional=CONFIG_FIELDS), nesting=st.integers(0, 3))
def test_any_adapter_config_loads_or_is_refused_cleanly(served: ServedEngine, tmp_path_factory, changes: dict,
                                                        nesting: int) -> None:
    root = tmp_path_factory.mktemp("config")
    bad = root / "adapter"
    shutil.copytree(served.adapter_dir, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config.update(changes)
    text = json.dumps(config)
    if nesting:  # deeply nested JSON: a parser's recursion limit must not leak out
        depth = 10_000 * nesting
        text = text[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    (bad / "adapter_config.json").write_text(text)
    engine = served.engine
    before = served.snapshot()
    try:
        engine.add_lora(LoRARequest("fuzzed", 2, str(bad)))
    except LoraplexError:
        assert served.snapshot() == before, "a refused adapter changed the engine"
    else:
        engine.add_request("fuzzed-run", {"prompt_token_ids": served.prompt_ids}, greedy(3, logprobs=None),
                           lora_request="fuzzed")
        drain(engine, max_steps=200)
        engine.remove_lora("fuzzed")
    served.assert_still_serves()
