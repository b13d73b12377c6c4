"""quantization="gguf": the embedded model served from its own Q4_1/Q8_0 GGUF weights on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.errors import ConfigError
from loraplex.kernels import quant_cpu
from loraplex.models.decode_step import NativeDecodeStep
from tiny_models import tiny  # noqa: F401

pytestmark = pytest.mark.skipif(not quant_cpu.available(), reason="no C++ compiler for the native CPU kernels")

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# the teacher-forced scoring of benchmarks/perplexity.py, which reports the same comparison
_SPEC = importlib.util.spec_from_file_location("perplexity", Path(__file__).parents[1] / "benchmarks" / "perplexity.py")
perplexity = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(perplexity)
SQL_ADAPTER = Path(__file__).parents[1] / "examples" / "adapters" / "SmolLM2-135M-Instruct" / "sql"
TEXT = ("The lighthouse stood at the end of a narrow spit of rock, and for most of the year nobody visited it. "
        "Its keeper kept a logbook in which she wrote down the weather, the ships she saw and the birds that "
        "rested on the railing.")


@pytest.fixture(scope="module")
def float_llm(embedded_model_path) -> LLM:
    return LLM(str(embedded_model_path), enable_lora=True, max_loras=1, max_lora_rank=8)


@pytest.fixture(scope="module")
def gguf_llm(embedded_model_path) -> LLM:
    return LLM(str(embedded_model_path), quantization="gguf", enable_lora=True, max_loras=1, max_lora_rank=8)


def test_every_projection_holds_the_gguf_weight_of_the_float_one(float_llm, gguf_llm) -> None:
    """The GGUF blocks (q and k rows put back in Hugging Face order) hold exactly the float model's
    values: the embedded model's float weights are that file dequantized."""
    float_model, gguf_model = float_llm.llm_engine.model, gguf_llm.llm_engine.model
    for float_layer, gguf_layer in zip(float_model.layers, gguf_model.layers, strict=True):
        for name in PROJECTIONS:
            quantized = getattr(gguf_layer, name).base.quantized  # under its LoRA wrapper
            assert quantized.kind == "q4_1"
            assert torch.equal(quant_cpu.dequantize(quantized), getattr(float_layer, name).base.weight)
    head = gguf_model.lm_head.quantized
    assert head.kind == "q8_0"  # the tied embedding
    assert torch.equal(quant_cpu.dequantize(head), float_model.lm_head.weight)


def test_decode_steps_score_a_text_as_the_float_model_does(float_llm, gguf_llm) -> None:
    """Quantized activations (int8 per 32 values, as llama.cpp) move each token's log-probability
    a little, not the perplexity: within 2% of the float model's, token by token within 0.3."""
    ids = float_llm.llm_engine.tokenizer.encode(TEXT)
    expected = perplexity.decode_path_logprobs(float_llm, ids)
    actual = perplexity.decode_path_logprobs(gguf_llm, ids)
    assert len(actual) == len(ids) - 1
    assert max(abs(a - b) for a, b in zip(actual, expected)) < 0.3
    assert abs(perplexity.perplexity(actual) / perplexity.perplexity(expected) - 1) < 0.02
    assert actual != expected  # the quantized path did run


def test_greedy_answers_with_and_without_an_adapter_match_the_float_model(float_llm, gguf_llm) -> None:
    """LoRA deltas are added in float on top of the quantized projections: the SQL adapter's
    answer and the base model's are the float model's."""
    lora = LoRARequest("sql", 1, str(SQL_ADAPTER))
    prompt = ("[user] Write a SQL query to answer the question based on the table schema.\n\n context: CREATE TABLE "
              "employees (id INTEGER, name TEXT, salary REAL)\n\n question: What is the highest salary? [/user] "
              "[assistant]")  # the adapter's prompt form (examples/demo_tasks.py)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    answers = []
    for request in (lora, None):
        expected = float_llm.generate([prompt], params, lora_request=request, use_tqdm=False)[0].outputs[0]
        actual = gguf_llm.generate([prompt], params, lora_request=request, use_tqdm=False)[0].outputs[0]
        assert actual.token_ids == expected.token_ids
        answers.append(actual.text)
    assert answers[0].strip().startswith("SELECT MAX(salary)") and answers[0] != answers[1]  # the adapter answered


def test_the_native_step_reads_the_quantized_weights_as_the_layers_do(gguf_llm, monkeypatch) -> None:
    params = SamplingParams(temperature=0.0, min_tokens=16, max_tokens=16, logprobs=2)
    prompts = ["Write a haiku about the sea.", "List three prime numbers.", "Say hello."]

    def run() -> list:
        return [o.outputs[0] for o in gguf_llm.generate(prompts, params, use_tqdm=False)]

    native = run()  # three sequences: steps of up to QUANTIZED_MAX_TOKENS run natively
    monkeypatch.setattr(NativeDecodeStep, "serves", lambda *args: False)
    for a, b in zip(native, run(), strict=True):
        assert a.token_ids == b.token_ids
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            for token, lp in step_b.items():
                assert abs(step_a[token].logprob - lp.logprob) < 1e-4


def test_other_methods_are_refused_with_the_fix(embedded_model_path) -> None:
    with pytest.raises(ConfigError, match=r"quantization='awq' cannot be honoured.*'gguf'"):
        LLM(str(embedded_model_path), quantization="awq")


def test_a_model_directory_without_its_gguf_file_is_refused(tiny) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=r"exactly one \*\.gguf file \(found none\).*beside its config\.json"):
        LLM(str(tiny.path("llama")), quantization="gguf")
