"""loraplex.models: every supported architecture against `transformers` as the oracle.

For each tiny random checkpoint (Llama and its variants, Mistral with a sliding window, Qwen2 with
q/k/v bias and with sliding layers, Qwen3 with q/k norm) and for the embedded SmolLM2 model:

* greedy tokens: a batch of prompts of different lengths through `LLM.generate` gives, for every
  prompt, the tokens of transformers' `generate` run on that prompt alone (unpadded). N tokens
  are forced on both sides (`min_tokens=max_tokens=N` / `min_new_tokens=max_new_tokens=N`).
* logits: with `logprobs=20`, the top-20 log-probabilities of every generated step equal
  transformers' `log_softmax` of its logits for the same sequence (one forward over prompt +
  generated tokens), within LOGPROB_ATOL, and they are its true top 20.
"""

from __future__ import annotations

import pytest
import torch

from loraplex import SamplingParams
from tiny_models import PROMPTS, VARIANTS, embedded, hf_greedy, hf_logprobs, tiny  # noqa: F401

# float32 on both sides; measured: the tiny models agree to ~2e-5, the 30-layer embedded model to ~5e-5
LOGPROB_ATOL = {"tiny": 1e-4, "embedded": 2e-4}
# a step whose two best candidates are closer than this is a near-tie in the fixture, not a bug
MIN_MARGIN = 1e-3
NUM_TOKENS = 12


def _assert_greedy_matches(llm, hf, prompts: list[str], num_tokens: int) -> None:
    params = SamplingParams(temperature=0.0, min_tokens=num_tokens, max_tokens=num_tokens)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outputs] == prompts
    lengths = {len(o.prompt_token_ids) for o in outputs}
    assert len(lengths) == len(prompts), "the prompts should have different lengths"
    for out in outputs:
        expected = hf_greedy(hf, out.prompt_token_ids, num_tokens)
        got = out.outputs[0].token_ids
        assert got == expected, f"prompt {out.prompt!r}: loraplex {got} != transformers {expected}"
        assert out.outputs[0].finish_reason == "length"


def _assert_logprobs_match(llm, hf, prompts: list[str], num_tokens: int, atol: float) -> None:
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=num_tokens, logprobs=20)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        prompt_len = len(out.prompt_token_ids)
        reference = hf_logprobs(hf, out.prompt_token_ids + completion.token_ids)  # [L, V]
        assert len(completion.logprobs) == num_tokens
        cumulative = 0.0
        for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            row = reference[prompt_len - 1 + step]  # [V] the distribution this step sampled from
            top_values, top_ids = row.topk(21)
            margin = (top_values[0] - top_values[1]).item()
            assert margin > MIN_MARGIN, f"near-tie in the fixture at step {step} (margin {margin:.1e})"
            assert token == top_ids[0].item(), f"step {step}: greedy token is not transformers' argmax"
            assert len(entry) == 20  # the sampled (greedy) token is itself in the top 20
            ours = sorted(entry.items(), key=lambda item: item[1].rank)
            assert [lp.rank for _, lp in ours] == list(range(1, 21))
            # the same 20 tokens as transformers' top 20 (up to order among near-equal ones)
            boundary = (top_values[19] - top_values[20]).item()
            if boundary > atol:
                assert {tid for tid, _ in ours} == set(top_ids[:20].tolist())
            for tid, lp in ours:
                assert lp.logprob == pytest.approx(row[tid].item(), abs=atol), f"step {step} token {tid}"
            cumulative += row[token].item()
        assert completion.cumulative_logprob == pytest.approx(cumulative, abs=atol * num_tokens)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers(tiny, variant: str) -> None:
    _assert_greedy_matches(tiny.llm(variant), tiny.hf(variant), PROMPTS, NUM_TOKENS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logprobs_match_transformers(tiny, variant: str) -> None:
    _assert_logprobs_match(tiny.llm(variant), tiny.hf(variant), PROMPTS, NUM_TOKENS, LOGPROB_ATOL["tiny"])


def test_embedded_model_greedy_tokens_match_transformers(embedded) -> None:
    _assert_greedy_matches(embedded.llm, embedded.hf, PROMPTS[:3], 6)


def test_embedded_model_logprobs_match_transformers(embedded) -> None:
    _assert_logprobs_match(embedded.llm, embedded.hf, PROMPTS[:2], 6, LOGPROB_ATOL["embedded"])


def test_sliding_window_matters_in_the_test_prompts(tiny) -> None:
    """The Mistral fixture's window changes its logits on these prompts, so the greedy and logits
    tests above would catch an engine that ignored (or misplaced) the window."""
    from tiny_models import load_hf

    windowed = tiny.hf("mistral")
    assert windowed.config.sliding_window == 8
    full = load_hf(tiny.path("mistral"))
    full.config.sliding_window = None
    for layer in full.model.layers:
        layer.self_attn.sliding_window = None
    ids = tiny.llm("mistral").get_tokenizer().encode(PROMPTS[2])
    assert len(ids) > 3 * windowed.config.sliding_window
    a, b = hf_logprobs(windowed, ids), hf_logprobs(full, ids)
    window = windowed.config.sliding_window
    torch.testing.assert_close(a[:window], b[:window], atol=1e-4, rtol=0)  # inside the window: identical
    assert (a[window:] - b[window:]).abs().max() > 0.1  # beyond it: clearly different


def test_model_layout_follows_the_config(tiny) -> None:
    """Switches read from each config: biases, q/k norm, sliding layers, tied head, head_dim."""
    def model(variant):
        return tiny.llm(variant).llm_engine.model

    llama, bias, tied = model("llama"), model("llama_bias"), model("llama_tied")
    assert llama.layers[0].qkv_proj.bias is None and llama.layers[0].o_proj.bias is None
    assert bias.layers[0].qkv_proj.bias is not None and bias.layers[0].o_proj.bias is not None
    assert bias.layers[0].gate_up_proj.bias is not None  # mlp_bias
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    assert llama.lm_head.weight.data_ptr() != llama.embed_tokens.weight.data_ptr()

    qwen2 = model("qwen2")
    assert qwen2.layers[0].qkv_proj.bias is not None and qwen2.layers[0].o_proj.bias is None
    assert qwen2.sliding_window is None

    qwen3 = model("qwen3")
    assert qwen3.layers[0].q_norm is not None and qwen3.layers[0].head_dim == 32
    assert qwen3.layers[0].qkv_proj.out_features == (4 + 2 + 2) * 32

    mistral = model("mistral")
    assert mistral.sliding_window == 8 and all(layer.attn.sliding for layer in mistral.layers)

    sliding = model("qwen2_sliding")
    assert [layer.attn.sliding for layer in sliding.layers] == [False, True, True]
    assert sliding.sliding_window == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen3"])
def test_cuda_float32_matches_transformers(tiny, variant: str) -> None:
    """The same checks on a GPU (float32, so the tolerances above still apply)."""
    from loraplex import LLM

    llm = LLM(str(tiny.path(variant)), device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 20, max_model_len=256)
    _assert_greedy_matches(llm, tiny.hf(variant), PROMPTS, NUM_TOKENS)
    _assert_logprobs_match(llm, tiny.hf(variant), PROMPTS, NUM_TOKENS, LOGPROB_ATOL["tiny"])
