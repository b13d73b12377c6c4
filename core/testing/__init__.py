"""`loraplex.testing`: what a resolver author needs to test a resolver, without the internet.

    tiny_base_model(path)                 a tiny random Llama with a byte-level tokenizer, saved
                                          with save_pretrained (fast, deterministic)
    make_lora_adapter(base, out_dir, ...) a real PEFT LoRA adapter for it (seeded, B non-zero)
    peft_greedy_tokens(base, adapter, prompt, n)
                                          PEFT's greedy tokens: what loraplex must generate
    ResolverConformance                   a pytest mixin: the checks every resolver should pass
                                          (see loraplex.testing.conformance for how to use it)

Its pytest plugin (`loraplex.testing.pytest_plugin`, loaded by pytest automatically) gives every
test the fixtures `base_model_path`, `lora_adapter_dir` and `other_lora_adapter_dir`;
`loraplex new-resolver NAME` (`loraplex.testing.template`) lays out a package that uses them.

Needs the testing extra (`pip install loraplex[testing]`: pytest, peft). Importing this package is
light; torch, transformers and peft load when a helper is first called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapters import DEFAULT_TARGET_MODULES, make_lora_adapter, peft_greedy_tokens
    from .conformance import DEFAULT_ESCAPING_NAMES, ResolverConformance
    from .models import TINY_VOCAB_SIZE, tiny_base_model

__all__ = [
    "DEFAULT_ESCAPING_NAMES",
    "DEFAULT_TARGET_MODULES",
    "TINY_VOCAB_SIZE",
    "ResolverConformance",
    "make_lora_adapter",
    "peft_greedy_tokens",
    "tiny_base_model",
]

_EXPORTS = {
    "tiny_base_model": ".models",
    "TINY_VOCAB_SIZE": ".models",
    "make_lora_adapter": ".adapters",
    "peft_greedy_tokens": ".adapters",
    "DEFAULT_TARGET_MODULES": ".adapters",
    "ResolverConformance": ".conformance",
    "DEFAULT_ESCAPING_NAMES": ".conformance",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loraplex.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
