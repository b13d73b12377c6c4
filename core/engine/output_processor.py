"""The output processor: what each sampled token means for its request, and what to send out.

For every token the engine samples it decides whether the sequence stops (EOS, stop token ids,
stop strings, max_tokens, max_model_len), extends the text (incremental detokenisation) and
records logprobs (and the prompt's, for requests with `prompt_logprobs`). For every request a step advanced it builds the RequestOutput that the
request's `output_kind` asks for:

* CUMULATIVE: everything so far. The token ids and logprobs are the sequence's own lists, not
  copies (as vLLM's): they keep growing while the request runs, so copy them to keep a snapshot.
* DELTA: only what is new since the request's previous output, and only the samples that have
  something new (match them by `CompletionOutput.index`). Text held back because it may yet
  become a stop string is sent once it is safe, or dropped with the stop string.
* FINAL_ONLY: nothing until every sample has finished, then the whole.

So a step costs O(new tokens) for DELTA and FINAL_ONLY requests, never O(tokens so far).
`prompt_logprobs` go out with every CUMULATIVE and FINAL_ONLY output, and with a DELTA
request's first output only (as vLLM's). With `detokenize=False` no text is made: the outputs
carry token ids only, and logprobs have no `decoded_token`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from ..sampling_params import RequestOutputKind
from .detokenizer import IncrementalDetokenizer, find_stop_string, visible_length
from .sampler import PromptLogits, SamplerOutput, SamplingRow
from .sampler import PromptLogprobs as StepPromptLogprobs
from .sequence import Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .llm_engine import _Request


@dataclass
class Emitted:
    """How much of one sequence the request's outputs have carried so far (DELTA)."""

    tokens: int = 0  # token ids (and logprobs, one per token)
    chars: int = 0  # characters of text
    finished: bool = False  # its finish_reason went out
    prompt_logprobs: bool = False  # the request's prompt logprobs went out (kept on the first sample's)


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Iterable[int], max_model_len: int) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = max_model_len
        # totals, for metrics: prompts processed (once per request) and tokens generated
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    def add_request(self, request: _Request) -> None:
        for seq in request.seqs:
            self.detokenizer.start(seq)
        request.emitted = [Emitted() for _ in request.seqs]

    # ---- per token ------------------------------------------------------------------------------

    def banned_tokens(self, seq: Sequence) -> list[int]:
        """Tokens the sampler must not pick for `seq` now: those that would stop it before min_tokens."""
        if len(seq.output_token_ids) >= seq.params.min_tokens:
            return []
        banned = list(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            banned.extend(self.eos_token_ids)
        return banned

    def sampling_row(self, seq: Sequence, prompt_logits: PromptLogits | None = None) -> SamplingRow:
        """What the sampler needs to pick `seq`'s next token (and its prompt logprobs, if computed)."""
        return SamplingRow(seq.params, self.banned_tokens(seq), seq.generator, seq.prompt_token_ids,
                           seq.output_token_ids, prompt_logits)

    def append_token(self, request: _Request, seq: Sequence, sampled: SamplerOutput, row: int, now: float) -> None:
        """Add `seq`'s sampled token (row `row` of the batch): text, logprobs, stop checks, metrics."""
        if "first_token_time" not in request.metrics:
            request.metrics["first_token_time"] = now
            self.num_prompt_tokens += len(request.prompt_token_ids)
        request.metrics["last_token_time"] = now
        self.num_generation_tokens += 1
        if sampled.prompt_logprobs is not None and sampled.prompt_logprobs[row] is not None:
            self._record_prompt_logprobs(request, seq, sampled.prompt_logprobs[row])
        token = sampled.token_ids[row]
        seq.output_token_ids.append(token)
        if sampled.sampled_logprobs is not None and seq.params.logprobs is not None:
            self._record_logprobs(seq, token, sampled, row)
        self._check_stop(seq, token)
        if seq.is_finished and request.finished:
            request.metrics["finished_time"] = now

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        if is_eos or token in params.stop_token_ids:
            # the stop token ends the text; its own text is shown only if asked for
            if params.include_stop_str_in_output and not is_eos and params.detokenize:
                self.detokenizer.append(seq, flush=True)
            seq.finish("stop", None if is_eos else token)
            return
        new = self.detokenizer.append(seq) if params.detokenize else ""
        if params.stop_strings and new:
            hit = find_stop_string(seq, len(new))
            if hit is not None:
                stop, index = hit
                end = index + len(stop) if params.include_stop_str_in_output else index
                seq.output_text = seq.output_text[:end]
                seq.finish("stop", stop)
                return
        if (params.max_tokens is not None and len(seq.output_token_ids) >= params.max_tokens) or seq.num_tokens >= self.max_model_len:
            if params.detokenize:
                self.detokenizer.append(seq, flush=True)
            seq.finish("length")

    def _token_text(self, seq: Sequence):
        return self.detokenizer.token_text if seq.params.detokenize else _no_text

    def _record_prompt_logprobs(self, request: _Request, seq: Sequence, step: StepPromptLogprobs) -> None:
        """Append the positions a step computed: vLLM's list, None for the first prompt token
        (nothing predicts it), then per token a dict of the top k plus the token itself."""
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        if step.start + 1 != len(request.prompt_logprobs):
            return  # positions already recorded (a recomputation)
        text = self._token_text(seq)
        for token, logprob, rank, top_ids, top_values in zip(step.token_ids, step.logprobs, step.ranks, step.top_ids,
                                                              step.top_logprobs):
            entry = {tid: Logprob(lp, k + 1, text(tid)) for k, (tid, lp) in enumerate(zip(top_ids, top_values))}
            if token not in entry:
                entry[token] = Logprob(logprob, rank, text(token))
            request.prompt_logprobs.append(entry)

    def _record_logprobs(self, seq: Sequence, token: int, sampled: SamplerOutput, row: int) -> None:
        text = self._token_text(seq)
        entry = {
            tid: Logprob(lp, rank + 1, text(tid))
            for rank, (tid, lp) in enumerate(zip(sampled.top_ids[row], sampled.top_logprobs[row]))
        }
        if token not in entry:
            entry[token] = Logprob(sampled.sampled_logprobs[row], sampled.sampled_ranks[row], text(token))
        if seq.logprobs is None:
            seq.logprobs = []
        seq.logprobs.append(entry)
        seq.cumulative_logprob += sampled.sampled_logprobs[row]

    # ---- per request ----------------------------------------------------------------------------

    def make_output(self, request: _Request) -> RequestOutput | None:
        """The request's output after a step that advanced it; None when its kind sends nothing now."""
        kind = request.params.output_kind
        finished = request.finished
        if kind is RequestOutputKind.DELTA:
            completions = [c for seq, sent in zip(request.seqs, request.emitted)
                           if (c := self._delta(request, seq, sent)) is not None]
            if not completions:
                return None
        elif kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        else:
            completions = [self._whole(request, seq) for seq in request.seqs]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             finished, request.lora_request, dict(request.metrics), self._prompt_logprobs(request))

    @staticmethod
    def _prompt_logprobs(request: _Request) -> PromptLogprobs | None:
        sent = request.emitted[0]
        if request.params.output_kind is RequestOutputKind.DELTA:
            if sent.prompt_logprobs or request.prompt_logprobs is None:
                return None
            sent.prompt_logprobs = True
        return request.prompt_logprobs

    def _whole(self, request: _Request, seq: Sequence) -> CompletionOutput:
        return CompletionOutput(
            index=seq.index,
            text=seq.output_text[:visible_length(seq)],  # the string itself when nothing is held
            token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            lora_request=request.lora_request,
        )

    def _delta(self, request: _Request, seq: Sequence, sent: Emitted) -> CompletionOutput | None:
        num_tokens, end = len(seq.output_token_ids), visible_length(seq)
        if num_tokens == sent.tokens and end == sent.chars and seq.is_finished == sent.finished:
            return None
        out = CompletionOutput(
            index=seq.index,
            text=seq.output_text[sent.chars : end],
            token_ids=seq.output_token_ids[sent.tokens :],
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            logprobs=seq.logprobs[sent.tokens :] if seq.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            lora_request=request.lora_request,
        )
        sent.tokens, sent.chars, sent.finished = num_tokens, end, seq.is_finished
        return out


def _no_text(token_id: int) -> None:
    return None
