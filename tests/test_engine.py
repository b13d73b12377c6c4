"""loraplex.engine.llm_engine: continuous batching, aborts, preemption, and every way to stop.

Greedy results must not depend on what else is in the batch: each request's tokens equal a solo
run of the same request (the tiny models' logits have no near-ties, see tiny_models.py).
"""

from __future__ import annotations

import pytest

from loraplex import SamplingParams
from loraplex.engine.model_runner import KVCache
from tiny_models import EOS_ID, embedded, run_engine, tiny  # noqa: F401

GREEDY = dict(temperature=0.0, ignore_eos=True)


def solo(tiny, prompt, max_tokens: int, variant: str = "llama") -> list[int]:
    """A request run alone, on the shared engine, greedy: the reference for batched runs."""
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    return tiny.llm(variant).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


# ---- the step loop -----------------------------------------------------------------------------


def test_step_reports_every_request_it_advanced_until_each_finishes(tiny) -> None:
    engine = tiny.engine()
    engine.add_request("a", "First request", SamplingParams(max_tokens=2, **GREEDY))
    engine.add_request("b", "Second request", SamplingParams(max_tokens=4, **GREEDY))
    assert engine.has_unfinished_requests() and engine.get_num_unfinished_requests() == 2
    seen = []
    while engine.has_unfinished_requests():
        seen.append({o.request_id: (len(o.outputs[0].token_ids), o.finished) for o in engine.step()})
    assert seen == [
        {"a": (1, False), "b": (1, False)},
        {"a": (2, True), "b": (2, False)},
        {"b": (3, False)},
        {"b": (4, True)},
    ]
    assert engine.step() == []  # nothing left: an empty step, not an error
    assert engine.get_num_unfinished_requests() == 0


def test_requests_joining_and_leaving_mid_run_get_their_solo_results(tiny) -> None:
    prompts = {
        "a": "The first request is a fairly long prompt that starts the batch off",
        "b": "Second, short",
        "c": "A third arrives while the others are decoding",
        "d": "Fourth: arrives after an abort",
        "e": "Fifth, aborted before it ever runs",
    }
    lengths = {"a": 14, "b": 10, "c": 12, "d": 6, "e": 5}
    engine = tiny.engine()
    params = {rid: SamplingParams(max_tokens=n, **GREEDY) for rid, n in lengths.items()}
    finished = {}

    def step(times: int) -> None:
        for _ in range(times):
            for out in engine.step():
                assert out.request_id not in finished
                if out.finished:
                    finished[out.request_id] = out

    engine.add_request("a", prompts["a"], params["a"])
    engine.add_request("b", prompts["b"], params["b"])
    step(3)
    engine.add_request("c", prompts["c"], params["c"])
    step(2)
    engine.abort_request("b")  # mid-run
    engine.add_request("d", prompts["d"], params["d"])
    engine.add_request("e", prompts["e"], params["e"])
    engine.abort_request(["e", "no-such-request"])  # unknown ids are ignored
    step(100)
    assert not engine.has_unfinished_requests()
    assert sorted(finished) == ["a", "c", "d"]  # aborted requests report nothing more
    for rid in ("a", "c", "d"):
        assert finished[rid].outputs[0].token_ids == solo(tiny, prompts[rid], lengths[rid]), rid
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


@pytest.mark.parametrize("variant", ["mistral", "qwen3"])
def test_batched_decoding_of_ragged_lengths_matches_solo_runs(tiny, variant: str) -> None:
    """Sequences of very different lengths decode together (ragged block tables and masks);
    with Mistral the sliding window cuts each at a different place."""
    prompts = [f"{'word ' * n}end" for n in (1, 13, 33)]
    outputs = tiny.llm(variant).generate(prompts, SamplingParams(max_tokens=16, **GREEDY), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == solo(tiny, prompt, 16, variant)


# ---- preemption and bursts -------------------------------------------------------------------


def _small_cache_engine(tiny, max_model_len: int = 48):
    """KV room for four 16-token blocks: just above one sequence of max_model_len (3 blocks)."""
    layer = tiny.llm("llama").llm_engine.model.layers[0]
    per_token = KVCache.bytes_per_token(2, layer.num_kv_heads, layer.head_dim, layer.qkv_proj.weight.dtype)
    engine = tiny.engine("llama", max_model_len=max_model_len, kv_cache_memory_bytes=4 * 16 * per_token + 100)
    assert engine.scheduler.pool.num_blocks == 4
    return engine


def test_preemption_under_a_tiny_cache_keeps_results_exact(tiny) -> None:
    """Preempted sequences are recomputed; greedy and seeded requests still give solo results."""
    engine = _small_cache_engine(tiny)
    prompts = {f"r{i}": f"Request {i}: " + "tell me more " * (i % 3) for i in range(8)}
    params = {rid: SamplingParams(max_tokens=18 + 2 * i, **GREEDY) for i, rid in enumerate(prompts)}
    for rid in ("r6", "r7"):
        params[rid] = SamplingParams(temperature=1.0, seed=int(rid[1:]), max_tokens=24, ignore_eos=True)
    outputs = run_engine(engine, {rid: (p, params[rid]) for rid, p in prompts.items()})
    assert engine.scheduler.num_preemptions > 0
    llm = tiny.llm("llama")
    for rid, prompt in prompts.items():
        alone = llm.generate([prompt], params[rid], use_tqdm=False)[0].outputs[0].token_ids
        assert outputs[rid].outputs[0].token_ids == alone, rid
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_a_burst_far_beyond_the_cache_finishes_without_crashing(tiny) -> None:
    engine = _small_cache_engine(tiny)
    requests = {}  # 16 requests, 20 sequences: up to 60 blocks' worth for a pool of 4
    for i in range(16):
        if i % 3 == 0:
            params = SamplingParams(max_tokens=8, **GREEDY)
        elif i % 3 == 1:
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=10, ignore_eos=True, n=2)
        else:  # the first one runs to max_model_len
            params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=None if i == 2 else 12)
        requests[f"r{i}"] = ({"prompt_token_ids": list(range(1000 + i, 1010 + i))}, params)
    outputs = run_engine(engine, requests)
    assert sorted(outputs) == sorted(requests)
    assert engine.scheduler.num_preemptions > 0
    for rid, (prompt, params) in requests.items():
        for completion in outputs[rid].outputs:
            if params.max_tokens is not None and params.ignore_eos:
                assert len(completion.token_ids) == params.max_tokens
            assert completion.finish_reason in ("stop", "length")
            assert len(prompt["prompt_token_ids"]) + len(completion.token_ids) <= 48
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


