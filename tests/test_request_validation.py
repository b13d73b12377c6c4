"""Requests are validated before anything is allocated (loraplex.engine.llm_engine.add_request,
loraplex.sampling_params, loraplex.config, loraplex.engine.kv_budget).

Every field of SamplingParams and EngineArgs checks its type and range and names itself; prompt
token ids must be ints in the vocabulary. A request refused at `add_request` leaves the engine
exactly as it was (no request, sequence, block, adapter or statistic), and the next good request
still gives the oracle's tokens (transformers, PEFT).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from loraplex import EngineArgs, LLMEngine, SamplingParams
from loraplex.envs import cpu_kv_cache_space_bytes
from loraplex.errors import ConfigError, InvalidRequestError, InvalidSamplingParamsError
from loraplex.engine.kv_budget import DEFAULT_CPU_KV_BYTES, cpu_kv_budget, gpu_kv_budget
from loraplex.sampling_params import MAX_N
from resolver_helpers import tiny_lora  # noqa: F401
from tiny_models import VOCAB_SIZE, hf_greedy, tiny  # noqa: F401

GiB = 1 << 30
PROMPT = "Validation happens before allocation"
GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)


# ---- SamplingParams ---------------------------------------------------------------------------------

BAD_SAMPLING = [
    ("n", 0), ("n", MAX_N + 1), ("n", 10**9), ("n", 1.5), ("n", "2"), ("n", True), ("n", None),
    ("temperature", "0.7"), ("temperature", True), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", -0.1), ("temperature", None), ("temperature", [1.0]),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("top_p", "1"),
    ("top_k", 1.5), ("top_k", "5"), ("top_k", True), ("top_k", -2),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", math.nan), ("min_p", False),
    ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.5), ("seed", "7"), ("seed", True),
    ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", "16"), ("max_tokens", True),
    ("min_tokens", -1), ("min_tokens", 1.5), ("min_tokens", 17),
    ("stop", 5), ("stop", [""]), ("stop", ["a", 5]), ("stop", b"x"), ("stop", {"a"}),
    ("stop_token_ids", 5), ("stop_token_ids", ["1"]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", [-1]), ("stop_token_ids", "12"),
    ("logprobs", 21), ("logprobs", -1), ("logprobs", 1.5), ("logprobs", True),
    ("ignore_eos", "yes"), ("ignore_eos", 1), ("ignore_eos", None),
    ("include_stop_str_in_output", 1), ("skip_special_tokens", "false"), ("spaces_between_special_tokens", 0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1), ("presence_penalty", math.nan), ("presence_penalty", "1"),
    ("frequency_penalty", 3), ("frequency_penalty", None), ("frequency_penalty", True),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("repetition_penalty", None),
    ("logit_bias", {1: 101}), ("logit_bias", {1: -100.5}), ("logit_bias", {"1": 5}), ("logit_bias", {-1: 5}),
    ("logit_bias", {1: math.nan}), ("logit_bias", {True: 1}), ("logit_bias", [(1, 5)]),
    ("bad_words", "word"), ("bad_words", [""]), ("bad_words", ["  "]), ("bad_words", [5]),
    ("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("allowed_token_ids", ["3"]), ("allowed_token_ids", 3),
    ("prompt_logprobs", 21), ("prompt_logprobs", -1), ("prompt_logprobs", 1.0), ("prompt_logprobs", False),
    ("detokenize", 0), ("detokenize", None),
    ("logits_processors", print), ("logits_processors", [5]), ("logits_processors", [lambda logits: logits]),
    ("logits_processors", [lambda a, b, c, d: d]),
]


@pytest.mark.parametrize("field, value", BAD_SAMPLING, ids=[f"{f}={v!r}" for f, v in BAD_SAMPLING])
def test_every_sampling_field_checks_its_type_and_range_and_names_itself(field, value) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**{field: value})


def test_a_seed_must_stay_in_range_for_every_sample() -> None:
    # sample i is seeded with seed + i: the last one must still be a 64-bit seed
    SamplingParams(seed=2**64 - 2, n=2)
    with pytest.raises(InvalidSamplingParamsError, match=r"SamplingParams\.seed must be small enough that seed \+ n - 1 < 2\*\*64"):
        SamplingParams(seed=2**64 - 1, n=2)


def test_accepted_values_are_normalised_to_python_numbers() -> None:
    params = SamplingParams(n=np.int64(2), temperature=np.float32(0.5), top_k=-1, seed=np.uint64(2**64 - 2),
                            max_tokens=np.int32(4), stop=("a", "b"), stop_token_ids=(np.int64(7),), logprobs=np.int8(3))
    assert (type(params.n), type(params.temperature), type(params.seed), type(params.max_tokens)) == (int, float, int, int)
    assert params.top_k == 0 and params.stop_strings == ("a", "b") and params.stop_token_ids == [7]
    assert type(params.stop_token_ids[0]) is int and type(params.logprobs) is int
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-300).greedy  # no overflow to inf


# ---- EngineArgs ---------------------------------------------------------------------------------------

BAD_ENGINE = [
    ("device", "cuda:abc"), ("device", "cuda:"), ("device", "cuda:-1"), ("device", "gpu"), ("device", 5), ("device", None),
    ("dtype", 5), ("dtype", None), ("lora_dtype", 16),
    ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.5), ("seed", "0"), ("seed", True),
    ("max_lora_rank", 1025), ("max_lora_rank", 10**9), ("max_lora_rank", 0), ("max_lora_rank", 16.0), ("max_lora_rank", True),
    ("max_loras", 10**6), ("max_loras", 0), ("max_loras", "2"), ("max_loras", 2.0),
    ("max_num_seqs", True), ("max_num_seqs", 1.5), ("block_size", "16"), ("max_model_len", 1.5), ("max_model_len", True),
    ("max_num_batched_tokens", "x"), ("kv_cache_memory_bytes", 1.5e9), ("kv_cache_memory_bytes", "1GB"),
    ("kv_cache_memory_bytes", True), ("gpu_memory_utilization", "0.9"), ("gpu_memory_utilization", math.nan),
    ("gpu_memory_utilization", True), ("gpu_memory_utilization", 0), ("enable_lora", "yes"), ("enable_lora", 1),
    ("max_cpu_loras", 1.5), ("model", 5), ("model", ""), ("tokenizer", 5), ("served_model_name", ""),
    ("served_model_name", 5),
]


@pytest.mark.parametrize("field, value", BAD_ENGINE, ids=[f"{f}={v!r}" for f, v in BAD_ENGINE])
def test_every_engine_arg_checks_its_type_and_range_and_names_itself(field, value) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} must be"):
        EngineArgs(**{field: value})


def test_engine_args_relations_and_accepted_values() -> None:
    with pytest.raises(ConfigError, match=r"max_loras \(8\) is more than max_num_seqs \(4\).*lower max_loras"):
        EngineArgs(max_loras=8, max_num_seqs=4)
    args = EngineArgs(model=Path("/models/m"), device="cuda:1", seed=2**64 - 1, max_lora_rank=1024, max_loras=np.int64(4),
                      gpu_memory_utilization=np.float32(0.5))
    assert (args.model, args.device, args.max_loras, type(args.max_loras)) == ("/models/m", "cuda:1", 4, int)
    assert type(args.gpu_memory_utilization) is float


# ---- the KV cache budget --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "inf", "-inf", "1e-12"])
def test_a_garbage_vllm_cpu_kvcache_space_is_a_config_error_naming_it(monkeypatch, value) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", value)
    with pytest.raises(ConfigError, match=rf"VLLM_CPU_KVCACHE_SPACE='{value}' is not a positive, finite number of GiB"):
        cpu_kv_cache_space_bytes()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.5")
    assert cpu_kv_cache_space_bytes() == GiB // 2


def test_kv_budgets_must_fit_in_memory(monkeypatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert cpu_kv_budget(None, available=64 * GiB) == DEFAULT_CPU_KV_BYTES
    assert cpu_kv_budget(None, available=2 * GiB) == GiB  # the default shrinks to half of what is available
    assert cpu_kv_budget(2 * GiB, available=2 * GiB) == 2 * GiB
    with pytest.raises(ConfigError, match=r"kv_cache_memory_bytes=3221225472 \(3.00 GiB\) is more than the 2.00 GiB.*"
                                          r"lower kv_cache_memory_bytes to at most 2147483648 bytes"):
        cpu_kv_budget(3 * GiB, available=2 * GiB)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    with pytest.raises(ConfigError, match=r"VLLM_CPU_KVCACHE_SPACE=3 \(3.00 GiB\).*lower VLLM_CPU_KVCACHE_SPACE to at most 2.00"):
        cpu_kv_budget(None, available=2 * GiB)
    assert gpu_kv_budget(None, 0.5, free=10 * GiB, total=16 * GiB) == GiB  # 8 GiB - 6 GiB used - 1 GiB reserve
    with pytest.raises(ConfigError, match=r"kv_cache_memory_bytes=\d+ \(12.00 GiB\) is more than the 10.00 GiB free on the GPU"):
        gpu_kv_budget(12 * GiB, 0.9, free=10 * GiB, total=16 * GiB)


def test_the_engine_refuses_a_kv_budget_larger_than_the_machine(tiny, monkeypatch) -> None:
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    too_big = 1 << 60  # past any machine's memory (and address space): fails cleanly even without the check
    assert too_big > physical
    with pytest.raises(ConfigError, match=r"kv_cache_memory_bytes=\d+ .* is more than the .* of memory this machine has available"):
        tiny.engine(kv_cache_memory_bytes=too_big, device="cpu")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(too_big // GiB))
    with pytest.raises(ConfigError, match=r"VLLM_CPU_KVCACHE_SPACE=\d+ .*lower VLLM_CPU_KVCACHE_SPACE"):
        tiny.engine(kv_cache_memory_bytes=None, device="cpu")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "abc")
    with pytest.raises(ConfigError, match=r"VLLM_CPU_KVCACHE_SPACE='abc'"):
        tiny.engine(kv_cache_memory_bytes=None, device="cpu")


# ---- requests: refused before anything is allocated -----------------------------------------------------


def snapshot(engine: LLMEngine) -> dict:
    """Everything a request could leave behind in the engine."""
    scheduler, manager = engine.scheduler, engine.lora_manager
    state = {
        "requests": sorted(engine.requests),
        "waiting": [seq.seq_id for seq in scheduler.waiting],
        "running": [seq.seq_id for seq in scheduler.running],
        "free_blocks": scheduler.pool.num_free,
        "next_seq_id": repr(engine._seq_ids),  # itertools.count shows its next value without advancing
    }
    if manager is not None:
        state.update(adapters=engine.list_adapters(), cpu_cache=list(manager.cpu_cache), slots=list(manager.slots),
                     in_use=dict(manager.in_use), stats={name: vars(s).copy() for name, s in manager.stats.items()})
    return state


@pytest.fixture(scope="module")
def base(tiny):
    """A tiny engine and transformers' greedy answer for PROMPT."""
    engine = tiny.engine("llama", device="cpu")
    prompt_ids = engine.tokenizer.encode(PROMPT)
    return engine, prompt_ids, hf_greedy(tiny.hf("llama"), prompt_ids, GREEDY["max_tokens"])


