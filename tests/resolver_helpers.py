"""Helpers for the resolver tests: a tiny base model with adapters, scripted resolvers, and a
registry isolated from whatever plugins the environment has installed.

Test modules import the fixtures (`from resolver_helpers import tiny_lora, isolated_registry  # noqa: F401`);
the model and adapters are built once per session (cached at module level).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraplex.lora.request import LoRARequest
from loraplex.resolver import LoRAResolver, LoRAResolverRegistry


@dataclass
class TinyLoRA:
    base: Path  # a tiny random Llama (loraplex.testing.tiny_base_model)
    adapter: Path  # a PEFT adapter for it (seed 0)
    other_adapter: Path  # another one (seed 1)
    misshapen_adapter: Path  # weights whose shapes do not fit the model


_CACHE: dict[str, TinyLoRA] = {}


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory) -> TinyLoRA:
    if "tiny" not in _CACHE:
        from loraplex.testing import make_lora_adapter, tiny_base_model

        root = tmp_path_factory.mktemp("resolver_models")
        base = tiny_base_model(root / "tiny-llama")
        adapter = make_lora_adapter(base, root / "adapters" / "seed0", seed=0)
        _CACHE["tiny"] = TinyLoRA(
            base=base,
            adapter=adapter,
            other_adapter=make_lora_adapter(base, root / "adapters" / "seed1", seed=1),
            misshapen_adapter=_misshapen_copy(adapter, root / "adapters" / "misshapen"),
        )
    return _CACHE["tiny"]


def _misshapen_copy(adapter: Path, out_dir: Path) -> Path:
    """A copy of `adapter` whose lora_A weights are 8 columns short: shapes the model refuses."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out_dir)
    tensors = load_file(str(out_dir / "adapter_model.safetensors"))
    tensors = {k: (v[:, :-8].contiguous() if ".lora_A." in k else v) for k, v in tensors.items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir


@pytest.fixture
def isolated_registry(monkeypatch):
    """The global registry emptied for one test (restored afterwards); plugin loading disabled so
    that engines built in the test see only the resolvers the test registers."""
    import loraplex.plugins

    saved = LoRAResolverRegistry._snapshot()
    LoRAResolverRegistry.clear()
    monkeypatch.setattr(loraplex.plugins, "load_plugins", lambda *args, **kwargs: [])
    yield LoRAResolverRegistry
    LoRAResolverRegistry._restore(saved)


# ---- scripted resolvers -------------------------------------------------------------------------


class DictResolver(LoRAResolver):
    """Resolves names from a {name: path} table; counts calls; can be slowed down."""

    def __init__(self, table: dict[str, Path | str] | None = None, delay: float = 0.0) -> None:
        self.table = {k: str(v) for k, v in (table or {}).items()}
        self.delay = delay
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        with self._lock:
            self.calls.append((base_model_name, lora_name))
        if self.delay:
            await asyncio.sleep(self.delay)
        path = self.table.get(lora_name)
        if path is None:
            return None
        return LoRARequest(lora_name=lora_name, lora_path=path, lora_int_id=abs(hash(lora_name)) or 1)


class RaisingResolver(LoRAResolver):
    def __init__(self, exc: Exception | None = None) -> None:
        self.exc = exc or ConnectionError("S3 endpoint unreachable")
        self.calls = 0

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        self.calls += 1
        raise self.exc


class HangingResolver(LoRAResolver):
    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        self.calls += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return None
