"""SamplingParams: how to pick each next token and when to stop (vLLM's names and defaults)."""

from __future__ import annotations

import enum
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidSamplingParamsError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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
# OpenAI's bounds on logit_bias values and on presence / frequency penalties (vLLM's too).
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0

# A per-request logits processor (vLLM's offline form): fn(output_token_ids, logits) -> logits or
# fn(prompt_token_ids, output_token_ids, logits) -> logits, on one row's logits [V].
LogitsProcessor = Callable[..., Any]


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
    log-probabilities (plus the sampled one's), k <= MAX_LOGPROBS = 20; `prompt_logprobs=k` does
    the same for every prompt token (the first has none).

    Logit controls (vLLM's): `presence_penalty` and `frequency_penalty` (in [-2, 2]) subtract
    from the logits of tokens already generated, once or per occurrence; `repetition_penalty`
    (> 0) divides positive and multiplies negative logits of tokens in the prompt or the output;
    `logit_bias` (OpenAI's: token id -> bias in [-100, 100]) adds to logits; `bad_words` are
    never generated (the last token of a bad word is banned when the tokens before it match);
    `allowed_token_ids` restricts sampling to those ids; `logits_processors` are callables
    `fn(output_ids, logits)` or `fn(prompt_ids, output_ids, logits)` run on the request's row.
    `detokenize=False` returns token ids without text (stop strings then need text: refused).

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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    logits_processors: list[LogitsProcessor] | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)
    # bad_words as token id sequences, set by update_from_tokenizer when the engine accepts the request
    bad_words_token_ids: list[list[int]] = field(init=False, repr=False, default_factory=list)

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
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _integer("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS,
                                            f"None or an integer in [0, {MAX_LOGPROBS}]")
        self.stop_strings = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids) or []
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
                     "detokenize"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind", self.output_kind,
               "a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)")
        _check(self.detokenize or not self.stop_strings, "stop", self.stop,
               "None when detokenize=False (stop strings are found in the text); use stop_token_ids or set detokenize=True")
        penalty_range = f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 = off)"
        self.presence_penalty = _real("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY, penalty_range)
        self.frequency_penalty = _real("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY, penalty_range)
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty, 0.0, None,
                                        "a finite number > 0 (1 = off)")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 = off)")
        self.logit_bias = _logit_bias(self.logit_bias)
        self.bad_words = _bad_words(self.bad_words)
        self.allowed_token_ids = _token_ids("allowed_token_ids", self.allowed_token_ids)
        _check(self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids",
               self.allowed_token_ids, "None or a non-empty list of integer token ids >= 0")
        self.logits_processors = _logits_processors(self.logits_processors)

    def update_from_tokenizer(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        """Tokenize `bad_words` and check every token id field against the model's vocabulary.

        As vLLM: each bad word is encoded as is and with a leading space (a word at the start of
        the text and one in its middle tokenize differently); the spaced form is kept when it is
        a different word token of the same length.
        """
        self.bad_words_token_ids = []
        for word in self.bad_words or ():
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            _check(bool(plain), "bad_words", self.bad_words, f"words that tokenize to at least one token ({word!r} does not)")
            self.bad_words_token_ids.append(plain)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                self.bad_words_token_ids.append(spaced)
        fields = {
            "bad_words": [t for ids in self.bad_words_token_ids for t in ids],
            "allowed_token_ids": self.allowed_token_ids or [],
            "logit_bias": list(self.logit_bias or {}),
        }
        for name, ids in fields.items():
            outside = sorted({t for t in ids if t >= vocab_size})
            _check(not outside, name, getattr(self, name),
                   f"made of token ids inside the model's vocabulary [0, {vocab_size}) (outside: {outside[:5]})")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW

    def clone(self) -> "SamplingParams":
        return SamplingParams(**{name: getattr(self, name) for name, f in self.__dataclass_fields__.items() if f.init})


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


def _is_token_id(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _token_ids(name: str, ids: object) -> list[int] | None:
    allowed = "None or a list of integer token ids >= 0"
    if ids is None:
        return None
    _check(isinstance(ids, (list, tuple)), name, ids, allowed)
    _check(all(_is_token_id(t) for t in ids), name, ids, allowed)
    return [int(t) for t in ids]


def _logit_bias(bias: object) -> dict[int, float] | None:
    allowed = f"None or a dict of integer token id >= 0 -> finite bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
    if bias is None:
        return None
    _check(isinstance(bias, dict), "logit_bias", bias, allowed)
    _check(all(_is_token_id(t) for t in bias), "logit_bias", bias, allowed)
    return {int(t): _real("logit_bias", b, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, allowed) for t, b in bias.items()}


def _bad_words(words: object) -> list[str] | None:
    allowed = "None or a list of non-blank strings"
    if words is None:
        return None
    _check(isinstance(words, (list, tuple)), "bad_words", words, allowed)
    _check(all(isinstance(w, str) and w.strip() for w in words), "bad_words", words, allowed)
    return list(words)


def _logits_processors(processors: object) -> list[LogitsProcessor] | None:
    allowed = "None or a list of callables fn(output_ids, logits) or fn(prompt_ids, output_ids, logits)"
    if processors is None:
        return None
    _check(isinstance(processors, (list, tuple)), "logits_processors", processors, allowed)
    for fn in processors:
        _check(callable(fn) and logits_processor_arity(fn) in (2, 3), "logits_processors", fn, allowed)
    return list(processors)


def logits_processor_arity(fn: LogitsProcessor) -> int | None:
    """How many arguments `fn` takes (vLLM counts its parameters); None when it cannot be told."""
    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