def assert_serves_the_oracle(engine: LLMEngine, prompt_ids: list[int], expected: list[int], **lora) -> None:
    engine.add_request("good", {"prompt_token_ids": prompt_ids}, SamplingParams(**GREEDY), **lora)
    finished = {}
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        finished.update({out.request_id: out for out in engine.step() if out.finished})
    assert finished["good"].outputs[0].token_ids == expected


BAD_PROMPTS = [
    pytest.param([1, 2.5, 3], r"prompt must be a list of integer token ids; item 1 is 2\.5 \(float\)", id="float"),
    pytest.param([1, "2"], r"prompt must be a list of integer token ids; item 1 is '2' \(str\)", id="str"),
    pytest.param([True, 5], r"item 0 is True \(bool\)", id="bool"),
    pytest.param([1, 2.5, "x", None, True, [3]], r"prompt must be a list of integer token ids; item 1 is 2\.5", id="mixed-junk"),
    pytest.param({"prompt_token_ids": [1.0, 2.0]}, r"prompt\['prompt_token_ids'\] must be a list of integer token ids; "
                 r"item 0 is 1\.0 \(float\)", id="dict-floats"),
    pytest.param({"prompt_token_ids": "abc"}, r"prompt\['prompt_token_ids'\] must be a list of integer token ids; got str",
                 id="dict-str"),
    pytest.param({"prompt_token_ids": [1, None]}, r"item 1 is None \(NoneType\)", id="dict-none"),
    pytest.param({"prompt_token_ids": [1, 2], "prompt": 7}, r"prompt\['prompt'\] must be a string or absent; got int",
                 id="dict-text-int"),
    pytest.param({"prompt": 5}, r"prompt\['prompt'\] must be a string; got int", id="prompt-int"),
    pytest.param([-1, 5], r"prompt token ids \[-1\] are outside the vocabulary", id="negative"),
    pytest.param([5, VOCAB_SIZE], rf"prompt token ids \[{VOCAB_SIZE}\] are outside the vocabulary", id="past-vocab"),
    pytest.param([], r"the prompt is empty", id="empty"),
    pytest.param(5, r"prompt must be a string.*got int", id="int"),
    pytest.param(None, r"prompt must be a string.*got NoneType", id="none"),
]


