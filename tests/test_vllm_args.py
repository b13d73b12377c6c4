"""vLLM's habitual engine arguments: honoured, accepted and ignored with one log line, or refused
with the fix, through EngineArgs, LLM(...) and `loraplex serve`'s flags."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from loraplex import LLM, EngineArgs, SamplingParams
from loraplex.cli import build_parser
from loraplex.entrypoints.cli_args import engine_args_from
from loraplex.errors import ConfigError
from loraplex.vllm_compat import VLLM_ARGS, VllmCompatArgs
from tiny_models import TINY_KV_BYTES, TINY_MAX_MODEL_LEN, tiny  # noqa: F401

LOGGER = "loraplex.vllm_compat"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

# values vLLM users pass that change nothing here: no error, no log line
QUIET = [
    ("tensor_parallel_size", 1), ("pipeline_parallel_size", 1), ("data_parallel_size", 1),
    ("enforce_eager", True), ("enforce_eager", False), ("disable_log_stats", True),
    ("disable_custom_all_reduce", True), ("quantization", None), ("kv_cache_dtype", "auto"),
    ("load_format", "safetensors"), ("load_format", "pt"), ("tokenizer_mode", "hf"), ("worker_cls", "auto"),
    ("cpu_offload_gb", 0), ("max_logprobs", 20), ("num_scheduler_steps", 1), ("use_v2_block_manager", True),
    ("revision", "main"), ("fully_sharded_loras", False), ("enable_lora_bias", False),
]
# accepted, one INFO line
IGNORED = [
    ("trust_remote_code", True), ("swap_space", 4), ("swap_space", 0.5), ("max_seq_len_to_capture", 8192),
    ("compilation_config", 3), ("compilation_config", {"level": 3}), ("distributed_executor_backend", "mp"),
    ("num_scheduler_steps", 8), ("use_v2_block_manager", False), ("max_logprobs", 5),
    ("fully_sharded_loras", True), ("lora_extra_vocab_size", 256),
]
# (name, value, a phrase of the fix)
REFUSED = [
    ("tensor_parallel_size", 2, "one device"), ("pipeline_parallel_size", 2, "one loraplex per GPU"),
    ("data_parallel_size", 4, "one device"), ("quantization", "awq", "quantization unset or pass 'gguf'"),
    ("kv_cache_dtype", "fp8", "leave kv_cache_dtype at 'auto'"), ("cpu_offload_gb", 4, "leave cpu_offload_gb at 0"),
    ("worker_cls", "my.Worker", "leave worker_cls at 'auto'"), ("load_format", "dummy", "leave load_format at 'auto'"),
    ("tokenizer_mode", "mistral", "leave tokenizer_mode at 'auto'"), ("max_logprobs", 100, "in [0, 20]"),
    ("max_logprobs", -1, "in [0, 20]"), ("long_lora_scaling_factors", (4.0,), "leave long_lora_scaling_factors unset"),
    ("enable_lora_bias", True, "bias='none'"),
]


def compat_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def test_the_table_and_the_fields_agree() -> None:
    fields = {f.name for f in dataclasses.fields(VllmCompatArgs)}
    assert fields == set(VLLM_ARGS)
    engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert fields <= engine_fields
    # positional use is unchanged: vLLM's arguments are keywords only
    assert EngineArgs("some/model").model == "some/model"


@pytest.mark.parametrize(("name", "value"), QUIET, ids=[f"{n}={v!r}" for n, v in QUIET])
def test_quiet_values_pass_without_a_line(name, value, caplog) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        args = EngineArgs(**{name: value})
    assert getattr(args, name) == value
    assert compat_records(caplog) == []


@pytest.mark.parametrize(("name", "value"), IGNORED, ids=[f"{n}={v!r}" for n, v in IGNORED])
def test_ignored_values_are_logged_once(name, value, caplog) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        EngineArgs(**{name: value})
    [record] = compat_records(caplog)
    assert record.levelno == logging.INFO and f"{name}={value!r}" in record.getMessage()


@pytest.mark.parametrize(("name", "value", "fix"), REFUSED, ids=[f"{n}={v!r}" for n, v, _ in REFUSED])
def test_refused_values_name_the_argument_and_the_fix(name, value, fix) -> None:
    with pytest.raises(ConfigError, match=rf"{name}={value!r}.*cannot be honoured.*".replace("(", r"\(")
                       .replace(")", r"\)")) as error:
        EngineArgs(**{name: value})
    assert fix in str(error.value)
    with pytest.raises(ConfigError, match=name):  # LLM refuses before loading anything
        LLM("no/such-model", **{name: value})


@pytest.mark.parametrize(("name", "value"), [("tensor_parallel_size", True), ("enforce_eager", 1),
                                              ("swap_space", "4"), ("quantization", 4)])
def test_wrong_types_are_refused(name, value) -> None:
    with pytest.raises(ConfigError, match=rf"{name} must be .*; got {value!r}"):
        EngineArgs(**{name: value})


def test_llm_with_vllm_habits_generates_as_without_and_logs_one_line(tiny, caplog) -> None:
    prompts = ["vLLM habits", "change nothing here"]
    reference = [o.outputs[0].token_ids for o in tiny.llm("llama").generate(prompts, GREEDY, use_tqdm=False)]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        llm = LLM(str(tiny.path("llama")), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=TINY_MAX_MODEL_LEN,
                  tensor_parallel_size=1, enforce_eager=True, trust_remote_code=True, swap_space=4,
                  max_seq_len_to_capture=8192, disable_log_stats=True, kv_cache_dtype="auto", quantization=None,
                  revision="main", download_dir="/nonexistent-unused-for-a-local-model", seed=0)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == reference
    [record] = compat_records(caplog)  # one line for the engine, naming every ignored argument
    message = record.getMessage()
    assert "trust_remote_code=True" in message and "swap_space=4" in message and "max_seq_len_to_capture=8192" in message
    assert "enforce_eager" not in message and "tensor_parallel_size" not in message


def test_unknown_arguments_name_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"LLM\(\) got an unknown argument 'tensor_paralel_size'.*"
                                          r"did you mean 'tensor_parallel_size'"):
        LLM("no/such-model", tensor_paralel_size=1)
    with pytest.raises(ConfigError, match=r"'no_such_option': it is not an engine option; see EngineArgs"):
        LLM("no/such-model", no_such_option=1)


def test_serve_flags() -> None:
    args = build_parser().parse_args(["serve", "--enforce-eager", "--trust-remote-code", "--swap-space", "4",
                                      "--tensor-parallel-size", "1", "--max-logprobs", "20"])
    engine_args = engine_args_from(args)
    assert engine_args.enforce_eager and engine_args.trust_remote_code and engine_args.swap_space == 4.0
    refused = build_parser().parse_args(["serve", "--tensor-parallel-size", "2"])
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 cannot be honoured: loraplex runs on one device"):
        engine_args_from(refused)
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--quantization" in help_text and "GGUF weights" in help_text
