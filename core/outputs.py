"""What generation returns: RequestOutput holding one CompletionOutput per sample (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


# One dict per generated token: token id -> its Logprob (the top-k plus the sampled token).
SampleLogprobs = list[dict[int, Logprob]]
# One per prompt token: None for the first (nothing predicts it), then token id -> its Logprob
# (the top-k plus the prompt's own token), as vLLM's.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, later: CompletionOutput) -> None:
        """Append a later DELTA of the same sample: its text, tokens and logprobs; its state."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(later.logprobs)
        self.cumulative_logprob = later.cumulative_logprob
        self.finish_reason = later.finish_reason
        self.stop_reason = later.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: PromptLogprobs | None = None

    def add(self, next_output: RequestOutput, aggregate: bool) -> None:
        """Merge a later output of the same request into this one (vLLM's method).

        `aggregate=True` appends the later completions' text, token ids and logprobs to these
        (DELTA outputs); `False` replaces each completion by its later version (CUMULATIVE).
        Completions are matched by `index`; one not seen yet is appended.
        """
        self.finished |= next_output.finished
        self.metrics = next_output.metrics
        if next_output.prompt_logprobs is not None:  # a DELTA request sends them once
            self.prompt_logprobs = next_output.prompt_logprobs
        by_index = {completion.index: i for i, completion in enumerate(self.outputs)}
        for later in next_output.outputs:
            i = by_index.get(later.index)
            if i is None:
                by_index[later.index] = len(self.outputs)
                self.outputs.append(later)
            elif not aggregate:
                self.outputs[i] = later
            else:
                self.outputs[i].extend(later)
