"""Log-probabilities in OpenAI's two response shapes.

The engine gives, per generated token, a dict token id -> Logprob holding the `k` most likely
tokens (rank 1 = most likely) plus the sampled one. Completions answer
`{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`; chat answers
`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`. Prompt logprobs take
vLLM's shape (see prompt_logprobs_json). With vLLM's
`return_tokens_as_token_ids`, tokens are written `token_id:<id>`, which is exact where a token's
text is not (partial UTF-8, tokens that decode alike).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from ...outputs import Logprob, PromptLogprobs

# JSON has no -Infinity: a token the filters ruled out gets vLLM's stand-in
_MIN_LOGPROB = -9999.0


class TokenNamer:
    """The text under which a token is shown."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, as_ids: bool) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids

    def __call__(self, token_id: int, logprob: Logprob | None) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]], num: int,
                        name: TokenNamer, text_offset: int = 0) -> dict[str, Any]:
    """The completions shape for these tokens; offsets count from `text_offset` (for streams)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        sampled = entry.get(token_id)
        text = name(token_id, sampled)
        tokens.append(text)
        token_logprobs.append(_finite(sampled.logprob) if sampled is not None else None)
        top.append({name(tid, lp): _finite(lp.logprob) for tid, lp in _top(entry, num, keep=token_id)})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]], num: int,
                  name: TokenNamer) -> dict[str, Any]:
    """The chat shape for these tokens."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        sampled = entry.get(token_id)
        text = name(token_id, sampled)
        content.append({
            "token": text,
            "logprob": _finite(sampled.logprob) if sampled is not None else None,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := name(tid, lp)), "logprob": _finite(lp.logprob), "bytes": list(t.encode("utf-8"))}
                for tid, lp in _top(entry, num)
            ],
        })
    return {"content": content}


def prompt_logprobs_json(entries: PromptLogprobs | None) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: None for the first token, then {token id: {logprob, rank, decoded_token}};
    -inf (a token the model rules out) becomes vLLM's -9999.0, as JSON has no infinities."""
    if entries is None:
        return None
    return [None if entry is None else {
        str(token): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for token, lp in entry.items()
    } for entry in entries]


def _top(entry: dict[int, Logprob], num: int, keep: int | None = None) -> list[tuple[int, Logprob]]:
    """The `num` most likely tokens by rank (and `keep`, the sampled token, wherever it ranks)."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank if item[1].rank is not None else math.inf)
    return [(tid, lp) for i, (tid, lp) in enumerate(ranked) if i < num or tid == keep]


def _finite(value: float) -> float:
    return value if value > _MIN_LOGPROB else _MIN_LOGPROB
