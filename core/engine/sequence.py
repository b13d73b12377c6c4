"""A sequence being generated: its tokens, cache blocks, text, and stopping state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..multimodal.inputs import MultiModalInputs
from ..outputs import Logprob
from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request (a request with `n` samples has n sequences)."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float
    generator: torch.Generator | None = None
    lora_name: str | None = None  # the adapter this sequence runs with (None = base model)
    adapter_version: int = 0  # the adapter's weights version (bumped by an in-place reload)
    multi_modal: MultiModalInputs | None = None  # the prompt's images, if any
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # tokens whose K/V sit in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # detokenizer state
    output_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
