"""loraplex.engine.output_processor: stop checks, text, logprobs, and the three output kinds.

DELTA outputs carry only what is new, so joined up they must equal the CUMULATIVE output's
final state (text, token ids, logprobs, finish and stop reasons) for every sample; FINAL_ONLY
sends that state once. The processor is first fed known tokens (real tokenizer, exact texts:
multi-byte characters, stop strings across tokens), then driven by the engine on a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from loraplex import RequestOutput, RequestOutputKind, SamplingParams
from loraplex.engine.llm_engine import _Request
from loraplex.engine.output_processor import OutputProcessor
from loraplex.engine.sampler import SamplerOutput
from loraplex.engine.sequence import Sequence
from tiny_models import EOS_ID, tiny  # noqa: F401

CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY

ANSWER = "The answer is 42. Done here, and more words follow after it."  # '4' '2' '.' ' Done' are tokens
EMOJI = "Thumbs up 👍🏽 then 你好世界 ok"  # both characters spread over several tokens


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_path))


# ---- the processor fed known tokens ------------------------------------------------------------


def feed(tokenizer, texts: list[str], kind: RequestOutputKind, **params) -> list[RequestOutput]:
    """One request whose sample i generates the tokens of texts[i], one per step, as the engine
    would feed them (with made-up logprobs when asked); every output the processor builds.
    max_tokens defaults to the longest text's token count."""
    feeds = [tokenizer.encode(text) for text in texts]
    processor = OutputProcessor(tokenizer, [EOS_ID], max_model_len=256)
    sampling = SamplingParams(output_kind=kind, **{"max_tokens": max(map(len, feeds)), **params})
    prompt = tokenizer.encode("Say something")
    seqs = [Sequence(i, "r", i, list(prompt), sampling, 0.0) for i in range(sampling.n)]
    request = _Request("r", "Say something", prompt, sampling, seqs, 0.0)
    processor.add_request(request)
    outputs = []
    for step in range(100):
        if request.finished:
            return outputs
        for seq in request.seqs:
            if not seq.is_finished:
                token = feeds[seq.index][len(seq.output_token_ids)]
                lp = -0.25 * (step + 1) - seq.index
                sampled = SamplerOutput([token], [lp], [2], [[7, 9]], [[lp + 1.0, lp + 0.5]])
                processor.append_token(request, seq, sampled, 0, float(step))
        out = processor.make_output(request)
        if out is not None:
            outputs.append(out)
    raise AssertionError("the request never finished")


@dataclass
class Joined:
    text: str
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None
    stop_reason: object
    cumulative_logprob: float | None


def join_deltas(outputs: list[RequestOutput], n: int) -> list[Joined]:
    joined = [Joined("", [], None, None, None, None) for _ in range(n)]
    for out in outputs:
        assert len({c.index for c in out.outputs}) == len(out.outputs)  # each sample at most once
        for c in out.outputs:
            j = joined[c.index]
            assert j.finish_reason is None, "a finished sample was sent again"
            j.text += c.text
            j.token_ids += c.token_ids
            if c.logprobs is not None:
                j.logprobs = (j.logprobs or []) + c.logprobs
            j.finish_reason, j.stop_reason, j.cumulative_logprob = c.finish_reason, c.stop_reason, c.cumulative_logprob
    return joined


def as_joined(out: RequestOutput) -> list[Joined]:
    return [Joined(c.text, list(c.token_ids), c.logprobs, c.finish_reason, c.stop_reason, c.cumulative_logprob)
            for c in sorted(out.outputs, key=lambda c: c.index)]


