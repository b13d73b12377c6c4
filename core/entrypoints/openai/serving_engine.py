"""What the completion and chat endpoints share: the token budget, sampling parameters, usage,
and server-sent events."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ...engine.async_engine import AsyncLLMEngine
from ...errors import InvalidRequestError
from ...sampling_params import RequestOutputKind, SamplingParams
from .errors import exception_body
from .generation import Generation
from .protocol import SamplingFields
from .serving_models import ServingModels


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, models: ServingModels, generation: Generation) -> None:
        self.engine = engine
        self.models = models
        self.generation = generation
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len: int = engine.engine.max_model_len

    def response_model(self, body: SamplingFields) -> str:
        """The `model` the response carries: as asked, or the served name when the request named none."""
        return body.model or self.models.served_model_name

    def max_tokens_for(self, prompt_len: int, requested: int | None) -> int:
        """The tokens a reply may have: `requested`, or all the context the prompt leaves (vLLM's rule)."""
        if requested is not None and requested < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1; got {requested}. Ask for 1 or more tokens, "
                                      "or leave it out to use all the context the prompt leaves")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens, and the prompt has {prompt_len}, "
                "leaving no room for a reply; shorten the prompt"
            )
        if requested is None:
            return room
        if requested > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
                "Reduce the length of the prompt or max_tokens."
            )
        return requested

    @staticmethod
    def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The request's SamplingParams (InvalidSamplingParamsError, a 400, names a bad field)."""
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k is None else body.top_k,
            min_p=0.0 if body.min_p is None else body.min_p,
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens,
            output_kind=RequestOutputKind.DELTA,
            presence_penalty=0.0 if body.presence_penalty is None else body.presence_penalty,
            frequency_penalty=0.0 if body.frequency_penalty is None else body.frequency_penalty,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=body.token_logit_bias(),
            bad_words=body.bad_words,
            allowed_token_ids=body.allowed_token_ids,
            prompt_logprobs=body.prompt_logprobs,
        )


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


async def server_sent_events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """`data: {...}` per chunk, then `data: [DONE]`; an error after the answer began is one more event."""
    try:
        async for chunk in chunks:
            yield f"data: {dumps(chunk)}\n\n"
    except Exception as exc:  # noqa: BLE001 - the status line is gone: the error travels in the stream
        _, body = exception_body(exc)
        yield f"data: {dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
