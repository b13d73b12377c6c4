"""Fixtures: an archive server on loopback, a tiny base model and a real PEFT adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from archive_server import ArchiveServer


@pytest.fixture
def server() -> Iterator[ArchiveServer]:
    server = ArchiveServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplex.testing import tiny_base_model

    return tiny_base_model(tmp_path_factory.mktemp("models") / "tiny-base")


@pytest.fixture(scope="session")
def adapter_dir(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplex.testing import make_lora_adapter

    return make_lora_adapter(tiny_base, tmp_path_factory.mktemp("adapters") / "adapter", rank=8)
