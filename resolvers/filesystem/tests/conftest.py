"""Fixtures for the filesystem resolver's tests: a tiny base model and a real PEFT adapter,
made once per session with `loraplex.testing` and copied where a test needs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

BASE_MODEL_DIR_NAME = "tiny-base"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplex.testing import tiny_base_model

    return tiny_base_model(tmp_path_factory.mktemp("models") / BASE_MODEL_DIR_NAME)


@pytest.fixture(scope="session")
def adapter_template(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplex.testing import make_lora_adapter

    return make_lora_adapter(tiny_base, tmp_path_factory.mktemp("adapters") / "template", rank=4, seed=0)


@pytest.fixture
def place_adapter(adapter_template: Path):
    """place_adapter(dest) copies the session's adapter to `dest` (parents created); returns dest."""

    def place(dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(adapter_template, dest)
        return dest

    return place
