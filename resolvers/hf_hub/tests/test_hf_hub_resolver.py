"""HfHubResolver against a fake Hub on loopback: names, downloads, refusals, the opt-in plugin."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fake_hub_server import FakeHub

from loraplex.errors import ConfigError
from loraplex.resolver import _LoRAResolverRegistry
from loraplex.testing import ResolverConformance
from loraplex_resolver_hf_hub import RESOLVER_NAME, HfHubResolver, split_lora_name
from loraplex_resolver_hf_hub import plugin as hub_plugin

BASE = "tiny-base"
LOGGER = "loraplex_resolver_hf_hub"
OTHER_FILES = {"README.md": b"# adapters\n", ".gitattributes": b"*.safetensors filter=lfs\n"}


def resolve(resolver: HfHubResolver, name: str, base: str = BASE):
    return asyncio.run(resolver.resolve_lora(base, name))


def make_resolver(hub: FakeHub, tmp_path: Path, repos: list[str]) -> HfHubResolver:
    return HfHubResolver(repos, endpoint=hub.url, cache_dir=tmp_path / "hf-cache")


# ---- the conformance suite ------------------------------------------------------------------------


class TestHfHubConformance(ResolverConformance):
    @pytest.fixture
    def resolver(self, hub: FakeHub, tmp_path: Path, lora_adapter_dir: Path) -> HfHubResolver:
        hub.add_repo("test-org/loras", {**OTHER_FILES, **hub.folder_files(lora_adapter_dir, "known/")})
        hub.add_repo("test-org/x", hub.folder_files(lora_adapter_dir))  # where "a/../../x"-like names might land
        return make_resolver(hub, tmp_path, ["test-org/loras", "test-org/x"])

    @pytest.fixture
    def base_model_name(self, base_model_path: Path) -> str:
        return str(base_model_path)

    @pytest.fixture
    def publish_adapter(self, hub: FakeHub):
        """A push to the repo: the folder's files replaced, a new commit on main."""

        def publish(lora_name: str, adapter_dir: Path) -> None:
            repo, subpath = split_lora_name(lora_name)
            kept = {path: data for path, data in hub.repos.get(repo, {}).items() if not path.startswith(f"{subpath}/")}
            hub.add_repo(repo, {**kept, **hub.folder_files(adapter_dir, f"{subpath}/")})

        return publish

    @pytest.fixture
    def fresh_lora_name(self) -> str:
        return "test-org/loras/fresh"

    @pytest.fixture
    def known_lora_name(self) -> str:
        return "test-org/loras/known"

    @pytest.fixture
    def escaping_lora_names(self) -> list[str]:
        return ["../x", "/test-org/x", "test-org/loras/../x", "test-org/loras/known/../../x", "test-org/../test-org/x"]


# ---- names ----------------------------------------------------------------------------------------


def test_split_lora_name() -> None:
    assert split_lora_name("org/repo") == ("org/repo", "")
    assert split_lora_name("org/repo/a/b") == ("org/repo", "a/b")
    assert split_lora_name("repo") is None


def test_repo_ids_are_checked() -> None:
    assert HfHubResolver([" org/a ", "org/b/", ""]).repo_list == ["org/a", "org/b"]
    with pytest.raises(ValueError, match="not Hub repo ids"):
        HfHubResolver(["just-a-name"])


# ---- downloads ------------------------------------------------------------------------------------


def test_a_repo_that_is_an_adapter(hub: FakeHub, tmp_path: Path, adapter_files) -> None:
    hub.add_repo("test-org/sql-lora", {**OTHER_FILES, **adapter_files()})
    request = resolve(make_resolver(hub, tmp_path, ["test-org/sql-lora"]), "test-org/sql-lora")
    assert request is not None and request.lora_name == "test-org/sql-lora" and request.lora_int_id >= 1
    path = Path(request.lora_path)
    assert path.is_relative_to(tmp_path / "hf-cache")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(hub.downloaded()) == ["/test-org/sql-lora/resolve/" + hub.commits["test-org/sql-lora"] + f"/{name}"
                                        for name in ("adapter_config.json", "adapter_model.safetensors")]


