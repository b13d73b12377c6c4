"""Real PEFT LoRA adapters for a base model, and PEFT's own greedy output as the oracle."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_TARGET_MODULES", "make_lora_adapter", "peft_greedy_tokens", "randomize_lora_weights"]

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(
    base_model_path: str | Path,
    out_dir: str | Path,
    rank: int = 4,
    seed: int = 0,
    target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES,
    *,
    lora_alpha: float | None = None,
    a_std: float | None = None,
    b_std: float = 0.1,
) -> Path:
    """Save a PEFT LoRA adapter for `base_model_path` into `out_dir` with PEFT's `save_pretrained`.

    A ~ N(0, a_std) (default 1/sqrt(in_features)) and B ~ N(0, b_std), seeded: B is non-zero,
    unlike a freshly initialised adapter, so the adapter visibly changes the model's output.
    `lora_alpha` defaults to 2 * rank. `adapter_config.json` names `base_model_path` as its base
    model. Needs `peft`. PEFT's own warnings are silenced (they are about PEFT, not your code).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if lora_alpha is None else lora_alpha,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _quiet():
        peft_model = get_peft_model(model, config)
        randomize_lora_weights(peft_model, seed, a_std=a_std, b_std=b_std)
        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out_dir))
    return out_dir


def randomize_lora_weights(peft_model: Any, seed: int, *, a_std: float | None = None, b_std: float = 0.1) -> None:
    """Give a PEFT model's LoRA weights seeded non-zero values (PEFT starts B at zero).

    A ~ N(0, a_std) (default 1/sqrt(in_features), so x·Aᵀ is about as large as x) and
    B ~ N(0, b_std): the adapter visibly changes the output without swamping the base model.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters(), key=lambda item: item[0]):
            if ".lora_A." in name:
                std = a_std if a_std is not None else param.shape[1] ** -0.5
            elif ".lora_B." in name:
                std = b_std
            else:
                continue
            param.copy_(std * torch.randn(param.shape, generator=generator, dtype=torch.float32))


def peft_greedy_tokens(base_model_path: str | Path, adapter_path: str | Path | None, prompt: str, max_tokens: int) -> list[int]:
    """Exactly `max_tokens` greedy tokens after `prompt` from transformers + PEFT (EOS ignored):
    what loraplex must produce with `SamplingParams(temperature=0, max_tokens=..., ignore_eos=True)`.
    `adapter_path=None` gives the base model's tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32, attn_implementation="eager")
    input_ids = torch.tensor([tokenizer.encode(prompt)])
    with _quiet(), torch.inference_mode():
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_path))
        model.eval()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            min_new_tokens=max_tokens,
            max_new_tokens=max_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, input_ids.shape[1]:].tolist()


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
