"""loraplex.engine.sampler: the sampling distribution, its filters, seeds and logprobs.

The Sampler is called directly on fixed logits with many identical rows, so token frequencies
can be compared with the exact distribution; the sampler's generator is seeded, so these
checks are deterministic, and their tolerances (>5 standard deviations) would hold for any seed.
The rest runs requests through engines on a tiny model (and on the embedded one for EOS).
"""

from __future__ import annotations

import math

import pytest
import torch

from loraplex import SamplingParams
from loraplex.engine.sampler import Sampler, SamplingRow
from tiny_models import EOS_ID, embedded, hf_logprobs, run_engine, tiny  # noqa: F401

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])  # [V] probabilities ~ .53 .20 .12 .07 .03 .003
NUM_ROWS = 20_000
FREQ_ATOL = 0.02  # one frequency's standard deviation is at most sqrt(.25 / 20000) = 0.0035


def frequencies(params: SamplingParams, logits: torch.Tensor = LOGITS, seed: int = 0) -> torch.Tensor:
    sampler = Sampler(seed, torch.device("cpu"))
    rows = [SamplingRow(params, [], None)] * NUM_ROWS
    out = sampler(logits.repeat(NUM_ROWS, 1), rows)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.numel()).float() / NUM_ROWS


def renormalized(probs: torch.Tensor, keep: list[int]) -> torch.Tensor:
    kept = torch.zeros_like(probs)
    kept[keep] = probs[keep]
    return kept / kept.sum()


# ---- the distribution --------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_samples_follow_softmax_of_logits_over_temperature(temperature: float) -> None:
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    torch.testing.assert_close(frequencies(SamplingParams(temperature=temperature)), expected, atol=FREQ_ATOL, rtol=0)


def test_top_k_keeps_only_the_k_most_likely_tokens() -> None:
    freq = frequencies(SamplingParams(top_k=3))
    assert freq[3:].sum() == 0
    torch.testing.assert_close(freq, renormalized(torch.softmax(LOGITS, -1), [0, 1, 2]), atol=FREQ_ATOL, rtol=0)


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    probs = torch.softmax(LOGITS, -1)
    assert probs[0] + probs[1] < 0.8 < probs[:3].sum()  # the nucleus of 0.8 is tokens 0, 1, 2
    freq = frequencies(SamplingParams(top_p=0.8))
    assert freq[3:].sum() == 0
    torch.testing.assert_close(freq, renormalized(probs, [0, 1, 2]), atol=FREQ_ATOL, rtol=0)


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    probs = torch.softmax(LOGITS, -1)
    keep = [i for i in range(6) if probs[i] >= 0.2 * probs[0]]
    assert keep == [0, 1, 2]
    freq = frequencies(SamplingParams(min_p=0.2))
    assert freq[3:].sum() == 0
    torch.testing.assert_close(freq, renormalized(probs, keep), atol=FREQ_ATOL, rtol=0)


def test_filters_combine_and_apply_after_temperature() -> None:
    scaled = torch.softmax(LOGITS / 2.0, -1)  # flatter: top_p=0.5 now needs two tokens
    assert scaled[0] < 0.5 < scaled[:2].sum()
    freq = frequencies(SamplingParams(temperature=2.0, top_p=0.5, top_k=4))
    assert freq[2:].sum() == 0
    torch.testing.assert_close(freq, renormalized(scaled, [0, 1]), atol=FREQ_ATOL, rtol=0)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
     SamplingParams(min_p=1.0), SamplingParams(temperature=3.0, top_k=1)],
    ids=["temperature=0", "top_k=1", "top_p=1e-6", "min_p=1", "hot-top_k=1"],
)
def test_degenerate_filters_are_greedy(params: SamplingParams) -> None:
    logits = torch.randn(500, 1000, generator=torch.Generator().manual_seed(3))  # [B, V]
    out = Sampler(0, torch.device("cpu"))(logits.clone(), [SamplingRow(params, [], None)] * 500)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_rows_of_one_batch_follow_their_own_params() -> None:
    greedy, hot, k1 = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(top_k=1)
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [4.0, 0.0, 0.0]]).repeat(2000, 1)
    rows = [SamplingRow(greedy, [], None), SamplingRow(hot, [], None), SamplingRow(k1, [], None)] * 2000
    tokens = torch.tensor(Sampler(0, torch.device("cpu"))(logits, rows).token_ids).view(2000, 3)
    assert (tokens[:, 0] == 1).all() and (tokens[:, 2] == 0).all()
    uniform = torch.bincount(tokens[:, 1], minlength=3).float() / 2000
    torch.testing.assert_close(uniform, torch.full((3,), 1 / 3), atol=0.06, rtol=0)