CASES = {
    "multi-byte": ([EMOJI], {}, [(EMOJI, "length", None)]),
    "stop-across-tokens": ([ANSWER], dict(stop="2. Do"), [("The answer is 4", "stop", "2. Do")]),
    "stop-included": ([ANSWER], dict(stop="2. Do", include_stop_str_in_output=True),
                      [("The answer is 42. Do", "stop", "2. Do")]),
    "stop-inside-emoji": ([EMOJI], dict(stop=["🏽 th", "nowhere"]), [("Thumbs up 👍", "stop", "🏽 th")]),
    "long-stop-never-met": ([ANSWER], dict(stop="this string is never generated"),
                            [(ANSWER, "length", None)]),
    "stop-token": ([ANSWER], dict(stop_token_ids=[1535], include_stop_str_in_output=True),  # 1535 = ' here'
                   [("The answer is 42. Done here", "stop", 1535)]),
    "n=2-logprobs": ([ANSWER, EMOJI], dict(n=2, stop=["2. Do", "xyz"], logprobs=2),
                     [("The answer is 4", "stop", "2. Do"), (EMOJI, "length", None)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_delta_pieces_add_up_to_the_cumulative_output_and_final_only_sends_it_once(tokenizer, case: str) -> None:
    texts, params, expected = CASES[case]
    cumulative = feed(tokenizer, texts, CUMULATIVE, **params)
    final = as_joined(cumulative[-1])
    assert [(j.text, j.finish_reason, j.stop_reason) for j in final] == expected
    assert all(j.token_ids == tokenizer.encode(t)[: len(j.token_ids)] for j, t in zip(final, texts))
    # CUMULATIVE: the text only grows (held-back text is never shown and then taken back)
    for i in range(len(texts)):
        shown = [c.text for out in cumulative for c in out.outputs if c.index == i]
        assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:])), shown

    deltas = feed(tokenizer, texts, DELTA, **params)
    assert join_deltas(deltas, len(texts)) == final
    assert not any("\ufffd" in c.text for out in deltas for c in out.outputs)  # never half a character
    assert deltas[-1].finished and not any(out.finished for out in deltas[:-1])

    final_only = feed(tokenizer, texts, FINAL_ONLY, **params)
    assert len(final_only) == 1 and final_only[0].finished
    assert as_joined(final_only[0]) == final


def test_delta_outputs_carry_only_the_samples_with_something_new(tokenizer) -> None:
    """Sample 0 stops early; later outputs carry sample 1 alone; each sample's finish goes out once."""
    deltas = feed(tokenizer, [ANSWER, EMOJI], DELTA, n=2, stop="2. Do")
    indexes = [[c.index for c in out.outputs] for out in deltas]
    stop_at = next(k for k, out in enumerate(deltas) for c in out.outputs if c.finish_reason == "stop")
    assert all(ids == [0, 1] for ids in indexes[: stop_at + 1])
    assert all(ids == [1] for ids in indexes[stop_at + 1 :]) and len(indexes) > stop_at + 1
    finishes = [(c.index, c.finish_reason) for out in deltas for c in out.outputs if c.finish_reason]
    assert finishes == [(0, "stop"), (1, "length")]


def test_delta_outputs_hold_back_a_possible_stop_string_and_send_it_when_safe(tokenizer) -> None:
    deltas = feed(tokenizer, [ANSWER], DELTA, stop="42!")  # "42." comes close, never matches
    texts = [out.outputs[0].text for out in deltas]
    assert "".join(texts) == ANSWER
    upto_2 = tokenizer.encode(ANSWER).index(34) + 1  # the output that generated the '2'
    assert "".join(texts[:upto_2]) == "The answer is "  # "42" might still become "42!"
    assert "".join(texts[: upto_2 + 1]) == "The answer is 4"  # "42." cannot: the "4" is safe


# ---- driven by the engine ------------------------------------------------------------------------


