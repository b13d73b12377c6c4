"""`POST /tokenize` and `POST /detokenize` (vLLM's shapes), with the served model's tokenizer."""

from __future__ import annotations

from typing import Any

from ...errors import InvalidRequestError
from .protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeRequest
from .serving_chat import render_conversation
from .serving_models import ServingModels


class OpenAIServingTokenization:
    def __init__(self, models: ServingModels) -> None:
        self.models = models
        engine = models.engine.engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model_config.get_text_config().vocab_size

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        await self.models.lora_request_for(body.model)  # an unknown model is a 404 here too
        if isinstance(body, TokenizeChatRequest):
            ids = render_conversation(self.tokenizer, body.messages, body.chat_template, body.add_generation_prompt,
                                      body.chat_template_kwargs)
        else:
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        await self.models.lora_request_for(body.model)
        bad = [t for t in body.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"tokens {bad[:5]} are outside the vocabulary [0, {self.vocab_size}); "
                                      "send ids the model's tokenizer produced")
        return {"prompt": self.tokenizer.decode(body.tokens)}