def test_banned_tokens_are_never_picked() -> None:
    logits = torch.tensor([[9.0, 1.0, 0.0, 0.0]]).repeat(1000, 1)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)):
        out = Sampler(0, torch.device("cpu"))(logits.clone(), [SamplingRow(params, [0, 2], None)] * 1000)
        assert set(out.token_ids) <= {1, 3}
        assert 1 in out.token_ids


# ---- seeds ------------------------------------------------------------------------------------


def test_a_seeded_row_draws_the_same_token_whatever_its_batch() -> None:
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(1, 50_000)  # uniform: a token id that repeats is no accident

    def draw(batch_size: int, position: int, sampler_seed: int) -> int:
        rows = [SamplingRow(params, [], None) for _ in range(batch_size)]
        rows[position] = SamplingRow(params, [], torch.Generator().manual_seed(1234))
        return Sampler(sampler_seed, torch.device("cpu"))(logits.repeat(batch_size, 1), rows).token_ids[position]

    alone = draw(1, 0, 0)
    assert draw(5, 3, 0) == alone and draw(8, 0, 99) == alone
    unseeded = [Sampler(s, torch.device("cpu"))(logits.clone(), [SamplingRow(params, [], None)]).token_ids[0] for s in range(3)]
    assert len(set(unseeded)) == 3


def _sampled_text_requests():
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    return seeded, {
        "other-seeded": ("Completely different words here", SamplingParams(temperature=0.8, seed=99, max_tokens=20)),
        "unseeded": ("Yet another prompt", SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)),
        "greedy": ("Greedy one", SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)),
    }


def test_seeded_requests_are_reproducible_regardless_of_batch_composition(tiny) -> None:
    seeded, others = _sampled_text_requests()
    prompt = "Once upon a time"
    alone = run_engine(tiny.engine(), {"s": (prompt, seeded)})["s"].outputs[0].token_ids
    mixed = run_engine(tiny.engine(seed=5), {**others, "s": (prompt, seeded)})["s"].outputs[0].token_ids
    engine = tiny.engine()
    engine.add_request("first", "Warm the shared generator up", SamplingParams(max_tokens=4))
    engine.step()
    engine.add_request("s", prompt, seeded)  # joins a running batch, after other draws
    late = run_engine(engine, others)["s"].outputs[0].token_ids
    assert alone == mixed == late
    assert len(alone) == 12
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    assert run_engine(tiny.engine(), {"u": (prompt, unseeded)})["u"].outputs[0].token_ids != alone


@pytest.mark.parametrize(
    "params",
    [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)],
    ids=["top_k=1", "top_p=1e-6", "min_p=1"],
)
def test_degenerate_filters_through_the_engine_equal_greedy(tiny, params) -> None:
    llm = tiny.llm("llama")
    common = dict(max_tokens=10, ignore_eos=True)
    greedy = llm.generate(["Sampling test prompt"], SamplingParams(temperature=0.0, **common), use_tqdm=False)
    filtered = llm.generate(["Sampling test prompt"], SamplingParams(temperature=1.3, **params, **common), use_tqdm=False)
    assert filtered[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_n_returns_n_samples_with_distinct_indices(tiny) -> None:
    out = tiny.llm("llama").generate(
        ["A prompt with three answers"], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert sorted(c.index for c in out.outputs) == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent samples, not copies


# ---- logprobs ----------------------------------------------------------------------------------


def test_sampler_logprobs_and_ranks() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0], [0.0, 0.0, 5.0, 1.0, 2.0]])
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=2), [], None),
            SamplingRow(SamplingParams(temperature=0.0, logprobs=None), [0], None)]
    out = Sampler(0, torch.device("cpu"))(logits.clone(), rows)
    expected = torch.log_softmax(logits, -1)
    assert out.token_ids == [1, 2]
    assert out.top_ids[0] == [1, 2] and out.top_ids[1] == []
    assert out.top_logprobs[0] == pytest.approx(expected[0, [1, 2]].tolist(), abs=1e-6)
    assert out.sampled_logprobs[0] == pytest.approx(expected[0, 1].item(), abs=1e-6)
    assert out.sampled_ranks == [1, 1]