def collect(engine, requests: dict[str, tuple[str, SamplingParams]]) -> dict[str, list[RequestOutput]]:
    """Run the requests together to the end; every output of each, in order."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def params(kind: RequestOutputKind, **options) -> SamplingParams:
    return SamplingParams(output_kind=kind, **options)


def test_engine_delta_outputs_add_up_to_the_cumulative_ones_for_several_samples(tiny) -> None:
    """n=3 seeded samples with logprobs and a stop string: the same run as DELTA and CUMULATIVE."""
    options = dict(n=3, temperature=1.0, seed=11, max_tokens=24, logprobs=2, stop=["ing", "the"])
    engine = tiny.engine()
    cumulative = collect(engine, {"c": ("Tell me a story", params(CUMULATIVE, **options))})["c"]
    deltas = collect(engine, {"d": ("Tell me a story", params(DELTA, **options))})["d"]
    final = as_joined(cumulative[-1])
    assert join_deltas(deltas, 3) == final
    assert {j.finish_reason for j in final} == {"stop", "length"}  # the samples end differently
    assert len({len(j.token_ids) for j in final}) > 1
    assert all(len(j.logprobs) == len(j.token_ids) for j in final)


def test_engine_final_only_sends_one_output_per_request(tiny) -> None:
    engine = tiny.engine()
    prompts = {"a": "First prompt", "b": "A second, longer prompt than the first", "c": "Third"}
    lengths = {"a": 5, "b": 9, "c": 3}
    common = dict(temperature=0.0, ignore_eos=True)
    final_only = collect(engine, {rid: (p, params(FINAL_ONLY, max_tokens=lengths[rid], **common))
                                  for rid, p in prompts.items()})
    cumulative = collect(engine, {rid: (p, params(CUMULATIVE, max_tokens=lengths[rid], **common))
                                  for rid, p in prompts.items()})
    for rid in prompts:
        assert len(final_only[rid]) == 1 and final_only[rid][0].finished
        assert len(cumulative[rid]) == lengths[rid]
        assert as_joined(final_only[rid][0]) == as_joined(cumulative[rid][-1])


def test_engine_output_size_grows_with_the_new_tokens_only(tiny) -> None:
    """Over a whole run, DELTA outputs carry each token, logprob and character exactly once (and
    FINAL_ONLY once at the end): O(tokens), where CUMULATIVE outputs carry O(tokens^2)."""
    engine = tiny.engine()
    num_tokens, prompts = 40, ["One", "Two prompts", "Three prompts here", "Four"]
    common = dict(temperature=0.0, ignore_eos=True, max_tokens=num_tokens, logprobs=1)

    def sent(kind: RequestOutputKind) -> tuple[int, int, int]:
        """Token ids, logprobs and characters carried by all outputs, counted as they come out."""
        for i, prompt in enumerate(prompts):
            engine.add_request(f"{kind.name}{i}", prompt, params(kind, **common))
        tokens = logprobs = chars = 0
        while engine.has_unfinished_requests():
            for c in (c for out in engine.step() for c in out.outputs):
                tokens, logprobs, chars = tokens + len(c.token_ids), logprobs + len(c.logprobs), chars + len(c.text)
        return tokens, logprobs, chars

    total = len(prompts) * num_tokens
    tokens, logprobs, _ = sent(CUMULATIVE)
    assert tokens == logprobs == len(prompts) * num_tokens * (num_tokens + 1) // 2  # the square
    final_only = sent(FINAL_ONLY)
    assert final_only[:2] == (total, total) and final_only[2] > 0
    assert sent(DELTA) == final_only


def test_generate_returns_whole_outputs_whatever_the_output_kind(tiny) -> None:
    """LLM.generate keeps only final outputs: a DELTA request still gets its whole text."""
    llm = tiny.llm("llama")
    prompts = ["Whole outputs", "from generate"]
    common = dict(temperature=0.0, ignore_eos=True, max_tokens=7)
    cumulative = llm.generate(prompts, SamplingParams(**common), use_tqdm=False)
    for kind in (DELTA, FINAL_ONLY):
        other = llm.generate(prompts, SamplingParams(output_kind=kind, **common), use_tqdm=False)
        assert [as_joined(o) for o in other] == [as_joined(o) for o in cumulative]
    assert all(len(o.outputs[0].token_ids) == 7 for o in cumulative)


def test_output_kind_must_be_a_request_output_kind() -> None:
    from loraplex.errors import InvalidSamplingParamsError

    with pytest.raises(InvalidSamplingParamsError, match=r"output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind="delta")
    assert SamplingParams().output_kind is CUMULATIVE  # vLLM's default
