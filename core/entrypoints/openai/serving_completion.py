"""`POST /v1/completions`: text (or token ids) in, continuations out, streamed or whole.

`prompt` is a string, a list of strings, a list of token ids or a list of such lists; each
prompt runs as its own engine request with `n` samples, and choice `i * n + j` is sample `j` of
prompt `i` (OpenAI's order).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...errors import InvalidRequestError
from ...outputs import CompletionOutput, RequestOutput
from .generation import EngineRequest, IndexedOutputs
from .logprobs import TokenNamer, completion_logprobs, prompt_logprobs_json
from .protocol import CompletionRequest
from .serving_engine import OpenAIServing, random_id, server_sent_events, usage


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, body: CompletionRequest) -> Response:
        body.check_supported()
        lora_request = await self.models.lora_request_for(body.model)
        prompts = self._prompt_token_ids(body.prompt)
        request_id = random_id("cmpl")
        requests = [
            EngineRequest(f"{request_id}-{i}", ids, self.sampling_params(body, self.max_tokens_for(len(ids), body.max_tokens),
                                                                          body.logprobs), lora_request)
            for i, ids in enumerate(prompts)
        ]
        outputs = await self.generation.start(requests)
        answer = _Answer(request_id, self.response_model(body), body, [len(ids) for ids in prompts],
                         TokenNamer(self.tokenizer, body.return_tokens_as_token_ids))
        if body.stream:
            return StreamingResponse(server_sent_events(answer.chunks(outputs)), media_type="text/event-stream")
        return JSONResponse(await answer.whole(outputs))

    def _prompt_token_ids(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt)]
        if not prompt:
            raise InvalidRequestError("prompt is an empty list; send a string, a list of strings or a list of token ids")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


class _Answer:
    """One HTTP request's choices as they fill in."""

    def __init__(self, request_id: str, model: str, body: CompletionRequest, prompt_lens: list[int], name: TokenNamer) -> None:
        self.request_id, self.model, self.body, self.prompt_lens, self.name = request_id, model, body, prompt_lens, name
        self.created = int(time.time())
        self.completion_tokens = 0
        self.offsets: dict[int, int] = {}  # choice -> characters sent so far (logprobs' text_offset)

    def _choice(self, prompt_index: int, completion: CompletionOutput) -> dict[str, Any]:
        index = prompt_index * self.body.n + completion.index
        logprobs = None
        if self.body.logprobs is not None and completion.logprobs is not None:
            logprobs = completion_logprobs(completion.token_ids, completion.logprobs, self.body.logprobs, self.name,
                                           self.offsets.get(index, 0))
        self.offsets[index] = self.offsets.get(index, 0) + len(completion.text)
        return {"index": index, "text": completion.text, "logprobs": logprobs,
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}

    def _usage(self) -> dict[str, int]:
        return usage(sum(self.prompt_lens), self.completion_tokens)

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}

    async def whole(self, outputs: IndexedOutputs) -> dict[str, Any]:
        finals: dict[int, RequestOutput] = {}
        async for prompt_index, output in outputs:
            if prompt_index in finals:
                finals[prompt_index].add(output, aggregate=True)
            else:
                finals[prompt_index] = output
        choices = []
        for prompt_index, output in sorted(finals.items()):
            for completion in output.outputs:
                self.completion_tokens += len(completion.token_ids)
                # vLLM's extra: each choice carries its prompt's logprobs (prompt_logprobs is refused with stream)
                choices.append({**self._choice(prompt_index, completion),
                                "prompt_logprobs": prompt_logprobs_json(output.prompt_logprobs)})
        choices.sort(key=lambda choice: choice["index"])
        return {**self._envelope(choices), "usage": self._usage()}

    async def chunks(self, outputs: IndexedOutputs) -> AsyncIterator[dict[str, Any]]:
        options = self.body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and bool(options.continuous_usage_stats)
        async for prompt_index, output in outputs:
            for completion in output.outputs:
                self.completion_tokens += len(completion.token_ids)
                if not (completion.text or completion.finish_reason or (completion.token_ids and self.body.logprobs is not None)):
                    continue  # tokens held back (a possible stop string, a partial character): nothing to show yet
                chunk = self._envelope([self._choice(prompt_index, completion)])
                if continuous:
                    chunk["usage"] = self._usage()
                yield chunk
        if include_usage:
            yield {**self._envelope([]), "usage": self._usage()}