def test_sampled_token_outside_the_top_k_gets_its_true_rank() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(400, 1)  # token i has rank i + 1
    rows = [SamplingRow(SamplingParams(temperature=1.0, logprobs=1), [], None)] * 400
    out = Sampler(0, torch.device("cpu"))(logits.clone(), rows)
    assert out.sampled_ranks == [token + 1 for token in out.token_ids]
    assert max(out.token_ids) >= 2  # some draws did fall outside the top 1
    expected = torch.log_softmax(logits[0], -1)
    assert out.sampled_logprobs == pytest.approx([expected[t].item() for t in out.token_ids], abs=1e-6)
    assert all(ids == [0] for ids in out.top_ids)


def test_engine_logprobs_are_the_models_with_true_ranks(tiny) -> None:
    """Sampled (hot) tokens often fall outside the top 3; they then come as a 4th entry with
    their true rank. The values are the model's log-softmax, before temperature (vLLM's default)."""
    llm = tiny.llm("llama")
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=2.0, seed=11, max_tokens=16, ignore_eos=True, logprobs=3)
    out = llm.generate(["Logprobs, please"], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    reference = hf_logprobs(tiny.hf("llama"), out.prompt_token_ids + completion.token_ids)  # [L, V]
    start = len(out.prompt_token_ids) - 1
    outside = 0
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = reference[start + step]
        top3 = row.topk(3).indices.tolist()
        assert [tid for tid, lp in entry.items() if lp.rank <= 3] == top3
        true_rank = int((row > row[token]).sum()) + 1
        assert entry[token].rank == true_rank
        if true_rank > 3:
            outside += 1
            assert len(entry) == 4
        else:
            assert len(entry) == 3
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(row[tid].item(), abs=1e-4)
            assert lp.decoded_token == tokenizer.decode([tid])
    assert outside > 0, "no sampled token fell outside the top 3: the test lost its point"
    expected_cumulative = sum(completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids))
    assert completion.cumulative_logprob == pytest.approx(expected_cumulative, abs=1e-5)
    assert math.isfinite(completion.cumulative_logprob)


def test_logprobs_zero_returns_only_the_sampled_token(tiny) -> None:
    out = tiny.llm("llama").generate(
        ["Zero logprobs"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=0), use_tqdm=False
    )[0].outputs[0]
    assert [list(entry) for entry in out.logprobs] == [[t] for t in out.token_ids]
    assert all(entry[t].rank == 1 for entry, t in zip(out.logprobs, out.token_ids))


def test_no_logprobs_unless_asked(tiny) -> None:
    out = tiny.llm("llama").generate(["No logprobs"], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert out.logprobs is None and out.cumulative_logprob is None


# ---- min_tokens ------------------------------------------------------------------------------


def test_min_tokens_forbids_stop_token_ids(tiny) -> None:
    llm = tiny.llm("llama")
    prompt = "Stop tokens are banned for a while"
    greedy = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    first, second = greedy[0].outputs[0].token_ids[:2]
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=5, stop_token_ids=[first, second])
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 5
    assert not {first, second} & set(out.token_ids[:5])
    assert out.token_ids[0] != first  # the greedy choice was banned, so the runner-up came


def test_min_tokens_forbids_eos(embedded) -> None:
    """The embedded instruct model answers this in a few tokens and ends with EOS."""
    messages = [{"role": "user", "content": "What is 2+2? Answer with just the number."}]
    llm = embedded.llm
    short = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] == EOS_ID
    k = len(short.token_ids)
    longer = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=k + 6, min_tokens=k + 4), use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= k + 4
    assert EOS_ID not in longer.token_ids[: k + 4]
    assert longer.token_ids[: k - 1] == short.token_ids[:-1]  # identical until EOS was refused