def test_a_subpath_downloads_only_that_adapter(hub: FakeHub, tmp_path: Path, adapter_files) -> None:
    hub.add_repo("test-org/loras", {**OTHER_FILES, **adapter_files("sql/"), **adapter_files("chat/v2/")})
    resolver = make_resolver(hub, tmp_path, ["test-org/loras"])
    request = resolve(resolver, "test-org/loras/chat/v2")
    assert request is not None and Path(request.lora_path).parts[-2:] == ("chat", "v2")
    assert (Path(request.lora_path) / "adapter_model.safetensors").is_file()
    assert all("/chat/v2/adapter_" in path for path in hub.downloaded()), hub.downloaded()
    assert len(hub.downloaded()) == 2
    assert resolve(resolver, "test-org/loras/sql").lora_path.endswith("/sql")


def test_a_trailing_slash_names_the_same_folder_as_in_vllm(hub: FakeHub, tmp_path: Path, adapter_files) -> None:
    hub.add_repo("test-org/loras", {**adapter_files(), **adapter_files("chat/v2/")})
    resolver = make_resolver(hub, tmp_path, ["test-org/loras"])
    root = resolve(resolver, "test-org/loras/")
    assert root is not None and root.lora_name == "test-org/loras/"  # the name as the client wrote it
    assert (Path(root.lora_path) / "adapter_config.json").is_file() and Path(root.lora_path).name != "v2"
    sub = resolve(resolver, "test-org/loras/chat/v2/")
    assert sub is not None and sub.lora_name == "test-org/loras/chat/v2/"
    assert Path(sub.lora_path).parts[-2:] == ("chat", "v2")
    assert resolve(resolver, "test-org/loras//chat") is None  # an empty component inside stays refused


def test_a_cached_adapter_is_served_when_the_hub_is_down(hub: FakeHub, tmp_path: Path, adapter_files) -> None:
    hub.add_repo("test-org/loras", adapter_files("sql/"))
    resolver = make_resolver(hub, tmp_path, ["test-org/loras"])
    first = resolve(resolver, "test-org/loras/sql")
    hub.close()
    assert resolve(resolver, "test-org/loras/sql").lora_path == first.lora_path


def test_an_unreachable_hub_raises_for_an_adapter_never_fetched(hub: FakeHub, tmp_path: Path) -> None:
    hub.close()  # nothing listens there any more
    with pytest.raises(Exception, match="(?i)connect|internet|locate"):
        resolve(make_resolver(hub, tmp_path, ["test-org/loras"]), "test-org/loras/sql")


# ---- misses and refusals ----------------------------------------------------------------------------


def test_an_unlisted_repo_is_none_without_a_request(hub: FakeHub, tmp_path: Path, adapter_files) -> None:
    hub.add_repo("test-org/loras", adapter_files())
    resolver = make_resolver(hub, tmp_path, ["test-org/other"])
    assert resolve(resolver, "test-org/loras") is None
    assert resolve(resolver, "test-org/loras/sub") is None
    assert resolve(resolver, "single-name") is None
    assert hub.requests == []


def _assert_none_with(resolver, name: str, caplog, *words: str, level: int = logging.WARNING) -> None:
    caplog.clear()
    with caplog.at_level(logging.INFO, LOGGER):
        assert resolve(resolver, name) is None
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno >= level)
    for word in words:
        assert word in text, text


def test_a_listed_repo_missing_on_the_hub(hub: FakeHub, tmp_path: Path, caplog) -> None:
    _assert_none_with(make_resolver(hub, tmp_path, ["test-org/gone"]), "test-org/gone", caplog, "not found", "'test-org/gone'")


def test_a_missing_subpath(hub: FakeHub, tmp_path: Path, adapter_files, caplog) -> None:
    hub.add_repo("test-org/loras", adapter_files("sql/"))
    _assert_none_with(make_resolver(hub, tmp_path, ["test-org/loras"]), "test-org/loras/chat", caplog,
                      "no adapter_config.json", level=logging.INFO)
    assert hub.downloaded() == []


