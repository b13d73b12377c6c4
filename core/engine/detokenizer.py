"""Incremental detokenisation and stop strings.

Decoding token by token is not decoding the whole: a multi-byte character can span tokens, and
many tokenizers put a space in front of a word depending on the token before it. So each step
decodes a short window twice — the last few tokens already shown (prefix) and the same window
plus the new tokens — and emits the difference, holding back while the text ends in an
incomplete character (U+FFFD).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .sequence import Sequence

_CONTEXT_TOKENS = 5  # tokens before the new ones that give the decoder its context


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def start(self, seq: Sequence) -> None:
        n = len(seq.prompt_token_ids)
        seq.prefix_offset = max(n - _CONTEXT_TOKENS, 0)
        seq.read_offset = n

    def append(self, seq: Sequence, flush: bool = False) -> str:
        """Decode the newly appended tokens into `seq.output_text`; return the new text."""
        window = _tokens_from(seq, seq.prefix_offset)  # only the window: never copy every token
        skip = seq.params.skip_special_tokens
        prefix = self.tokenizer.decode(window[: seq.read_offset - seq.prefix_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(window, skip_special_tokens=skip)
        if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
            delta = full[len(prefix) :]
            seq.prefix_offset = seq.read_offset
            seq.read_offset = seq.num_tokens
            seq.output_text += delta
            return delta
        return ""

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def find_stop_string(seq: Sequence, new_chars: int) -> tuple[str, int] | None:
    """The first stop string that the last `new_chars` characters completed, and where it starts."""
    text = seq.output_text
    best: tuple[str, int] | None = None
    for stop in seq.params.stop_strings:
        index = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if index != -1 and (best is None or index < best[1]):
            best = (stop, index)
    return best


def _tokens_from(seq: Sequence, start: int) -> list[int]:
    """The sequence's token ids from position `start` on (prompt, then output)."""
    n = len(seq.prompt_token_ids)
    if start >= n:
        return seq.output_token_ids[start - n :]
    return seq.prompt_token_ids[start:] + seq.output_token_ids


def visible_length(seq: Sequence) -> int:
    """How much of `seq.output_text` is safe to show: a running sequence holds back a tail that
    may yet become a stop string (what is shown is never taken back)."""
    if seq.is_finished or not seq.params.stop_strings:
        return len(seq.output_text)
    hold = max(len(s) for s in seq.params.stop_strings) - 1
    return max(len(seq.output_text) - hold, 0)


def visible_text(seq: Sequence) -> str:
    """Text safe to show while running (see visible_length)."""
    return seq.output_text[: visible_length(seq)]  # the string itself when nothing is held back
