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


@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16", "float16"])
def test_steps_with_adapters_add_their_deltas_as_the_layers_do(tiny, tmp_path, native_calls, monkeypatch,  # noqa: F811
                                                             lora_dtype: str) -> None:
    """Single streams and pairs mixing two adapters and the base model: the native step adds each
    token's own adapter (or none), as the LoRA-wrapped layers do. float16 slots are not read
    natively: steps with adapters then go layer by layer."""
    base = tiny.hf("llama")
    targets = [["q_proj", "v_proj", "down_proj"], ["k_proj", "o_proj", "gate_proj", "up_proj"]]
    loras = [LoRARequest(f"a{i}", i + 1, str(make_adapter(base, tmp_path / f"a{i}", seed=7 + i, r=4 + 4 * i,
                                                          lora_alpha=16, target_modules=modules)))
             for i, modules in enumerate(targets)]
    llm = LLM(str(tiny.path("llama")), enable_lora=True, max_loras=2, max_lora_rank=8, lora_dtype=lora_dtype,
              block_size=4)

    def run() -> list:
        outputs = []
        for requests in ([loras[0]], [loras[1]], [loras[0], loras[1]], [loras[1], None], [None]):
            prompts = [PROMPTS[i] for i in range(len(requests))]
            outputs += llm.generate(prompts, PARAMS, lora_request=requests, use_tqdm=False)
        return [o.outputs[0] for o in outputs]

    native = run()
    assert 1 in native_calls and (2 in native_calls) == (lora_dtype != "float16")  # pairs all have an adapter
    assert native[0].token_ids != native[1].token_ids != native[-1].token_ids  # each adapter changed the answer
    monkeypatch.setattr(NativeDecodeStep, "serves", lambda *args: False)
    native_calls.clear()
    reference = run()
    assert native_calls == []
    assert_same_outputs(native, reference)
