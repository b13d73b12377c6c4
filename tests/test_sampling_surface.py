"""The logit controls and outputs vLLM users rely on: presence / frequency / repetition
penalties, logit_bias, bad_words, allowed_token_ids, logits_processors, prompt_logprobs and
detokenize=False, offline and over HTTP.

Each control is checked against a reference written here, token by token, on transformers'
logits: greedy decoding with the control's rule applied in a plain Python loop must give the
engine's tokens exactly. Every reference is also checked to differ from plain greedy decoding,
so a control that did nothing would fail. Rows with and without each control share one step
and give the tokens they give alone.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from loraplex import AsyncLLMEngine, EngineArgs, SamplingParams
from loraplex.engine.logits_controls import bad_word_bans
from loraplex.entrypoints.openai.api_server import build_app
from loraplex.errors import InvalidRequestError, InvalidSamplingParamsError
from server_helpers import ServerThread, assert_error
from tiny_models import TINY_KV_BYTES, TINY_MAX_MODEL_LEN, VOCAB_SIZE, hf_logprobs, run_engine, tiny  # noqa: F401

PROMPT = "The cat sat on the mat and the cat sat on the"
TOKENS = 12
GREEDY = dict(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)

# (prompt ids, output ids so far, logits [V]) -> logits [V]
Rule = Callable[[list[int], list[int], torch.Tensor], torch.Tensor]


@torch.inference_mode()
def reference(hf, prompt_ids: list[int], rule: Rule, num_tokens: int = TOKENS) -> list[int]:
    """Greedy tokens from transformers' logits with `rule` applied at every step."""
    output: list[int] = []
    for _ in range(num_tokens):
        logits = hf(torch.tensor([prompt_ids + output])).logits[0, -1].float().clone()  # [V]
        output.append(int(rule(prompt_ids, output, logits).argmax()))
    return output


def plain(prompt_ids: list[int], output: list[int], logits: torch.Tensor) -> torch.Tensor:
    return logits


# ---- the rules, one token at a time ---------------------------------------------------------------


def presence(penalty: float) -> Rule:
    def rule(prompt_ids, output, logits):
        for token in set(output):
            logits[token] -= penalty
        return logits
    return rule


def frequency(penalty: float) -> Rule:
    def rule(prompt_ids, output, logits):
        for token in output:  # once per occurrence
            logits[token] -= penalty
        return logits
    return rule


def repetition(penalty: float) -> Rule:
    def rule(prompt_ids, output, logits):
        for token in set(prompt_ids) | set(output):
            value = float(logits[token])
            logits[token] = value / penalty if value > 0 else value * penalty
        return logits
    return rule


def bias(table: dict[int, float]) -> Rule:
    def rule(prompt_ids, output, logits):
        for token, value in table.items():
            logits[token] += value
        return logits
    return rule


def allowed(ids: list[int]) -> Rule:
    def rule(prompt_ids, output, logits):
        kept = logits.clone()
        logits.fill_(float("-inf"))
        for token in ids:
            logits[token] = kept[token]
        return logits
    return rule


def banned_words(sequences: list[list[int]]) -> Rule:
    def rule(prompt_ids, output, logits):
        for ids in sequences:
            *prefix, last = ids
            if len(prefix) <= len(output) and output[len(output) - len(prefix):] == prefix:
                logits[last] = float("-inf")
        return logits
    return rule


def chain(*rules: Rule) -> Rule:
    def rule(prompt_ids, output, logits):
        for each in rules:
            logits = each(prompt_ids, output, logits)
        return logits
    return rule


