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
from ...multimodal.media import MediaPolicy, load_image
from ...outputs import CompletionOutput, RequestOutput
from ...tokenizer import apply_chat_template
from .generation import EngineRequest, IndexedOutputs
from .logprobs import TokenNamer, chat_logprobs, prompt_logprobs_json
from .protocol import ChatCompletionRequest, ChatMessage
from .serving_engine import OpenAIServing, random_id, server_sent_events, usage


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        options = self.engine.engine.args
        self.media = MediaPolicy.from_args(options.allowed_local_media_path, options.allowed_media_domains)

    async def create_chat_completion(self, body: ChatCompletionRequest) -> Response:
        body.check_supported()
        lora_request = await self.models.lora_request_for(body.model)
        images = await self._images(body.messages)
        processor = self.engine.engine.image_processor
        image_token = processor.image_token if images else ""
        prompt_ids = render_conversation(self.tokenizer, body.messages, body.chat_template, body.add_generation_prompt,
                                         body.chat_template_kwargs, image_token)
        # the prompt the model sees: each image's placeholder expanded to its embeddings
        prompt_len = len(prompt_ids) + (len(images) * (processor.feature_size - 1) if images else 0)
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = self.max_tokens_for(prompt_len, body.requested_max_tokens)
        request_id = random_id("chatcmpl")
        request = EngineRequest(request_id, prompt_ids, self.sampling_params(body, max_tokens, num_logprobs), lora_request,
                                {"image": images} if images else None)
        outputs = await self.generation.start([request])
        answer = _Answer(request_id, self.response_model(body), body, prompt_len,
                         TokenNamer(self.tokenizer, body.return_tokens_as_token_ids))
        if body.stream:
            return StreamingResponse(server_sent_events(answer.chunks(outputs)), media_type="text/event-stream")
        return JSONResponse(await answer.whole(outputs))


    async def _images(self, messages: list[ChatMessage]) -> list[Any]:
        """The images of the conversation's `image_url` parts, in order, read under the server's
        media policy; refused before anything is fetched when the model cannot take them."""
        urls = [url for message in messages for url in message.image_urls()]
        if not urls:
            return []
        processor = self.engine.engine.image_processor
        if processor is None:
            raise InvalidRequestError(f"the messages carry {len(urls)} image(s), but the model "
                                      f"{self.models.served_model_name!r} takes text only; send text content only")
        processor.check_count(len(urls))
        return [await load_image(url, self.media) for url in urls]


def render_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], chat_template: str | None,
                        add_generation_prompt: bool, chat_template_kwargs: dict[str, Any] | None,
                        image_token: str = "") -> list[int]:
    """A conversation's prompt token ids (the template's errors are the request's: 400); image
    parts are written as `image_token`."""
    conversation = [message.for_template(image_token) for message in messages]
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
