"""Tokenizer loading, end-of-sequence ids and chat templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import InvalidRequestError, ModelNotFoundError


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load a tokenizer from {str(path)!r}: {exc}") from exc


def stop_token_ids_of(tokenizer: PreTrainedTokenizerBase, model_path: Path) -> list[int]:
    """The tokenizer's EOS plus any EOS ids named by generation_config.json (as vLLM does)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    generation_config = model_path / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of a conversation rendered with the model's (or the given) chat template."""
    if chat_template is None and not tokenizer.chat_template:
        raise InvalidRequestError(
            "this model's tokenizer has no chat template; pass chat_template=... or use generate() with a plain prompt"
        )
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
        tokenize=False, **(chat_template_kwargs or {}),
    )
    return tokenizer.encode(rendered, add_special_tokens=False)
