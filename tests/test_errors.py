"""loraplex.errors: every refusal is a clear, typed error that names the thing at fault, and a bad
request leaves the engine serving the next good one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from loraplex import LLM, EngineArgs, LLMEngine, SamplingParams
from loraplex.errors import (
    ConfigError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    LoraplexError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from loraplex.model_loader.loader import load_config
from tiny_models import VOCAB_SIZE, run_engine, tiny  # noqa: F401

GOOD = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny):
    return tiny.engine("llama", max_model_len=64)


@pytest.fixture(scope="module")
def good_tokens(tiny) -> list[int]:
    return tiny.llm("llama").generate(["A good request"], GOOD, use_tqdm=False)[0].outputs[0].token_ids


def assert_still_serves(engine, good_tokens: list[int]) -> None:
    assert not engine.has_unfinished_requests()
    out = run_engine(engine, {"good": ("A good request", GOOD)})["good"]
    assert out.outputs[0].token_ids == good_tokens
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


# ---- bad requests -------------------------------------------------------------------------------


BAD_PROMPTS = {
    "too-long": (list(range(100, 165)), r"65 tokens long, more than max_model_len=64"),
    "empty-text": ("", r"prompt is empty"),
    "empty-ids": ({"prompt_token_ids": []}, r"prompt is empty"),
    "id-above-vocab": ([5, VOCAB_SIZE, 7], rf"\[{VOCAB_SIZE}\] are outside the vocabulary \[0, {VOCAB_SIZE}\)"),
    "negative-id": ({"prompt_token_ids": [5, -1]}, r"\[-1\] are outside the vocabulary"),
    "wrong-type": (42, r"prompt must be a string.*got int"),
    "dict-without-prompt": ({"text": "hi"}, r"prompt must be a string.*got dict"),
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_bad_prompts_are_refused_and_the_engine_still_serves(engine, good_tokens, name: str) -> None:
    prompt, message = BAD_PROMPTS[name]
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(f"bad-{name}", prompt, GOOD)
    assert_still_serves(engine, good_tokens)


def test_a_duplicate_request_id_is_refused_while_the_first_runs(engine, good_tokens) -> None:
    engine.add_request("dup", "First of two", GOOD)
    with pytest.raises(InvalidRequestError, match=r"request id 'dup' is already in use"):
        engine.add_request("dup", "Second of two", GOOD)
    first = run_engine(engine, {})["dup"]
    assert first.prompt == "First of two" and len(first.outputs[0].token_ids) == 6
    run_engine(engine, {"dup": ("Reused once the first is done", GOOD)})  # a finished id is free again
    assert_still_serves(engine, good_tokens)


def test_a_prompt_of_exactly_max_model_len_is_accepted(engine) -> None:
    out = run_engine(engine, {"edge": (list(range(100, 164)), GOOD)})["edge"]
    assert out.outputs[0].finish_reason == "length"


# ---- SamplingParams ------------------------------------------------------------------------------


INVALID_PARAMS = [
    ("n", dict(n=0)),
    ("temperature", dict(temperature=-0.5)),
    ("temperature", dict(temperature=float("nan"))),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-2)),
    ("min_p", dict(min_p=-0.1)),
    ("min_p", dict(min_p=1.5)),
    ("max_tokens", dict(max_tokens=0)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=5, max_tokens=4)),
    ("logprobs", dict(logprobs=21)),
    ("logprobs", dict(logprobs=-1)),
    ("stop", dict(stop="")),
    ("stop", dict(stop=["ok", ""])),
    ("stop_token_ids", dict(stop_token_ids=[-3])),
]


@pytest.mark.parametrize("field,kwargs", INVALID_PARAMS, ids=[f"{f}={list(k.values())}" for f, k in INVALID_PARAMS])
def test_each_invalid_sampling_param_names_its_field(field: str, kwargs: dict) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=rf"^SamplingParams\.{field} must be .*; got ") as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)  # vLLM-style code catching ValueError keeps working


def test_valid_edge_values_are_accepted() -> None:
    params = SamplingParams(top_k=-1, temperature=0.0, top_p=1.0, min_p=1.0, max_tokens=None, logprobs=20, min_tokens=0)
    assert params.top_k == 0 and params.greedy
    assert SamplingParams(stop="x").stop_strings == ("x",)
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4


# ---- configurations and models ---------------------------------------------------------------------


def _engine(tiny, **options):
    options = {"model": str(tiny.path("llama")), "kv_cache_memory_bytes": 1 << 20, "max_model_len": 64, **options}
    return LLMEngine.from_engine_args(EngineArgs(**options))


def test_an_unknown_model_path_is_refused(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=rf"model '{missing}' is not a directory"):
        LLM(str(missing))


def test_a_model_directory_without_config_json_is_refused(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        LLM(str(tmp_path))


def test_an_unsupported_architecture_is_refused_before_loading_weights(tmp_path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel, which loraplex does not implement; "
                                                    r"supported: LlamaForCausalLM, MistralForCausalLM"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))


def test_a_kv_budget_below_one_sequence_is_refused(tiny) -> None:
    # 512 bytes per token in the tiny Llama: 63 tokens' worth cannot hold one sequence of 64
    with pytest.raises(ConfigError, match=r"fewer than one sequence of max_model_len=64; "
                                          r"raise kv_cache_memory_bytes to at least 32768"):
        _engine(tiny, kv_cache_memory_bytes=512 * 63)
    assert _engine(tiny, kv_cache_memory_bytes=512 * 64).scheduler.pool.num_blocks == 4


def test_max_model_len_above_max_position_embeddings_is_refused(tiny) -> None:
    with pytest.raises(ConfigError, match=r"max_model_len=300 exceeds the model's max_position_embeddings \(256\)"):
        _engine(tiny, max_model_len=300)


def test_max_num_batched_tokens_below_max_model_len_is_refused_without_chunked_prefill(tiny) -> None:
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens \(32\) is smaller than max_model_len \(64\)"):
        _engine(tiny, max_num_batched_tokens=32, enable_chunked_prefill=False)
    assert _engine(tiny, max_num_batched_tokens=32).max_num_batched_tokens == 32  # chunked: allowed


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("dtype", "float8", r"dtype must be 'auto' or one of"),
        ("device", "tpu", r"device must be 'auto', 'cpu' or 'cuda\[:N\]'"),
        ("max_num_seqs", 0, r"max_num_seqs must be a positive integer; got 0"),
        ("block_size", -16, r"block_size must be a positive integer; got -16"),
        ("max_model_len", 0, r"max_model_len must be a positive integer"),
        ("max_num_batched_tokens", 0, r"max_num_batched_tokens must be a positive integer"),
        ("kv_cache_memory_bytes", 0, r"kv_cache_memory_bytes must be a positive integer"),
        ("gpu_memory_utilization", 1.5, r"gpu_memory_utilization must be in \(0, 1\]"),
        ("lora_dtype", "int8", r"lora_dtype must be 'auto' or one of float32, .*; got 'int8'"),
    ],
)
def test_invalid_engine_args_name_the_option(option: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineArgs(**{option: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"device='cuda' was asked for but torch sees no CUDA GPU"):
        EngineArgs(device="cuda").torch_device()


def _copy_model(tiny, tmp_path: Path, **config_changes) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny.path("llama"), target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_weights_that_do_not_fit_the_config_are_refused(tiny, tmp_path) -> None:
    wrong_shape = _copy_model(tiny, tmp_path / "a", intermediate_size=96)
    with pytest.raises(ModelNotFoundError, match=r"do not fit its config: .*has shape \(64, 128\), expected \(64, 96\)"):
        LLM(str(wrong_shape), kv_cache_memory_bytes=1 << 20, max_model_len=64)
    missing_layer = _copy_model(tiny, tmp_path / "b", num_hidden_layers=3)
    with pytest.raises(ModelNotFoundError, match=r"checkpoint lacks tensors the model needs: model\.layers\.2\."):
        LLM(str(missing_layer), kv_cache_memory_bytes=1 << 20, max_model_len=64)


def test_a_model_directory_without_weights_is_refused(tiny, tmp_path) -> None:
    target = _copy_model(tiny, tmp_path)
    (target / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"holds no \*\.safetensors or pytorch_model\*\.bin weights"):
        LLM(str(target), kv_cache_memory_bytes=1 << 20, max_model_len=64)


def test_chat_without_a_chat_template_is_refused(tiny, tmp_path) -> None:
    target = _copy_model(tiny, tmp_path)
    (target / "chat_template.jinja").unlink()
    llm = LLM(str(target), kv_cache_memory_bytes=1 << 20, max_model_len=64)
    with pytest.raises(InvalidRequestError, match=r"has no chat template; pass chat_template=\.\.\."):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    out = llm.chat([{"role": "user", "content": "hi"}], GOOD, use_tqdm=False, chat_template=template)[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("hi\n", add_special_tokens=False)


# ---- the LLM front end ------------------------------------------------------------------------------


def test_a_bad_prompt_in_a_batch_leaves_nothing_queued(tiny, good_tokens) -> None:
    llm = tiny.llm("llama")
    with pytest.raises(InvalidRequestError, match=r"prompt is empty"):
        llm.generate(["A good request", "", "another"], GOOD, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(["A good request"], GOOD, use_tqdm=False)[0].outputs[0].token_ids == good_tokens


def test_one_sampling_params_per_prompt_must_match_the_count(tiny) -> None:
    llm = tiny.llm("llama")
    with pytest.raises(InvalidRequestError, match=r"sampling_params has 2 entries for 3 prompts"):
        llm.generate(["a", "b", "c"], [GOOD, GOOD], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_every_error_derives_from_loraplex_error() -> None:
    for error in (ConfigError, UnsupportedModelError, ModelNotFoundError, InvalidRequestError, InvalidSamplingParamsError):
        assert issubclass(error, LoraplexError)
    assert issubclass(ModelNotFoundError, FileNotFoundError)
    assert issubclass(InvalidRequestError, ValueError) and issubclass(ConfigError, ValueError)
