"""SamplingParams: how to pick each next token and when to stop (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidSamplingParamsError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options, validated at construction.

    `temperature=0` is greedy. `top_k` of 0 or -1 and `top_p=1` / `min_p=0` disable those
    filters. `stop` strings end generation when they appear in the text (excluded from the output
    unless `include_stop_str_in_output`); `stop_token_ids` end it on those tokens; `ignore_eos`
    keeps going past the end-of-sequence token; `min_tokens` forbids both before that many tokens.
    `logprobs=k` returns the k most likely tokens' log-probabilities (plus the sampled one's).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "a float >= 0 (0 means greedy)")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "a float in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, "0 or -1 (disabled) or an integer >= 1")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "a float in [0, 1]")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1 or None")
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "an integer >= 0")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens", self.min_tokens, f"at most max_tokens ({self.max_tokens})",
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs", self.logprobs, f"None or an integer in [0, {MAX_LOGPROBS}]",
        )
        _check(all(isinstance(s, str) and s for s in self.stop_strings), "stop", self.stop, "non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids, "token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self) -> "SamplingParams":
        return SamplingParams(
            **{name: getattr(self, name) for name in self.__dataclass_fields__ if name != "stop_strings"}
        )


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise InvalidSamplingParamsError(f"SamplingParams.{name} must be {allowed}; got {value!r}")
