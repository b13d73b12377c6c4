"""LLM: the offline Python API (vLLM's `LLM`): batch generation and chat over an LLMEngine."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from .config import EngineArgs
from .engine.llm_engine import LLMEngine, PromptType
from .errors import InvalidRequestError
from .outputs import RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams
from .tokenizer import apply_chat_template
from .vllm_compat import unknown_argument_error

Conversation = list[dict[str, Any]]


class LLM:
    """Generate from many prompts at once on one model.

    >>> llm = LLM()  # the embedded SmolLM2-135M-Instruct
    >>> out = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=8))
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        options = {field.name for field in dataclasses.fields(EngineArgs) if field.init}
        for name in kwargs:
            if name not in options:
                raise unknown_argument_error("LLM()", name, options)
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. One SamplingParams for all, or one per prompt."""
        prompt_list = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), len(prompt_list), "sampling_params")
        loras = _per_prompt(lora_request, len(prompt_list), "lora_request")
        return self._run(prompt_list, params, loras, use_tqdm)

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts = [
            {"prompt_token_ids": apply_chat_template(tokenizer, conv, chat_template, add_generation_prompt, chat_template_kwargs)}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], loras: list[Any], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        final_only = _final_only(params)
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, final_only[id(p)], lora_request=lora)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)  # leave the engine as it was: nothing half-queued
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in ids]


def _final_only(params: list[SamplingParams]) -> dict[int, SamplingParams]:
    """Each distinct SamplingParams (by identity) as FINAL_ONLY: generate keeps only the final
    outputs, so the engine need not build the ones in between."""
    final = {}
    for p in params:
        if p is not None and not isinstance(p, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be SamplingParams (or a list of them); got {type(p).__name__}")
        final[id(p)] = dataclasses.replace(p or SamplingParams(), output_kind=RequestOutputKind.FINAL_ONLY)
    return final


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return list(prompts)


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InvalidRequestError(f"{name} has {len(value)} entries for {count} prompts; give one, or one per prompt")
        return list(value)
    return [value] * count