@pytest.mark.parametrize("prompt, message", BAD_PROMPTS)
def test_a_bad_prompt_is_refused_and_leaves_the_engine_as_it_was(base, prompt, message) -> None:
    engine, prompt_ids, expected = base
    before = snapshot(engine)
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("bad", prompt, SamplingParams(**GREEDY))
    assert snapshot(engine) == before
    assert engine.step() == []  # nothing was queued: no later step trips over it
    assert_serves_the_oracle(engine, prompt_ids, expected)


def mutated(**fields) -> SamplingParams:
    """Params made valid, then changed: add_request checks them again."""
    params = SamplingParams(**GREEDY)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


BAD_REQUESTS = [
    pytest.param(dict(params=mutated(n=MAX_N + 1)), r"SamplingParams\.n must be", id="n-too-large"),
    pytest.param(dict(params=mutated(temperature="hot")), r"SamplingParams\.temperature must be", id="temperature-str"),
    pytest.param(dict(params=mutated(seed=2**64)), r"SamplingParams\.seed must be", id="seed-out-of-range"),
    pytest.param(dict(params=mutated(stop_token_ids=[1.5])), r"SamplingParams\.stop_token_ids must be", id="stop-ids-float"),
    pytest.param(dict(params={"temperature": 0}), r"params must be a SamplingParams; got dict", id="params-dict"),
    pytest.param(dict(request_id=7), r"request_id must be a string; got int", id="request-id-int"),
    pytest.param(dict(arrival_time=math.nan), r"arrival_time must be None or a finite number", id="arrival-nan"),
]


