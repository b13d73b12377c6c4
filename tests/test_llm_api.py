"""loraplex.llm: the offline `LLM` API (vLLM's shapes): prompt forms, per-prompt params, order,
output fields, chat, and the embedded default model."""

from __future__ import annotations

import pytest
import torch

import loraplex
from loraplex import LLM, CompletionOutput, RequestOutput, SamplingParams
from tiny_models import EOS_ID, embedded, tiny  # noqa: F401

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_public_names_follow_vllm() -> None:
    for name in ("LLM", "SamplingParams", "EngineArgs", "LLMEngine", "RequestOutput", "CompletionOutput"):
        assert hasattr(loraplex, name), name
    for method in ("from_engine_args", "add_request", "step", "abort_request", "has_unfinished_requests"):
        assert callable(getattr(loraplex.LLMEngine, method)), method


def test_prompt_forms_give_the_same_generation(tiny) -> None:
    llm = tiny.llm("llama")
    text = "Different ways to give one prompt"
    ids = llm.get_tokenizer().encode(text)
    params = SamplingParams(max_tokens=6, **GREEDY)
    outputs = llm.generate([text, {"prompt": text}, {"prompt_token_ids": ids}, ids], params, use_tqdm=False)
    assert len(outputs) == 4
    assert [o.prompt for o in outputs] == [text, text, None, None]
    assert all(o.prompt_token_ids == ids for o in outputs)
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == 1
    # a single prompt, not in a list: a string or one list of token ids
    assert llm.generate(text, params, use_tqdm=False)[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    assert llm.generate(ids, params, use_tqdm=False)[0].prompt_token_ids == ids


def test_one_sampling_params_per_prompt_and_outputs_in_prompt_order(tiny) -> None:
    llm = tiny.llm("llama")
    prompts = ["Longest run first", "Then a short one", "A medium one", "One token"]
    lengths = [20, 3, 9, 1]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in lengths]
    outputs = llm.generate(prompts, params, use_tqdm=False)  # the first finishes last
    assert [o.prompt for o in outputs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outputs] == lengths
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in outputs] == alone


def test_request_and_completion_output_fields(tiny) -> None:
    llm = tiny.llm("llama")
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(["Fields of the output"], SamplingParams(max_tokens=5, **GREEDY))  # with a progress bar
    assert len(outputs) == 1
    out = outputs[0]
    assert isinstance(out, RequestOutput)
    assert isinstance(out.request_id, str) and out.finished
    assert out.prompt == "Fields of the output"
    assert out.prompt_token_ids == tokenizer.encode("Fields of the output")
    assert len(out.outputs) == 1
    completion = out.outputs[0]
    assert isinstance(completion, CompletionOutput)
    assert completion.index == 0
    assert len(completion.token_ids) == 5 and all(isinstance(t, int) for t in completion.token_ids)
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert completion.finish_reason == "length" and completion.finished()
    assert completion.stop_reason is None and completion.logprobs is None and completion.cumulative_logprob is None
    assert out.metrics["arrival_time"] <= out.metrics["first_token_time"]


def test_default_sampling_params_are_vllms(tiny) -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert params.max_tokens == 16 and params.stop_strings == () and params.stop_token_ids == []
    out = tiny.llm("llama").generate(["Defaults"], use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) <= 16


def test_request_ids_are_unique_across_calls(tiny) -> None:
    llm = tiny.llm("llama")
    first = llm.generate(["a", "b"], SamplingParams(max_tokens=1), use_tqdm=False)
    second = llm.generate(["a", "b"], SamplingParams(max_tokens=1), use_tqdm=False)
    ids = [o.request_id for o in first + second]
    assert len(set(ids)) == 4


# ---- chat on the embedded model -------------------------------------------------------------------


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
]


@torch.inference_mode()
def _hf_chat(embedded, conversation, max_new_tokens: int) -> tuple[list[int], list[int]]:
    tokenizer = embedded.tokenizer
    prompt_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
    input_ids = torch.tensor([prompt_ids])
    out = embedded.hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=EOS_ID)
    return prompt_ids, out[0, len(prompt_ids):].tolist()


def test_chat_equals_transformers_with_the_chat_template(embedded) -> None:
    outputs = embedded.llm.chat(CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert len(outputs) == len(CONVERSATIONS)
    for conversation, out in zip(CONVERSATIONS, outputs):
        prompt_ids, expected = _hf_chat(embedded, conversation, 24)
        assert out.prompt_token_ids == prompt_ids
        assert out.outputs[0].token_ids == expected
        if expected[-1] == EOS_ID:
            assert out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].text == embedded.tokenizer.decode(expected, skip_special_tokens=True)


def test_chat_accepts_one_conversation_and_template_options(embedded) -> None:
    llm = embedded.llm
    single = llm.chat(CONVERSATIONS[0], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert len(single) == 1
    prompt_ids, _ = _hf_chat(embedded, CONVERSATIONS[0], 1)
    assert single[0].prompt_token_ids == prompt_ids
    no_prompt = llm.chat(CONVERSATIONS[0], SamplingParams(max_tokens=1), use_tqdm=False, add_generation_prompt=False)
    assert no_prompt[0].prompt_token_ids == prompt_ids[: -len(embedded.tokenizer.encode("<|im_start|>assistant\n"))]


# ---- the embedded default ----------------------------------------------------------------------------


def test_llm_without_a_model_serves_the_embedded_one(embedded, embedded_model_path, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.5")  # GiB; vLLM's variable (the default is 4)
    llm = LLM()
    engine = llm.llm_engine
    assert engine.model_path == embedded_model_path
    assert engine.max_model_len == 8192  # the model's max_position_embeddings
    assert engine.kv_cache.layers[0][0].numel() * 4 * 2 * len(engine.kv_cache.layers) <= (1 << 29)
    params = SamplingParams(max_tokens=6, **GREEDY)
    got = llm.generate(["The embedded model says"], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == embedded.llm.generate(["The embedded model says"], params, use_tqdm=False)[0].outputs[0].token_ids
    del llm, engine


@pytest.mark.parametrize("kwargs", [dict(max_num_seqs=1), dict(block_size=4)], ids=["max_num_seqs=1", "block_size=4"])
def test_engine_options_do_not_change_greedy_results(tiny, kwargs) -> None:
    prompts = ["Options must not change", "what greedy decoding produces", "for any prompt"]
    params = SamplingParams(max_tokens=10, **GREEDY)
    reference = [o.outputs[0].token_ids for o in tiny.llm("llama").generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(tiny.path("llama")), kv_cache_memory_bytes=1 << 20, max_model_len=64, **kwargs)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == reference
