"""Request bodies of the OpenAI-compatible API (OpenAI's fields, plus vLLM's sampling extras).

Unknown fields are ignored, as OpenAI's own API does, so clients that send more than loraplex
uses keep working. Fields loraplex cannot honour (echo, suffix, best_of above n, vLLM's
use_beam_search) are accepted only at their neutral value: anything else is a 400 that names
the field, never a silently different answer. Responses are plain dicts built by the serving
modules, in OpenAI's shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...errors import InvalidRequestError


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(OpenAIBaseModel):
    """What completions and chat share: OpenAI's sampling fields and vLLM's extras."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    repetition_penalty: float | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool = False
    use_beam_search: bool = False

    def check_supported(self) -> None:
        """400 for any field set to something loraplex cannot serve."""
        _neutral("use_beam_search", self.use_beam_search, (False,))
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed with stream=true; remove it or set stream to true")
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequestError("prompt_logprobs are not available when stream=true; "
                                      "remove prompt_logprobs or set stream to false")

    def token_logit_bias(self) -> dict[int, float] | None:
        """`logit_bias` with its keys as token ids (JSON object keys are strings)."""
        if self.logit_bias is None:
            return None
        bias = {}
        for token, value in self.logit_bias.items():
            try:
                bias[int(token)] = value
            except ValueError:
                raise InvalidRequestError(f"logit_bias key {token!r} is not a token id; the keys of logit_bias must be "
                                          "integer token ids written as strings, e.g. {\"50256\": -100}") from None
        return bias


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        _neutral("echo", self.echo, (None, False))
        _neutral("suffix", self.suffix, (None, ""))
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(f"best_of={self.best_of} is not supported (only best_of equal to n, as in vLLM's "
                                      "V1 engine, which dropped it); remove best_of")


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageURL(OpenAIBaseModel):
    url: str
    detail: str | None = None


class ImageURLPart(OpenAIBaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImageURLPart, Field(discriminator="type")]


class ChatMessage(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed on to the chat template

    role: str
    content: str | list[ContentPart] | None = None

    def for_template(self, image_token: str = "") -> dict[str, Any]:
        """The message as the chat template takes it: its content as one string, each image part
        written as the model's image placeholder (`image_token`), where it stands among the text."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text if isinstance(part, TextPart) else image_token for part in self.content)
        return message

    def image_urls(self) -> list[str]:
        return [part.image_url.url for part in self.content or () if isinstance(part, ImageURLPart)] \
            if isinstance(self.content, list) else []


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # OpenAI's older name of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # vLLM's extras for the chat template
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: set logprobs to true, or remove top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeCompletionRequest(OpenAIBaseModel):
    """POST /tokenize with a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    """POST /tokenize with chat messages (rendered with the chat template first)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(OpenAIBaseModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    """POST /v1/load_lora_adapter (vLLM's fields)."""

    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    """POST /v1/unload_lora_adapter (vLLM's fields)."""

    lora_name: str | None = None
    lora_int_id: int | None = None


def _neutral(name: str, value: object, neutral: tuple[object, ...]) -> None:
    if value not in neutral:
        shown = ", ".join("null" if v is None else repr(v) for v in neutral)
        raise InvalidRequestError(f"{name}={value!r} is not supported by this server; remove {name} or set it to {shown}")
