"""What a string names in the Python API: a plain name is a name (added adapters, then resolvers),
`org/repo` is a Hub id, and only a value written as a path reaches a local folder; an unknown name
while resolvers are installed but runtime updating is off says which switch to turn."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from lora_helpers import lora_engine
from loraplex.errors import LoRAAdapterNotFoundError
from resolver_helpers import DictResolver, isolated_registry, tiny_lora  # noqa: F401


@pytest.fixture
def cwd_with_folders(tmp_path, monkeypatch, tiny_lora):  # noqa: F811
    """The current directory holds adapter folders named `sql` and `org/repo` (another adapter)."""
    shutil.copytree(tiny_lora.other_adapter, tmp_path / "sql")
    shutil.copytree(tiny_lora.other_adapter, tmp_path / "org" / "repo")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def engine(tiny_lora):  # noqa: F811
    return lora_engine(tiny_lora.base, max_loras=1)


def test_a_plain_name_reaches_the_resolver_not_a_folder_of_the_same_name(cwd_with_folders, engine, tiny_lora,  # noqa: F811
                                                                         isolated_registry, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    isolated_registry.register_resolver("dict", DictResolver({"sql": tiny_lora.adapter}))
    assert engine.lora_catalog.lookup("sql").lora_path == str(tiny_lora.adapter)


def test_a_plain_name_is_never_a_folder_and_the_error_says_how_to_name_it(cwd_with_folders, engine,
                                                                          isolated_registry, monkeypatch) -> None:  # noqa: F811
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    with pytest.raises(LoRAAdapterNotFoundError, match=r"write it as a path: '\./sql'"):
        engine.lora_catalog.lookup("sql")
    assert engine.list_adapters() == {}
    assert engine.lora_catalog.lookup("./sql").lora_path == "sql"  # written as a path, it is the folder
    assert engine.lora_catalog.lookup(str(cwd_with_folders / "org" / "repo")).lora_name.endswith("org/repo")


def test_a_hub_id_is_not_shadowed_by_a_relative_folder(cwd_with_folders, engine, tiny_lora, isolated_registry,  # noqa: F811
                                                       monkeypatch) -> None:
    import huggingface_hub

    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kwargs: downloads.append(repo) or str(tiny_lora.adapter))
    assert engine.lora_catalog.lookup("org/repo").lora_path == str(tiny_lora.adapter)
    assert downloads == ["org/repo"]
    assert engine.lora_catalog.lookup("./org/repo").lora_path == "org/repo"
    assert downloads == ["org/repo"]


def test_an_unknown_name_with_resolvers_installed_but_updating_off_names_the_switch(engine, isolated_registry,  # noqa: F811
                                                                                    tiny_lora, monkeypatch) -> None:  # noqa: F811
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    isolated_registry.register_resolver("dict", DictResolver({"sql": tiny_lora.adapter}))
    expected = r"resolvers installed but not asked: dict\); set VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
    with pytest.raises(LoRAAdapterNotFoundError, match=expected):  # HTTP's path
        asyncio.run(engine.resolve_lora("sql"))
    with pytest.raises(LoRAAdapterNotFoundError, match=r"resolvers are installed \(dict\) but were not asked: "
                                                       r"VLLM_ALLOW_RUNTIME_LORA_UPDATING is off"):  # the Python API's
        engine.lora_catalog.lookup("sql")
    isolated_registry.clear()  # no resolver installed: no word about them
    with pytest.raises(LoRAAdapterNotFoundError) as info:
        engine.lora_catalog.lookup("sql")
    assert "resolvers are installed" not in str(info.value)
