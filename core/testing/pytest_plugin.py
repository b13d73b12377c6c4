"""loraplex's pytest plugin: the resolver-testing fixtures, for any test of a project that installs
`loraplex[testing]` (registered through the `pytest11` entry point; nothing to import).

    base_model_path         a tiny random Llama (`tiny_base_model`), built once per session
    lora_adapter_dir        a real PEFT adapter for it (`make_lora_adapter`, seed 0), once per session
    other_lora_adapter_dir  another adapter for it (seed 1: other weights), a "new version" to publish

The adapters are shared by the whole session: copy them, don't change them. Module-level tests
use them like any fixture:

    def test_my_cache_keeps_one_copy(tmp_path, lora_adapter_dir):
        ...

Importing this module is light (pytest only): it loads with every pytest run of a project where
loraplex is installed; torch, transformers and peft load when a fixture is first used. With
plugin autoloading off (PYTEST_DISABLE_PLUGIN_AUTOLOAD), pass `-p loraplex.testing.pytest_plugin`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["base_model_path", "lora_adapter_dir", "other_lora_adapter_dir"]


@pytest.fixture(scope="session")
def base_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a byte-level tokenizer (`loraplex.testing.tiny_base_model`)."""
    from .models import tiny_base_model

    return tiny_base_model(tmp_path_factory.mktemp("loraplex-base") / "tiny-llama")


@pytest.fixture(scope="session")
def lora_adapter_dir(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter for `base_model_path` (`loraplex.testing.make_lora_adapter`, seed 0)."""
    from .adapters import make_lora_adapter

    return make_lora_adapter(base_model_path, tmp_path_factory.mktemp("loraplex-adapter") / "adapter", seed=0)


@pytest.fixture(scope="session")
def other_lora_adapter_dir(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another PEFT adapter for `base_model_path`, same shapes, other weights (seed 1)."""
    from .adapters import make_lora_adapter

    return make_lora_adapter(base_model_path, tmp_path_factory.mktemp("loraplex-adapter") / "other", seed=1)