def test_another_base_models_adapter_is_refused(hub: FakeHub, tmp_path: Path, adapter_files, caplog) -> None:
    def retarget(local: Path) -> None:
        config = json.loads((local / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
        (local / "adapter_config.json").write_text(json.dumps(config))

    hub.add_repo("test-org/loras", adapter_files("sql/", retarget))
    _assert_none_with(make_resolver(hub, tmp_path, ["test-org/loras"]), "test-org/loras/sql", caplog,
                      "trained for base model 'meta-llama/Llama-3.2-1B'")


def test_a_repo_without_weights_is_refused(hub: FakeHub, tmp_path: Path, adapter_files, caplog) -> None:
    hub.add_repo("test-org/loras", adapter_files("sql/", lambda d: (d / "adapter_model.safetensors").unlink()))
    _assert_none_with(make_resolver(hub, tmp_path, ["test-org/loras"]), "test-org/loras/sql", caplog, "no adapter weights")


@pytest.mark.parametrize("name", ["test-org/loras/*", "test-org/loras/s[q]l", "test-org/loras/?ql"])
def test_glob_characters_are_refused(hub: FakeHub, tmp_path: Path, caplog, name: str) -> None:
    _assert_none_with(make_resolver(hub, tmp_path, ["test-org/loras"]), name, caplog, "glob")
    assert hub.requests == []


# ---- the opt-in plugin ----------------------------------------------------------------------------


def test_plugin_is_opt_in(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("VLLM_LORA_RESOLVER_HF_REPO_LIST", "test-org/loras")
    for selection in (None, "", "lora_filesystem_resolver"):
        if selection is None:
            monkeypatch.delenv("VLLM_PLUGINS", raising=False)
        else:
            monkeypatch.setenv("VLLM_PLUGINS", selection)
        registry = _LoRAResolverRegistry()
        caplog.clear()
        with caplog.at_level(logging.INFO, LOGGER):
            hub_plugin.register_lora_resolvers(registry)
        assert registry.get_supported_resolvers() == []
        assert "opt-in" in caplog.text


def test_plugin_registers_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver, lora_hf_hub_resolver")
    monkeypatch.setenv("VLLM_LORA_RESOLVER_HF_REPO_LIST", "test-org/loras, test-org/sql-lora")
    registry = _LoRAResolverRegistry()
    hub_plugin.register_lora_resolvers(registry)
    resolver = registry.get_resolver(RESOLVER_NAME)
    assert isinstance(resolver, HfHubResolver) and resolver.repo_list == ["test-org/loras", "test-org/sql-lora"]


def test_plugin_named_without_repos_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_PLUGINS", "lora_hf_hub_resolver")
    monkeypatch.delenv("VLLM_LORA_RESOLVER_HF_REPO_LIST", raising=False)
    with pytest.raises(ConfigError, match="VLLM_LORA_RESOLVER_HF_REPO_LIST is empty"):
        hub_plugin.register_lora_resolvers(_LoRAResolverRegistry())


def test_the_installed_plugin_end_to_end_with_hf_endpoint(hub: FakeHub, tmp_path: Path, adapter_files) -> None:
    """In a fresh process, as a server would: VLLM_PLUGINS opts in, HF_ENDPOINT points at the fake Hub."""
    hub.add_repo("test-org/loras", adapter_files("sql/"))
    code = textwrap.dedent(
        f"""
        import asyncio
        from loraplex.plugins import load_plugins
        from loraplex.resolver import LoRAResolverRegistry
        status = {{s.name: s for s in load_plugins(strict=True)}}["{RESOLVER_NAME}"]
        assert status.loaded and status.package == "loraplex-resolver-hf-hub", status
        resolver = LoRAResolverRegistry.get_resolver("{RESOLVER_NAME}")
        print(asyncio.run(resolver.resolve_lora("{BASE}", "test-org/loras/sql")).lora_path)
        """
    )
    env = {**os.environ, "VLLM_PLUGINS": RESOLVER_NAME, "VLLM_LORA_RESOLVER_HF_REPO_LIST": "test-org/loras",
           "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.is_relative_to(tmp_path / "hf-cache") and (path / "adapter_config.json").is_file()