# ---- stopping ---------------------------------------------------------------------------------


def test_max_tokens_ends_with_length(tiny) -> None:
    out = tiny.llm("llama").generate(["Count"], SamplingParams(max_tokens=7, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length" and out.stop_reason is None


def test_reaching_max_model_len_ends_with_length(tiny) -> None:
    engine = tiny.engine(max_model_len=32)
    prompt = list(range(500, 520))  # 20 tokens
    outputs = run_engine(engine, {
        "none": ({"prompt_token_ids": prompt}, SamplingParams(max_tokens=None, **GREEDY)),
        "big": ({"prompt_token_ids": prompt}, SamplingParams(max_tokens=100, **GREEDY)),
        "full": ({"prompt_token_ids": list(range(500, 532))}, SamplingParams(max_tokens=100, **GREEDY)),
    })
    for rid in ("none", "big"):
        completion = outputs[rid].outputs[0]
        assert completion.finish_reason == "length"
        assert len(prompt) + len(completion.token_ids) == 32
    # a prompt of exactly max_model_len is accepted and gets the one token its last position predicts
    assert len(outputs["full"].outputs[0].token_ids) == 1
    assert outputs["full"].outputs[0].finish_reason == "length"


def test_stop_token_ids_end_generation_with_the_token_as_stop_reason(tiny) -> None:
    llm = tiny.llm("llama")
    prompt = "Stop at a token"
    tokens = solo(tiny, prompt, 12)
    k = next(i for i in range(4, 12) if tokens[i] not in tokens[:i])  # first occurrence, mid-run
    params = [
        SamplingParams(max_tokens=12, stop_token_ids=[tokens[k], 3], **GREEDY),
        SamplingParams(max_tokens=12, stop_token_ids=[tokens[k]], include_stop_str_in_output=True, **GREEDY),
    ]
    plain, with_text = (o.outputs[0] for o in llm.generate([prompt, prompt], params, use_tqdm=False))
    tokenizer = llm.get_tokenizer()
    assert "\ufffd" not in tokenizer.decode(tokens[: k + 1])  # whole characters: text is comparable
    for out in (plain, with_text):
        assert out.token_ids == tokens[: k + 1]  # the stop token is the last output token
        assert out.finish_reason == "stop" and out.stop_reason == tokens[k]
    assert plain.text == tokenizer.decode(tokens[:k])  # its text is not shown...
    assert with_text.text == tokenizer.decode(tokens[: k + 1])  # ...unless asked for


CHAT = [{"role": "user", "content": "Write two sentences about the sea."}]


def test_stop_strings_truncate_the_text(embedded) -> None:
    llm = embedded.llm
    base = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    text = base.text
    words = text.split()
    assert len(words) > 8, text
    early = f" {words[3]}"
    early_at = text.find(early)
    late = next(f" {w}" for w in words[7:] if text.find(f" {w}") > early_at + len(early))
    late_at = text.find(late)
    span = text[late_at - 2 : late_at + 3]  # ends of two words and the space: crosses a token boundary
    span_at = text.find(span)
    params = [
        SamplingParams(temperature=0.0, max_tokens=32, stop=late),
        SamplingParams(temperature=0.0, max_tokens=32, stop=late, include_stop_str_in_output=True),
        SamplingParams(temperature=0.0, max_tokens=32, stop=[late, early, "never appears here"]),
        SamplingParams(temperature=0.0, max_tokens=32, stop=span),
    ]
    truncated, included, earliest, spanning = (o.outputs[0] for o in llm.chat([CHAT] * 4, params, use_tqdm=False))
    assert truncated.text == text[:late_at]
    assert truncated.finish_reason == "stop" and truncated.stop_reason == late
    assert included.text == text[: late_at + len(late)]
    assert earliest.text == text[:early_at] and earliest.stop_reason == early
    assert spanning.text == text[:span_at] and spanning.stop_reason == span
    for out in (truncated, included, earliest, spanning):
        assert out.token_ids == base.token_ids[: len(out.token_ids)]  # generation stopped right there
        assert len(out.token_ids) < len(base.token_ids)


def test_eos_ends_with_stop_and_ignore_eos_goes_past_it(embedded) -> None:
    llm = embedded.llm
    messages = [{"role": "user", "content": "What is 2+2? Answer with just the number."}]
    params = [SamplingParams(temperature=0.0, max_tokens=20),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    stopped, ignored = (o.outputs[0] for o in llm.chat([messages, messages], params, use_tqdm=False))
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    assert stopped.token_ids[-1] == EOS_ID and EOS_ID not in stopped.token_ids[:-1]
    assert len(stopped.token_ids) < 20
    assert "4" in stopped.text and "<|im_end|>" not in stopped.text
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 20
    assert ignored.token_ids[: len(stopped.token_ids)] == stopped.token_ids  # went on past EOS
    assert ignored.text.startswith(stopped.text)
