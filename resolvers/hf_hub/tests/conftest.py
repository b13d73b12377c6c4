"""Fixtures for the Hub resolver's tests: a fake Hub on loopback, a tiny base model and a real
PEFT adapter (made once per session with `loraplex.testing`)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub_server import FakeHub

BASE_MODEL_DIR_NAME = "tiny-base"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplex.testing import tiny_base_model

    return tiny_base_model(tmp_path_factory.mktemp("models") / BASE_MODEL_DIR_NAME)


@pytest.fixture(scope="session")
def adapter_template(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplex.testing import make_lora_adapter

    return make_lora_adapter(tiny_base, tmp_path_factory.mktemp("adapters") / "template", rank=4, seed=0)


@pytest.fixture
def adapter_files(adapter_template: Path, tmp_path: Path):
    """adapter_files(prefix, mutate=None): the session adapter's files as {repo path: bytes}."""

    def files(prefix: str = "", mutate=None) -> dict[str, bytes]:
        local = tmp_path / f"adapter-copy-{len(list(tmp_path.glob('adapter-copy-*')))}"
        shutil.copytree(adapter_template, local)
        if mutate is not None:
            mutate(local)
        return {prefix + p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file()}

    return files