@pytest.mark.parametrize("change, message", BAD_REQUESTS)
def test_bad_params_are_refused_before_the_adapter_is_loaded(tiny_lora, change, message) -> None:
    from loraplex.testing import peft_greedy_tokens

    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_lora.base), enable_lora=True, max_loras=2, max_lora_rank=8,
                                                   kv_cache_memory_bytes=1 << 20, max_model_len=128, device="cpu"))
    request = {"request_id": "bad", "prompt": PROMPT, "params": SamplingParams(**GREEDY),
               "lora_request": str(tiny_lora.adapter), **change}
    before = snapshot(engine)
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(**request)
    assert snapshot(engine) == before  # no adapter registered or loaded, no request, no statistics
    assert engine.step() == []
    prompt_ids = engine.tokenizer.encode(PROMPT)
    assert_serves_the_oracle(engine, prompt_ids, peft_greedy_tokens(tiny_lora.base, tiny_lora.adapter, PROMPT, 8),
                             lora_request=str(tiny_lora.adapter))
    assert_serves_the_oracle(engine, prompt_ids, peft_greedy_tokens(tiny_lora.base, None, PROMPT, 8))


def test_extreme_but_valid_requests_are_served(base) -> None:
    engine, prompt_ids, expected = base
    # the widest seeds torch accepts, one per sample; a vanishing temperature is greedy
    engine.add_request("seeded", {"prompt_token_ids": prompt_ids}, SamplingParams(n=2, seed=2**64 - 2, max_tokens=2))
    engine.add_request("cold", {"prompt_token_ids": prompt_ids},
                       SamplingParams(temperature=1e-300, max_tokens=8, ignore_eos=True))
    engine.add_request("numpy", [np.int64(token) for token in prompt_ids], SamplingParams(**GREEDY))
    finished = {}
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        finished.update({out.request_id: out for out in engine.step() if out.finished})
    assert len(finished["seeded"].outputs) == 2
    assert finished["cold"].outputs[0].token_ids == expected == finished["numpy"].outputs[0].token_ids