def bad_word_sequences(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad words: as written, and with a leading space when that gives a
    different first token and the same length."""
    sequences = []
    for word in words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        sequences.append(bare)
        if spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    return sequences


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny):
    return tiny.llm("llama")


@pytest.fixture(scope="module")
def hf(tiny):
    return tiny.hf("llama")


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[int]:
    return llm.get_tokenizer().encode(PROMPT)


@pytest.fixture(scope="module")
def greedy(hf, prompt_ids) -> list[int]:
    return reference(hf, prompt_ids, plain)


def generate(llm, prompt_ids: list[int], **params) -> list[int]:
    out = llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(**{**GREEDY, **params}), use_tqdm=False)
    return out[0].outputs[0].token_ids


# ---- each control against its reference -----------------------------------------------------------

# The random tiny model rarely repeats a token, so a penalty alone would change nothing: the
# penalty cases add REPEAT_BIAS to the first greedy token, which then recurs, and compare with
# that bias alone. name -> (params, rule, the rule without the control under test)
REPEAT_BIAS = 4.0


def controls(first: int) -> dict[str, tuple[dict, Rule, Rule]]:
    repeat = {first: REPEAT_BIAS}
    with_bias = lambda rule: chain(bias(repeat), rule)  # noqa: E731
    return {
        "presence_penalty": (dict(logit_bias=repeat, presence_penalty=2.0), with_bias(presence(2.0)), bias(repeat)),
        "negative_presence_penalty": (dict(presence_penalty=-2.0), presence(-2.0), plain),
        "frequency_penalty": (dict(logit_bias=repeat, frequency_penalty=1.5), with_bias(frequency(1.5)), bias(repeat)),
        "repetition_penalty": (dict(logit_bias=repeat, repetition_penalty=1.8), with_bias(repetition(1.8)),
                               bias(repeat)),
        "repetition_penalty_below_1": (dict(repetition_penalty=0.5), repetition(0.5), plain),
        "logit_bias": (dict(logit_bias={42: 30.0, 4242: 29.5, first: -100.0}), bias({42: 30.0, 4242: 29.5, first: -100.0}),
                       plain),
        # vLLM's order: logit_bias first, then repetition, frequency, presence
        "everything": (dict(logit_bias=repeat, repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.4),
                       with_bias(chain(repetition(1.3), frequency(0.7), presence(0.4))), bias(repeat)),
    }


CONTROL_NAMES = ["presence_penalty", "negative_presence_penalty", "frequency_penalty", "repetition_penalty",
                 "repetition_penalty_below_1", "logit_bias", "everything"]


@pytest.mark.parametrize("name", CONTROL_NAMES)
def test_each_control_matches_its_reference_on_transformers_logits(llm, hf, prompt_ids, greedy, name) -> None:
    params, rule, without = controls(greedy[0])[name]
    expected = reference(hf, prompt_ids, rule)
    assert expected != reference(hf, prompt_ids, without), f"{name} changes nothing here: the test lost its point"
    assert generate(llm, prompt_ids, **params) == expected


def test_allowed_token_ids_restrict_the_output(llm, hf, prompt_ids, greedy) -> None:
    ids = [100, 200, 300, 4000, 4242]
    assert not set(ids) & set(greedy)
    expected = reference(hf, prompt_ids, allowed(ids))
    out = generate(llm, prompt_ids, allowed_token_ids=ids)
    assert out == expected
    assert set(out) <= set(ids)
    # sampled too: never outside the set
    hot = generate(llm, prompt_ids, temperature=1.5, seed=3, allowed_token_ids=ids)
    assert set(hot) <= set(ids)


def test_bad_words_are_never_produced(llm, hf, prompt_ids, greedy) -> None:
    tokenizer = llm.get_tokenizer()
    # words the plain greedy output contains, one of them spanning several tokens
    words = [tokenizer.decode([greedy[0]]).strip(), tokenizer.decode(greedy[3:5]).strip()]
    sequences = bad_word_sequences(tokenizer, words)
    assert any(len(ids) > 1 for ids in sequences)
    expected = reference(hf, prompt_ids, banned_words(sequences))
    assert expected != greedy
    out = generate(llm, prompt_ids, bad_words=words)
    assert out == expected
    for ids in sequences:
        assert not any(out[i : i + len(ids)] == ids for i in range(len(out))), (ids, out)
    hot = generate(llm, prompt_ids, temperature=1.0, seed=5, max_tokens=40, bad_words=words)
    for ids in sequences:
        assert not any(hot[i : i + len(ids)] == ids for i in range(len(hot)))


def test_a_multi_token_bad_word_bans_its_last_token_only_after_its_prefix() -> None:
    words = [[7], [1, 2, 3], [5, 9]]
    assert bad_word_bans(words, []) == [7]
    assert bad_word_bans(words, [4, 1, 2]) == [7, 3]
    assert bad_word_bans(words, [1, 2, 4]) == [7]
    assert bad_word_bans(words, [5]) == [7, 9]


def test_logits_processors_run_on_their_own_row(llm, hf, prompt_ids, greedy) -> None:
    seen: list[tuple[int, ...]] = []

    def every_other(output_ids, logits):  # vLLM's two-argument form
        seen.append(tuple(output_ids))
        if len(output_ids) % 2 == 0:
            logits[777] += 50.0
        return logits

    def with_prompt(prompt, output_ids, logits):  # the three-argument form
        assert list(prompt) == prompt_ids
        logits[int(prompt[-1])] += 40.0
        return logits

    def rule(prompt, output, logits):
        if len(output) % 2 == 0:
            logits[777] += 50.0
        logits[prompt[-1]] += 40.0
        return logits

    expected = reference(hf, prompt_ids, rule)
    assert expected != greedy
    engine_out = run_engine(llm.llm_engine, {
        "processed": ({"prompt_token_ids": prompt_ids},
                      SamplingParams(**GREEDY, logits_processors=[every_other, with_prompt])),
        "plain": ({"prompt_token_ids": prompt_ids}, SamplingParams(**GREEDY)),
    })
    assert engine_out["processed"].outputs[0].token_ids == expected
    assert engine_out["plain"].outputs[0].token_ids == greedy
    assert seen == [tuple(expected[:i]) for i in range(TOKENS)]  # once per step, with its own outputs


def test_a_logits_processor_that_returns_garbage_is_named(llm, prompt_ids) -> None:
    with pytest.raises(InvalidSamplingParamsError, match="logits_processors"):
        generate(llm, prompt_ids, logits_processors=[lambda output, logits: None])


def test_rows_with_and_without_each_control_in_one_step_give_their_own_tokens(tiny, prompt_ids, greedy) -> None:
    """One engine, every request added before the first step: they share every step."""
    controls_ = {name: params for name, (params, _, _) in controls(greedy[0]).items()}
    controls_.update(
        allowed=dict(allowed_token_ids=[100, 200, 300, 4000, 4242]),
        bad_words=dict(bad_words=["cat", "mat"]),
        processor=dict(logits_processors=[lambda output, logits: logits.index_fill_(0, torch.tensor([42]), 30.0)]),
        plain={},
    )
    other = tiny.llm("llama").get_tokenizer().encode("A different prompt, of another length")
    llm = tiny.llm("llama")
    alone = {f"{name}-{which}": generate(llm, ids, **params)
             for name, params in controls_.items() for which, ids in (("a", prompt_ids), ("b", other))}
    mixed = run_engine(tiny.engine(), {
        f"{name}-{which}": ({"prompt_token_ids": ids}, SamplingParams(**GREEDY, **params))
        for name, params in controls_.items() for which, ids in (("a", prompt_ids), ("b", other))
    })
    for request_id, tokens in alone.items():
        assert mixed[request_id].outputs[0].token_ids == tokens, request_id
    assert len({tuple(tokens) for key, tokens in alone.items() if key.endswith("-a")}) > 5


def test_penalties_count_each_sample_s_own_output(llm, prompt_ids) -> None:
    """n samples: each one's presence penalty counts its own tokens, not its siblings'."""
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=TOKENS, ignore_eos=True, presence_penalty=2.0)
    together = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs
    for completion in together:
        alone = SamplingParams(temperature=1.0, seed=11 + completion.index, max_tokens=TOKENS, ignore_eos=True,
                               presence_penalty=2.0)
        assert generate(llm, prompt_ids, **vars_of(alone)) == completion.token_ids


def vars_of(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name, f in params.__dataclass_fields__.items() if f.init}


# ---- prompt logprobs and detokenize --------------------------------------------------------------------


def test_prompt_logprobs_equal_transformers_log_softmax(llm, hf, prompt_ids) -> None:
    out = llm.generate([{"prompt_token_ids": prompt_ids}],
                       SamplingParams(**GREEDY, prompt_logprobs=3, n=2, seed=1), use_tqdm=False)[0]
    expected = hf_logprobs(hf, prompt_ids)  # [P, V]: row j predicts token j + 1
    assert len(out.prompt_logprobs) == len(prompt_ids)
    assert out.prompt_logprobs[0] is None
    tokenizer = llm.get_tokenizer()
    for position in range(1, len(prompt_ids)):
        entry, row, token = out.prompt_logprobs[position], expected[position - 1], prompt_ids[position]
        top3 = row.topk(3).indices.tolist()
        assert [tid for tid, lp in entry.items() if lp.rank <= 3] == top3
        assert set(entry) == set(top3) | {token}
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(row[tid].item(), abs=1e-4)
            assert lp.decoded_token == tokenizer.decode([tid])
    assert any(out.prompt_logprobs[p][prompt_ids[p]].rank > 3 for p in range(1, len(prompt_ids)))
    # the generated tokens are unchanged by it
    assert [c.token_ids for c in out.outputs][0] == generate(llm, prompt_ids, n=2, seed=1)


def test_prompt_logprobs_in_a_mixed_batch_and_in_delta_outputs(tiny, hf, prompt_ids) -> None:
    engine = tiny.engine()
    from loraplex.sampling_params import RequestOutputKind

    engine.add_request("p", {"prompt_token_ids": prompt_ids},
                       SamplingParams(**GREEDY, prompt_logprobs=0, output_kind=RequestOutputKind.DELTA))
    engine.add_request("q", "Something else", SamplingParams(**GREEDY))
    engine.add_request("r", {"prompt_token_ids": prompt_ids[:1]}, SamplingParams(**GREEDY, prompt_logprobs=2))
    outputs: dict[str, list] = {"p": [], "q": [], "r": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    delta = [out.prompt_logprobs for out in outputs["p"]]
    assert delta[0] is not None and all(lp is None for lp in delta[1:])
    expected = hf_logprobs(hf, prompt_ids)
    assert [list(entry) for entry in delta[0][1:]] == [[t] for t in prompt_ids[1:]]
    assert [e[t].logprob for e, t in zip(delta[0][1:], prompt_ids[1:])] == pytest.approx(
        [expected[j, t].item() for j, t in enumerate(prompt_ids[1:])], abs=1e-4)
    assert all(out.prompt_logprobs is None for out in outputs["q"])
    assert outputs["r"][-1].prompt_logprobs == [None]  # a one-token prompt: nothing predicts it


def test_detokenize_false_returns_ids_without_text(llm, prompt_ids, greedy) -> None:
    out = llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(**GREEDY, detokenize=False, logprobs=1),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "" and out.token_ids == greedy
    assert all(lp.decoded_token is None for entry in out.logprobs for lp in entry.values())
    with pytest.raises(InvalidSamplingParamsError, match="stop"):
        SamplingParams(detokenize=False, stop=["x"])


def test_token_ids_outside_the_vocabulary_are_refused_at_add_request(tiny) -> None:
    engine = tiny.engine()
    for field, value in (("allowed_token_ids", [VOCAB_SIZE]), ("logit_bias", {VOCAB_SIZE + 5: 1.0})):
        with pytest.raises(InvalidRequestError, match=rf"SamplingParams\.{field} must be made of token ids inside"):
            engine.add_request("x", "hello", SamplingParams(**{field: value}))
        assert not engine.has_unfinished_requests()


# ---- over HTTP ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny):
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(
        model=str(tiny.path("llama")), served_model_name="tiny", dtype="float32", device="cpu",
        kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=TINY_MAX_MODEL_LEN,
    ))
    running = ServerThread(build_app(engine))
    yield running
    running.stop()
    engine.shutdown()


def http_controls(name: str, first: int, bad: list[str]) -> tuple[dict, dict]:
    """(the request body's fields, the offline SamplingParams' fields) and, for penalties, the
    repeat bias that makes them matter (see REPEAT_BIAS)."""
    repeat = {first: REPEAT_BIAS}
    return {
        "presence": ({"logit_bias": {str(first): REPEAT_BIAS}, "presence_penalty": 2.0},
                     dict(logit_bias=repeat, presence_penalty=2.0)),
        "frequency": ({"logit_bias": {str(first): REPEAT_BIAS}, "frequency_penalty": 1.5},
                      dict(logit_bias=repeat, frequency_penalty=1.5)),
        "logit_bias": ({"logit_bias": {"42": 30.0, "4242": 29.5, str(first): -100}},
                       dict(logit_bias={42: 30.0, 4242: 29.5, first: -100.0})),
        "repetition": ({"logit_bias": {str(first): REPEAT_BIAS}, "repetition_penalty": 1.8},
                       dict(logit_bias=repeat, repetition_penalty=1.8)),
        "allowed": ({"allowed_token_ids": [100, 200, 4242]}, dict(allowed_token_ids=[100, 200, 4242])),
        "bad_words": ({"bad_words": bad}, dict(bad_words=bad)),
    }[name]


@pytest.mark.parametrize("name", ["presence", "frequency", "logit_bias", "repetition", "allowed", "bad_words"])
def test_controls_over_http_match_the_offline_api(server, llm, prompt_ids, greedy, name) -> None:
    tokenizer = llm.get_tokenizer()
    fields, params = http_controls(name, greedy[0], [tokenizer.decode([greedy[0]]).strip()])
    expected = generate(llm, prompt_ids, **params)
    baseline = generate(llm, prompt_ids, logit_bias={greedy[0]: REPEAT_BIAS}) if name in (
        "presence", "frequency", "repetition") else greedy
    assert expected != baseline, f"{name} changes nothing here: the test lost its point"
    openai_fields = {k: v for k, v in fields.items() if k in ("presence_penalty", "frequency_penalty", "logit_bias")}
    vllm_fields = {k: v for k, v in fields.items() if k not in openai_fields}
    client = server.client()
    completion = client.completions.create(
        model="tiny", prompt=prompt_ids, max_tokens=TOKENS, temperature=0.0, logprobs=0, **openai_fields,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **vllm_fields},
    )
    tokens = completion.choices[0].logprobs.tokens
    assert [int(t.split(":", 1)[1]) for t in tokens] == expected
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, temperature=0.0, **openai_fields,
        extra_body={"ignore_eos": True, **vllm_fields},
    )
    offline_chat = llm.chat([{"role": "user", "content": PROMPT}],
                            SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, **params), use_tqdm=False)
    assert chat.choices[0].message.content == offline_chat[0].outputs[0].text


def test_prompt_logprobs_over_http(server, llm, prompt_ids) -> None:
    body = {"model": "tiny", "prompt": prompt_ids, "max_tokens": 2, "temperature": 0.0, "prompt_logprobs": 2}
    response = server.http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    returned = response.json()["choices"][0]["prompt_logprobs"]
    offline = llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(max_tokens=2, temperature=0.0,
                                                                             prompt_logprobs=2), use_tqdm=False)[0]
    assert returned[0] is None and len(returned) == len(prompt_ids)
    for entry, expected in zip(returned[1:], offline.prompt_logprobs[1:]):
        assert {int(tid): (lp["logprob"], lp["rank"], lp["decoded_token"]) for tid, lp in entry.items()} == {
            tid: (pytest.approx(lp.logprob, abs=1e-5), lp.rank, lp.decoded_token) for tid, lp in expected.items()}
    chat = server.http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "prompt_logprobs": 1,
                                                          "messages": [{"role": "user", "content": PROMPT}]})
    assert chat.status_code == 200 and chat.json()["prompt_logprobs"][0] is None


@pytest.mark.parametrize(("body", "fragments"), [
    ({"logit_bias": {"abc": 1}}, ["logit_bias", "abc"]),
    ({"logit_bias": {"5": 101}}, ["logit_bias"]),
    ({"presence_penalty": 2.5}, ["presence_penalty"]),
    ({"repetition_penalty": 0}, ["repetition_penalty"]),
    ({"allowed_token_ids": [VOCAB_SIZE]}, ["allowed_token_ids", "vocabulary"]),
    ({"prompt_logprobs": 1, "stream": True}, ["prompt_logprobs", "stream"]),
    ({"best_of": 3}, ["best_of"]),
    ({"use_beam_search": True}, ["use_beam_search"]),
    ({"echo": True}, ["echo"]),
], ids=["bias key", "bias range", "presence range", "repetition range", "allowed vocab", "prompt_logprobs stream",
        "best_of", "beam search", "echo"])
def test_bad_controls_over_http_are_a_400_naming_the_field(server, body, fragments) -> None:
    response = server.http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, **body})
    assert_error(response, 400, *fragments)
