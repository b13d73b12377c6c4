"""`POST /v1/chat/completions`: a conversation, rendered with the model's chat template, in;
assistant replies out, streamed (`chat.completion.chunk`) or whole."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from ...errors import InvalidRequestError
from ...outputs import CompletionOutput, RequestOutput
from ...tokenizer import apply_chat_template
from .generation import EngineRequest, IndexedOutputs
from .logprobs import TokenNamer, chat_logprobs, prompt_logprobs_json
from .protocol import ChatCompletionRequest, ChatMessage
from .serving_engine import OpenAIServing, random_id, server_sent_events, usage


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, body: ChatCompletionRequest) -> Response:
        body.check_supported()
        lora_request = await self.models.lora_request_for(body.model)
        prompt_ids = render_conversation(self.tokenizer, body.messages, body.chat_template, body.add_generation_prompt,
                                         body.chat_template_kwargs)
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = self.max_tokens_for(len(prompt_ids), body.requested_max_tokens)
        request_id = random_id("chatcmpl")
        request = EngineRequest(request_id, prompt_ids, self.sampling_params(body, max_tokens, num_logprobs), lora_request)
        outputs = await self.generation.start([request])
        answer = _Answer(request_id, self.response_model(body), body, len(prompt_ids),
                         TokenNamer(self.tokenizer, body.return_tokens_as_token_ids))
        if body.stream:
            return StreamingResponse(server_sent_events(answer.chunks(outputs)), media_type="text/event-stream")
        return JSONResponse(await answer.whole(outputs))


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], chat_template: str | None,
                        add_generation_prompt: bool, chat_template_kwargs: dict[str, Any] | None) -> list[int]:
    """A conversation's prompt token ids (the template's errors are the request's: 400)."""
    conversation = [message.for_template() for message in messages]
    try:
        return apply_chat_template(tokenizer, conversation, chat_template, add_generation_prompt, chat_template_kwargs)
    except TemplateError as exc:
        raise InvalidRequestError(f"the chat template cannot render these messages ({exc}); check their roles "
                                  "and order, or pass another chat_template") from exc


class _Answer:
    """One chat request's choices as they fill in."""

    def __init__(self, request_id: str, model: str, body: ChatCompletionRequest, prompt_len: int, name: TokenNamer) -> None:
        self.request_id, self.model, self.body, self.prompt_len, self.name = request_id, model, body, prompt_len, name
        self.created = int(time.time())
        self.completion_tokens = 0

    def _logprobs(self, completion: CompletionOutput) -> dict[str, Any] | None:
        if not self.body.logprobs or completion.logprobs is None:
            return None
        return chat_logprobs(completion.token_ids, completion.logprobs, self.body.top_logprobs or 0, self.name)

    def _usage(self) -> dict[str, int]:
        return usage(self.prompt_len, self.completion_tokens)

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    async def whole(self, outputs: IndexedOutputs) -> dict[str, Any]:
        final: RequestOutput | None = None
        async for _, output in outputs:
            if final is None:
                final = output
            else:
                final.add(output, aggregate=True)
        choices = []
        for completion in sorted(final.outputs if final else [], key=lambda c: c.index):
            self.completion_tokens += len(completion.token_ids)
            choices.append({"index": completion.index, "message": {"role": "assistant", "content": completion.text},
                            "logprobs": self._logprobs(completion), "finish_reason": completion.finish_reason,
                            "stop_reason": completion.stop_reason})
        # vLLM's extra: the prompt's logprobs, once for the response (prompt_logprobs is refused with stream)
        return {**self._envelope("chat.completion", choices), "usage": self._usage(),
                "prompt_logprobs": prompt_logprobs_json(final.prompt_logprobs if final else None)}

    async def chunks(self, outputs: IndexedOutputs) -> AsyncIterator[dict[str, Any]]:
        options = self.body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and bool(options.continuous_usage_stats)
        kind = "chat.completion.chunk"
        # every choice opens with the assistant's role, as OpenAI's streams do
        for index in range(self.body.n):
            yield self._envelope(kind, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}])
        async for _, output in outputs:
            for completion in output.outputs:
                self.completion_tokens += len(completion.token_ids)
                logprobs = self._logprobs(completion) if completion.token_ids else None
                if not (completion.text or completion.finish_reason or logprobs):
                    continue  # tokens held back (a possible stop string, a partial character): nothing to show yet
                delta = {"content": completion.text} if completion.text else {}
                chunk = self._envelope(kind, [{"index": completion.index, "delta": delta, "logprobs": logprobs,
                                               "finish_reason": completion.finish_reason,
                                               "stop_reason": completion.stop_reason}])
                if continuous:
                    chunk["usage"] = self._usage()
                yield chunk
        if include_usage:
            yield {**self._envelope(kind, []), "usage": self._usage()}
