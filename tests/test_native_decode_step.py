"""The one-call native decode step (loraplex.models.decode_step) against the layer-by-layer path."""

from __future__ import annotations

import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.kernels import decoder_cpu
from loraplex.models.decode_step import NativeDecodeStep
from lora_helpers import make_adapter
from tiny_models import PROMPTS, tiny  # noqa: F401

pytestmark = pytest.mark.skipif(not decoder_cpu.available(), reason="no C++ compiler for the native CPU kernels")

PARAMS = SamplingParams(temperature=0.0, min_tokens=24, max_tokens=24, logprobs=3)


@pytest.fixture
def native_calls(monkeypatch) -> list[int]:
    """The token count of every native step run while the test runs."""
    calls: list[int] = []
    real = decoder_cpu.decode_step

    def counted(model, residual, *args):
        calls.append(residual.shape[0])
        return real(model, residual, *args)

    monkeypatch.setattr(decoder_cpu, "decode_step", counted)
    return calls


def assert_same_outputs(native: list, reference: list) -> None:
    for a, b in zip(native, reference, strict=True):
        assert a.token_ids == b.token_ids
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            for token, lp in step_b.items():
                assert abs(step_a[token].logprob - lp.logprob) < 1e-4


@pytest.mark.parametrize("variant", ["llama_bias", "llama_tied", "mistral", "qwen2", "qwen2_sliding"])
def test_native_steps_decode_as_the_layers_do(tiny, variant: str, native_calls, monkeypatch) -> None:  # noqa: F811
    """Batches of one and two sequences whose contexts cross blocks and sliding windows: the same
    greedy tokens and log-probabilities with the native step as layer by layer."""
    llm = LLM(str(tiny.path(variant)), block_size=4)

    def run() -> list:
        pairs = llm.generate([PROMPTS[0], PROMPTS[1] * 2], PARAMS, use_tqdm=False)
        solo = llm.generate([PROMPTS[2]], PARAMS, use_tqdm=False)
        return [o.outputs[0] for o in pairs + solo]

    native = run()
    assert 1 in native_calls and 2 in native_calls  # the step served both batch sizes
    monkeypatch.setattr(NativeDecodeStep, "serves", lambda *args: False)
    native_calls.clear()
    reference = run()
    assert native_calls == []
    assert_same_outputs(native, reference)


def test_models_with_per_head_norms_decode_layer_by_layer(tiny, native_calls) -> None:  # noqa: F811
    llm = LLM(str(tiny.path("qwen3")))
    llm.generate([PROMPTS[0]], PARAMS, use_tqdm=False)
    assert native_calls == []


def test_a_step_with_an_adapter_goes_layer_by_layer(tiny, tmp_path, native_calls, monkeypatch) -> None:  # noqa: F811
    """The native step applies no adapter: a step where any token has one runs the LoRA-wrapped
    layers, and base-model steps of the same engine still run natively."""
    adapter = make_adapter(tiny.hf("llama"), tmp_path / "adapter", seed=7, r=8, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    llm = LLM(str(tiny.path("llama")), enable_lora=True, max_loras=1, max_lora_rank=8)
    lora = LoRARequest("a", 1, str(adapter))

    def run() -> list:
        with_adapter = llm.generate([PROMPTS[0]], PARAMS, lora_request=lora, use_tqdm=False)
        base = llm.generate([PROMPTS[0]], PARAMS, use_tqdm=False)
        return [o.outputs[0] for o in with_adapter + base]

    native = run()
    assert native_calls and len(native_calls) <= PARAMS.max_tokens  # the base request's decodes only
    assert native[0].token_ids != native[1].token_ids  # the adapter changed the answer
    monkeypatch.setattr(NativeDecodeStep, "serves", lambda *args: False)
    assert_same_outputs(native, run())
