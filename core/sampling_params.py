"""SamplingParams: how to pick each next token and when to stop (vLLM's names and defaults)."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field

from .errors import InvalidSamplingParamsError

MAX_LOGPROBS = 20
# More samples than one step can run (the default max_num_seqs) would only queue; and each
# sample holds its own KV blocks and generator, so an unbounded n lets one request claim memory
# for everyone (n=10**9 would allocate before any other check). vLLM sets no bound; loraplex does.
MAX_N = 256
# What torch.Generator.manual_seed accepts: a signed or unsigned 64-bit integer.
SEED_MIN, SEED_END = -(2**63), 2**64
# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by a
# vanishing temperature would overflow them to inf and make the probabilities NaN.
_GREEDY_BELOW = 1e-5


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a running request carries (vLLM's names)."""

    CUMULATIVE = 0  # everything generated so far, every time
    DELTA = 1  # only what is new since the request's previous output
    FINAL_ONLY = 2  # nothing until the request finishes, then the whole


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options, validated at construction.

    `n` samples (1 to MAX_N = 256) are drawn per prompt. `temperature=0` (or below 1e-5) is
    greedy. `top_k` of 0 or -1 and `top_p=1` / `min_p=0` disable those filters. `seed` (any
    integer torch.Generator accepts: -2**63 <= seed and seed + n - 1 < 2**64; sample i uses
    seed + i) makes sampling reproducible. `stop` strings end generation when they appear in the
    text (excluded from the output unless `include_stop_str_in_output`); `stop_token_ids` end it
    on those tokens; `ignore_eos` keeps going past the end-of-sequence token; `min_tokens`
    forbids both before that many tokens. `logprobs=k` returns the k most likely tokens'
    log-probabilities (plus the sampled one's), k <= MAX_LOGPROBS = 20.

    Every field is checked for its type and range (integers are ints, not bools or floats; real
    numbers are finite; flags are bools); a bad one raises InvalidSamplingParamsError naming it.
    The checks run again when the engine accepts the request (`verify()`), so a field changed
    after construction cannot slip past them.
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
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.verify()

    def verify(self) -> None:
        """Check (and normalise: numpy scalars to Python numbers, top_k=-1 to 0) every field."""
        self.n = _integer("n", self.n, 1, MAX_N)
        self.temperature = _real("temperature", self.temperature, 0.0, None, "a finite number >= 0 (0 means greedy)")
        self.top_p = _real("top_p", self.top_p, 0.0, 1.0, "a number in (0, 1]")
        _check(self.top_p > 0.0, "top_p", self.top_p, "a number in (0, 1]")
        top_k = _integer("top_k", self.top_k, -1, None, "0 or -1 (disabled) or an integer >= 1")
        self.top_k = 0 if top_k == -1 else top_k
        self.min_p = _real("min_p", self.min_p, 0.0, 1.0, "a number in [0, 1]")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, SEED_MIN, SEED_END - 1,
                                 "None or an integer in [-2**63, 2**64) (what torch.Generator.manual_seed accepts)")
            _check(self.seed + self.n - 1 < SEED_END, "seed", self.seed,
                   f"small enough that seed + n - 1 < 2**64 (sample i uses seed + i; n={self.n})")
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens, 1, None, "None or an integer >= 1")
        self.min_tokens = _integer("min_tokens", self.min_tokens, 0, None)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               "min_tokens", self.min_tokens, f"at most max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs, 0, MAX_LOGPROBS, f"None or an integer in [0, {MAX_LOGPROBS}]")
        self.stop_strings = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind", self.output_kind,
               "a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW

    def clone(self) -> "SamplingParams":
        return SamplingParams(
            **{name: getattr(self, name) for name in self.__dataclass_fields__ if name != "stop_strings"}
        )


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise InvalidSamplingParamsError(f"SamplingParams.{name} must be {allowed}; got {value!r}")


def _integer(name: str, value: object, low: int, high: int | None, allowed: str | None = None) -> int:
    """`value` as an int in [low, high] (high None: no upper bound); bools and floats are refused."""
    if allowed is None:
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    _check(isinstance(value, numbers.Integral) and not isinstance(value, bool), name, value, allowed)
    value = int(value)
    _check(value >= low and (high is None or value <= high), name, value, allowed)
    return value


def _real(name: str, value: object, low: float, high: float | None, allowed: str) -> float:
    """`value` as a finite float in [low, high]; bools, strings, NaN and infinities are refused."""
    _check(isinstance(value, numbers.Real) and not isinstance(value, bool), name, value, allowed)
    value = float(value)
    _check(math.isfinite(value) and value >= low and (high is None or value <= high), name, value, allowed)
    return value


def _stop_strings(stop: object) -> tuple[str, ...]:
    allowed = "None, a non-empty string or a list of non-empty strings"
    if stop is None:
        return ()
    if isinstance(stop, str):
        _check(bool(stop), "stop", stop, allowed)
        return (stop,)
    _check(isinstance(stop, (list, tuple)), "stop", stop, allowed)
    _check(all(isinstance(s, str) and s for s in stop), "stop", stop, allowed)
    return tuple(stop)


def _token_ids(ids: object) -> list[int]:
    allowed = "None or a list of integer token ids >= 0"
    if ids is None:
        return []
    _check(isinstance(ids, (list, tuple)), "stop_token_ids", ids, allowed)
    _check(all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in ids),
           "stop_token_ids", ids, allowed)
    return [int(t) for t in ids]
