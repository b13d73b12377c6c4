"""Per-request logit controls, applied to the batch's logits before sampling.

The order is vLLM's: the request's own `logits_processors` (on the model's logits), then
`allowed_token_ids`, banned tokens (min_tokens' stop tokens, `bad_words`), `logit_bias`, and
last the penalties (repetition, frequency, presence), which therefore see the biased logits.
Each control builds its tensors only when some row of the step uses it, so a batch of plain
requests pays nothing; all but `logits_processors` (arbitrary Python) are one tensor operation
over the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import InvalidSamplingParamsError
from ..sampling_params import logits_processor_arity

if TYPE_CHECKING:
    from .sampler import SamplingRow

_NEG_INF = float("-inf")


def apply_logit_controls(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """`logits` [B, V] with every row's controls applied (in place where possible)."""
    _apply_logits_processors(logits, rows)
    _apply_allowed_token_ids(logits, rows)
    _apply_bans(logits, rows)
    _apply_logit_bias(logits, rows)
    return _apply_penalties(logits, rows)


def bad_word_bans(bad_words_token_ids: list[list[int]], output_token_ids: Sequence[int]) -> list[int]:
    """The tokens that would complete a bad word now: each one's last token, when the tokens
    before it are the last ones generated (vLLM's rule; the prompt does not count)."""
    banned = []
    for ids in bad_words_token_ids:
        prefix = len(ids) - 1
        if prefix > len(output_token_ids):
            continue
        if prefix == 0 or list(output_token_ids[-prefix:]) == ids[:-1]:
            banned.append(ids[-1])
    return banned


def _apply_logits_processors(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    # arbitrary callables on one row each: no batching possible, so only rows that have them
    for i, row in enumerate(rows):
        for fn in row.params.logits_processors or ():
            prompt, output = tuple(row.prompt_token_ids), tuple(row.output_token_ids)
            result = fn(prompt, output, logits[i]) if logits_processor_arity(fn) == 3 else fn(output, logits[i])
            if not isinstance(result, torch.Tensor) or result.shape != logits[i].shape:
                shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                raise InvalidSamplingParamsError(
                    f"SamplingParams.logits_processors: {fn!r} returned {shape}, not logits of shape "
                    f"{tuple(logits[i].shape)}; return the (modified) logits tensor it was given"
                )
            logits[i] = result


def _apply_allowed_token_ids(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    restricted = [i for i, row in enumerate(rows) if row.params.allowed_token_ids]
    if not restricted:
        return
    mask = torch.ones(len(restricted), logits.shape[1], dtype=torch.bool)  # [R, V] True = not allowed
    r = [k for k, i in enumerate(restricted) for _ in rows[i].params.allowed_token_ids]
    c = [t for i in restricted for t in rows[i].params.allowed_token_ids]
    mask[r, c] = False
    index = torch.tensor(restricted, device=logits.device)  # [R]
    logits[index] = logits[index].masked_fill(mask.to(logits.device), _NEG_INF)


def _apply_bans(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    r: list[int] = []
    c: list[int] = []
    for i, row in enumerate(rows):
        banned = list(row.banned_token_ids)
        if row.params.bad_words_token_ids:
            banned += bad_word_bans(row.params.bad_words_token_ids, row.output_token_ids)
        r.extend([i] * len(banned))
        c.extend(banned)
    if r:
        logits[torch.tensor(r, device=logits.device), torch.tensor(c, device=logits.device)] = _NEG_INF


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    r, c, bias = [], [], []
    for i, row in enumerate(rows):
        for token, value in (row.params.logit_bias or {}).items():
            r.append(i)
            c.append(token)
            bias.append(value)
    if r:
        to = dict(device=logits.device)
        logits.index_put_((torch.tensor(r, **to), torch.tensor(c, **to)), torch.tensor(bias, dtype=logits.dtype, **to),
                          accumulate=True)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    repetition = [row.params.repetition_penalty for row in rows]
    frequency = [row.params.frequency_penalty for row in rows]
    presence = [row.params.presence_penalty for row in rows]
    uses_repetition = any(p != 1.0 for p in repetition)
    uses_output = any(f != 0.0 or p != 0.0 for f, p in zip(frequency, presence))
    if not (uses_repetition or uses_output):
        return logits
    vocab, device = logits.shape[1], logits.device
    penalised = [rep != 1.0 or f != 0.0 or p != 0.0 for rep, f, p in zip(repetition, frequency, presence)]
    counts = _token_counts([row.output_token_ids if use else () for row, use in zip(rows, penalised)], vocab, device)
    if uses_repetition:
        seen = counts > 0  # [B, V]
        prompts = [row.prompt_token_ids if rep != 1.0 else () for row, rep in zip(rows, repetition)]
        seen |= _token_counts(prompts, vocab, device) > 0
        penalty = torch.tensor(repetition, dtype=logits.dtype, device=device)[:, None].expand_as(logits)  # [B, V]
        penalty = torch.where(seen, penalty, torch.ones_like(penalty))
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if uses_output:
        to = dict(dtype=logits.dtype, device=device)
        logits = logits - torch.tensor(frequency, **to)[:, None] * counts.to(logits.dtype)
        logits = logits - torch.tensor(presence, **to)[:, None] * (counts > 0).to(logits.dtype)
    return logits


def _token_counts(token_ids: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each row's ids: [B, V] (int), by one scatter_add over the
    ids padded with an extra column `vocab` that is dropped after."""
    width = max((len(ids) for ids in token_ids), default=0)
    padded = torch.full((len(token_ids), width), vocab, dtype=torch.long)  # [B, L]
    for i, ids in enumerate(token_ids):
        if ids:
            padded[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    padded = padded.to(device)
    counts = torch.zeros(len(token_ids), vocab + 1, dtype=torch.long, device=device)  # [B, V + 1]
    counts.scatter_add_(1, padded, torch.ones_like(padded))
    return counts[:, :vocab]
