"""Vectorised sampling over the batch: logit controls (penalties, bias, bans; see logits_controls),
greedy, temperature, top-k, top-p, min-p, seeds, logprobs and prompt logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..sampling_params import SamplingParams
from .logits_controls import apply_logit_controls


@dataclass
class SamplerOutput:
    token_ids: list[int]
    sampled_logprobs: list[float] | None  # log-probability of each sampled token
    sampled_ranks: list[int] | None
    top_ids: list[list[int]] | None  # per row, the k most likely token ids (k = that row's logprobs)
    top_logprobs: list[list[float]] | None
    # per row, None or the log-probabilities of the prompt positions the step computed
    prompt_logprobs: list[PromptLogprobs | None] | None = None


@dataclass
class PromptLogits:
    """The model's logits at prompt positions `start`, `start + 1`, ...: row j predicts prompt
    token `start + j + 1`."""

    start: int
    logits: torch.Tensor  # [P, V]


@dataclass
class PromptLogprobs:
    """Per prompt position (from `start`): the next prompt token's id, logprob and rank, and the top k."""

    start: int
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    banned_token_ids: list[int]  # e.g. EOS before min_tokens
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int] = ()  # for repetition_penalty and logits_processors
    output_token_ids: Sequence[int] = ()  # for the penalties, bad_words and logits_processors
    prompt_logits: PromptLogits | None = field(default=None, repr=False)  # for prompt_logprobs


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        # logits [B, V] float32
        # logprobs describe the model's own distribution (as vLLM's do), before any token is banned
        want_logprobs = any(row.params.logprobs is not None for row in rows)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # [B, V]
        logits = apply_logit_controls(logits, rows)

        greedy_ids = logits.argmax(dim=-1)  # [B]
        if all(row.params.greedy for row in rows):
            token_ids = greedy_ids
        else:
            token_ids = torch.where(self._greedy_mask(rows, logits.device), greedy_ids, self._sample(logits, rows))

        out = SamplerOutput(token_ids.tolist(), None, None, None, None)
        if logprobs is not None:
            self._fill_logprobs(out, logprobs, token_ids, rows)
        if any(row.prompt_logits is not None for row in rows):
            out.prompt_logprobs = [_prompt_logprobs(row) if row.prompt_logits is not None else None for row in rows]
        return out

    @staticmethod
    def _greedy_mask(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
        return torch.tensor([row.params.greedy for row in rows], device=device)  # [B]

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([row.params.temperature or 1.0 for row in rows], device=device)  # [B]
        logits = logits / temperature[:, None]  # [B, V]
        top_k = [row.params.top_k for row in rows]
        top_p = [row.params.top_p for row in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        min_p = [row.params.min_p for row in rows]
        probs = torch.softmax(logits, dim=-1)  # [B, V]
        if any(p > 0.0 for p in min_p):
            threshold = torch.tensor(min_p, device=device)[:, None] * probs.amax(dim=-1, keepdim=True)  # [B, 1]
            probs = probs.masked_fill(probs < threshold, 0.0)
        # Sampling by "exponential race": argmax(p / E) with E ~ Exp(1) draws from p; drawing E from
        # a row's own generator makes a seeded request reproducible whatever batch it lands in.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)  # [B, V]
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return (probs / noise).argmax(dim=-1)  # [B]

    @staticmethod
    def _fill_logprobs(out: SamplerOutput, logprobs: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow]) -> None:
        sampled = logprobs.gather(1, token_ids[:, None])  # [B, 1]
        ranks = (logprobs > sampled).sum(dim=-1) + 1  # [B]
        k = max(row.params.logprobs or 0 for row in rows)
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], token_ids[:, None][:, :0])
        out.sampled_logprobs = sampled.squeeze(1).tolist()
        out.sampled_ranks = ranks.tolist()
        top_ids_list, top_values_list = top_ids.tolist(), top_values.tolist()
        out.top_ids = [ids[: row.params.logprobs or 0] for ids, row in zip(top_ids_list, rows)]
        out.top_logprobs = [vals[: row.params.logprobs or 0] for vals, row in zip(top_values_list, rows)]


def _prompt_logprobs(row: SamplingRow) -> PromptLogprobs:
    """The model's log-probabilities of the prompt's own tokens (and the top k) at the computed positions."""
    start, logits = row.prompt_logits.start, row.prompt_logits.logits  # [P, V]
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [P, V]
    targets = torch.tensor(row.prompt_token_ids[start + 1 : start + 1 + logits.shape[0]], device=logits.device)  # [P]
    actual = logprobs.gather(1, targets[:, None])  # [P, 1]
    ranks = (logprobs > actual).sum(dim=-1) + 1  # [P]
    top_values, top_ids = logprobs.topk(row.params.prompt_logprobs or 0, dim=-1)  # [P, k]
    return PromptLogprobs(start, targets.tolist(), actual.squeeze(1).tolist(), ranks.tolist(), top_ids.tolist(),
                          top_values.tolist())


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    # logits [B, V]; masks everything outside each row's top-k and top-p nucleus with -inf
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k], device=logits.device)  # [B]
    ranks = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    remove = ranks >= k[:, None]  # [B, V]
    p = torch.tensor(top_p, device=logits.device, dtype=logits.dtype)[:, None]  # [B, 1]
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] probability of strictly better tokens
    remove |= mass_before >= p  # keeps at least the most likely token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
