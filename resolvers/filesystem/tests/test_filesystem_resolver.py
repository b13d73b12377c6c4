"""FilesystemResolver: layouts, adapter checks, path containment, the plugin and the conformance suite."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraplex.lora.request import LoRARequest
from loraplex.resolver import _LoRAResolverRegistry
from loraplex.testing import DEFAULT_ESCAPING_NAMES, ResolverConformance
from loraplex_resolver_filesystem import RESOLVER_NAME, FilesystemResolver
from loraplex_resolver_filesystem import plugin as fs_plugin
from loraplex.lora.adapter_dir import name_problem, stable_lora_id

BASE = "tiny-base"  # the last path component of the session's base model (see conftest.py)
LOGGER = "loraplex_resolver_filesystem"


def resolve(resolver: FilesystemResolver, name: str, base: str = BASE) -> LoRARequest | None:
    return asyncio.run(resolver.resolve_lora(base, name))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    root.mkdir()
    return root


# ---- the conformance suite ------------------------------------------------------------------------


class TestFilesystemConformance(ResolverConformance):
    """loraplex's resolver contract, on the per-base-model layout plus a symlink that points out."""

    @pytest.fixture
    def resolver(self, tmp_path: Path, lora_adapter_dir: Path, base_model_path: Path) -> FilesystemResolver:
        root = tmp_path / "loras"
        shutil.copytree(lora_adapter_dir, root / base_model_path.name / "known")
        for decoy in ("x", "b", "abs", "etc", "outside/escaped"):  # where escaping names would land
            shutil.copytree(lora_adapter_dir, tmp_path / decoy)
        os.symlink(tmp_path / "outside" / "escaped", root / "link-out")
        return FilesystemResolver(root)

    @pytest.fixture
    def publish_adapter(self, tmp_path: Path):
        """An operator replacing the folder (the resolver serves the source itself: no copy to go stale)."""

        def publish(lora_name: str, adapter_dir: Path) -> None:
            shutil.rmtree(tmp_path / "loras" / lora_name, ignore_errors=True)
            shutil.copytree(adapter_dir, tmp_path / "loras" / lora_name)

        return publish

    @pytest.fixture
    def base_model_name(self, base_model_path: Path) -> str:
        return str(base_model_path)

    @pytest.fixture
    def known_lora_name(self) -> str:
        return "known"

    @pytest.fixture
    def escaping_lora_names(self) -> list[str]:
        return [*DEFAULT_ESCAPING_NAMES, "../outside/escaped", "link-out", "known/../../../outside/escaped"]


# ---- layouts --------------------------------------------------------------------------------------


def test_flat_layout(root: Path, place_adapter) -> None:
    place_adapter(root / "sql")
    request = resolve(FilesystemResolver(root), "sql")
    assert isinstance(request, LoRARequest)
    assert request.lora_name == "sql"
    assert request.lora_path == str((root / "sql").resolve())
    assert request.lora_int_id == stable_lora_id("sql") >= 1


def test_per_base_model_layout_is_tried_first(root: Path, place_adapter) -> None:
    place_adapter(root / BASE / "sql")
    place_adapter(root / "sql")
    resolver = FilesystemResolver(root)
    assert resolve(resolver, "sql").lora_path == str(root / BASE / "sql")
    # the base model named by a path or a repo id: its last component picks the directory
    assert resolve(resolver, "sql", f"/models/{BASE}").lora_path == str(root / BASE / "sql")
    assert resolve(resolver, "sql", f"some-org/{BASE}").lora_path == str(root / BASE / "sql")
    # for another base model, neither tree holds an adapter it can use (theirs name tiny-base)
    assert resolve(resolver, "sql", "other-model") is None


def test_per_base_model_layout_with_a_repo_id(root: Path, place_adapter) -> None:
    place_adapter(root / "some-org" / BASE / "sql")
    assert resolve(FilesystemResolver(root), "sql", f"some-org/{BASE}").lora_path == str(root / "some-org" / BASE / "sql")
    assert resolve(FilesystemResolver(root), "sql", BASE) is None


def test_an_invalid_per_base_model_entry_falls_back_to_the_flat_one(root: Path, place_adapter) -> None:
    (root / BASE / "sql").mkdir(parents=True)  # empty: not an adapter
    place_adapter(root / "sql")
    assert resolve(FilesystemResolver(root), "sql").lora_path == str(root / "sql")


def test_nested_names(root: Path, place_adapter) -> None:
    place_adapter(root / "team-a" / "sql")
    request = resolve(FilesystemResolver(root), "team-a/sql")
    assert request is not None and request.lora_path == str(root / "team-a" / "sql")
    assert resolve(FilesystemResolver(root), "team-a") is None


def test_symlinks_inside_the_root_are_followed(root: Path, place_adapter) -> None:
    place_adapter(root / "store" / "v2")
    os.symlink(root / "store" / "v2", root / "sql")
    assert resolve(FilesystemResolver(root), "sql").lora_path == str(root / "store" / "v2")


def test_a_symlinked_root_works(tmp_path: Path, root: Path, place_adapter) -> None:
    place_adapter(root / "sql")
    os.symlink(root, tmp_path / "current")
    assert resolve(FilesystemResolver(tmp_path / "current"), "sql").lora_path == str(root / "sql")


# ---- misses and refusals ----------------------------------------------------------------------------


def test_a_missing_name_is_none_without_a_warning(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, LOGGER):
        assert resolve(FilesystemResolver(root), "nope") is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _assert_refused(resolver: FilesystemResolver, name: str, caplog: pytest.LogCaptureFixture, *words: str) -> None:
    caplog.clear()
    with caplog.at_level(logging.WARNING, LOGGER):
        assert resolve(resolver, name) is None
    text = " ".join(r.getMessage() for r in caplog.records)
    for word in words:
        assert word in text, text


def test_another_base_models_adapter_is_refused(root: Path, place_adapter, caplog: pytest.LogCaptureFixture) -> None:
    config = place_adapter(root / "sql") / "adapter_config.json"
    raw = json.loads(config.read_text())
    raw["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    config.write_text(json.dumps(raw))
    _assert_refused(FilesystemResolver(root), "sql", caplog, "meta-llama/Llama-3.2-1B", "trained for base model")


def test_an_adapter_that_names_no_base_model_is_accepted(root: Path, place_adapter) -> None:
    config = place_adapter(root / "sql") / "adapter_config.json"
    raw = json.loads(config.read_text())
    raw["base_model_name_or_path"] = None
    config.write_text(json.dumps(raw))
    assert resolve(FilesystemResolver(root), "sql", "any-model") is not None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter weights"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "cannot be read"),
        (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "JSON object"),
        (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "IA3"}'), "'IA3'"),
    ],
    ids=["no-config", "no-weights", "bad-json", "not-an-object", "not-lora"],
)
def test_what_is_not_a_lora_adapter_is_refused(root: Path, place_adapter, caplog, mutate, reason: str) -> None:
    mutate(place_adapter(root / "sql"))
    _assert_refused(FilesystemResolver(root), "sql", caplog, reason)


def test_a_file_is_not_an_adapter(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    (root / "sql").write_text("hello")
    _assert_refused(FilesystemResolver(root), "sql", caplog, "not a directory")


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "a/../../x", "/etc", "/", "a//b", "a/", "./a", "a\\b", " a", "a ", "a\x00b", "a\nb",
     "x" * 2000],
)
def test_names_that_leave_the_root_are_refused(tmp_path: Path, place_adapter, caplog, name: str) -> None:
    # an adapter at every place these names could reach
    place_adapter(tmp_path / "x")
    place_adapter(tmp_path / "loras" / "a" / "b")
    assert name_problem(name) is not None
    _assert_refused(FilesystemResolver(tmp_path / "loras"), name, caplog, "refusing")


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path, root: Path, place_adapter, caplog) -> None:
    place_adapter(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", root / "sql")
    _assert_refused(FilesystemResolver(root), "sql", caplog, "outside")


def test_a_symlinked_directory_on_the_way_out_is_refused(tmp_path: Path, root: Path, place_adapter, caplog) -> None:
    place_adapter(tmp_path / "elsewhere" / "sql")
    os.symlink(tmp_path / "elsewhere", root / "team")
    _assert_refused(FilesystemResolver(root), "team/sql", caplog, "outside")


def test_symlinked_files_out_of_the_root_are_refused(tmp_path: Path, root: Path, place_adapter, caplog) -> None:
    adapter = place_adapter(root / "sql")
    secret = place_adapter(tmp_path / "elsewhere") / "adapter_model.safetensors"
    (adapter / "adapter_model.safetensors").unlink()
    os.symlink(secret, adapter / "adapter_model.safetensors")
    _assert_refused(FilesystemResolver(root), "sql", caplog, "outside")


def test_a_missing_root_is_none_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _assert_refused(FilesystemResolver(tmp_path / "absent"), "sql", caplog, "not accessible", "VLLM_LORA_RESOLVER_CACHE_DIR")


def test_resolve_does_not_block_the_event_loop(root: Path, place_adapter) -> None:
    place_adapter(root / "sql")

    async def main() -> list:
        resolver = FilesystemResolver(root)
        return await asyncio.gather(*(resolver.resolve_lora(BASE, "sql") for _ in range(4)), asyncio.sleep(0))

    results = asyncio.run(main())
    assert all(r is not None and r.lora_path == str(root / "sql") for r in results[:4])


# ---- the plugin -----------------------------------------------------------------------------------


def test_plugin_registers_over_the_env_dir(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(root))
    registry = _LoRAResolverRegistry()
    fs_plugin.register_lora_resolvers(registry)
    assert registry.get_supported_resolvers() == [RESOLVER_NAME]
    resolver = registry.get_resolver(RESOLVER_NAME)
    assert isinstance(resolver, FilesystemResolver) and resolver.lora_cache_dir == root


def test_plugin_registers_nothing_without_the_env_var(monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("VLLM_LORA_RESOLVER_CACHE_DIR", raising=False)
    registry = _LoRAResolverRegistry()
    with caplog.at_level(logging.INFO, LOGGER):
        fs_plugin.register_lora_resolvers(registry)
    assert registry.get_supported_resolvers() == []
    assert "VLLM_LORA_RESOLVER_CACHE_DIR is not set" in caplog.text


def test_the_installed_entry_point_loads_through_loraplex_plugins(root: Path, place_adapter) -> None:
    """In a fresh process, as a server would: entry point -> hook -> registry -> resolution."""
    place_adapter(root / "sql")
    code = textwrap.dedent(
        f"""
        import asyncio
        from loraplex.plugins import load_plugins
        from loraplex.resolver import LoRAResolverRegistry
        statuses = {{s.name: s for s in load_plugins(strict=True)}}
        status = statuses["{RESOLVER_NAME}"]
        assert status.loaded and status.package == "loraplex-resolver-filesystem", status
        assert status.resolvers_registered == ["{RESOLVER_NAME}"], status
        resolver = LoRAResolverRegistry.get_resolver("{RESOLVER_NAME}")
        print(asyncio.run(resolver.resolve_lora("{BASE}", "sql")).lora_path)
        """
    )
    env = {**os.environ, "VLLM_PLUGINS": RESOLVER_NAME, "VLLM_LORA_RESOLVER_CACHE_DIR": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(root / "sql")


# ---- through the engine ---------------------------------------------------------------------------


def test_an_engine_serves_an_unknown_name_through_the_resolver(root: Path, place_adapter, tiny_base: Path, monkeypatch) -> None:
    """A request naming an adapter nobody added: the engine asks the resolver, loads what it
    found and generates what PEFT generates with that adapter."""
    from loraplex import LLM, SamplingParams
    from loraplex.resolver import LoRAResolverRegistry
    from loraplex.testing import peft_greedy_tokens

    place_adapter(root / BASE / "sql")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVER_MISS_TTL", "0")
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, FilesystemResolver(root))
    try:
        llm = LLM(str(tiny_base), device="cpu", enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=64,
                  kv_cache_memory_bytes=1 << 20)
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        out = llm.generate(["hello"], params, use_tqdm=False, lora_request="sql")
        assert out[0].outputs[0].token_ids == peft_greedy_tokens(tiny_base, root / BASE / "sql", "hello", 4)
        with pytest.raises(FileNotFoundError, match="no resolver found it"):
            llm.generate(["hello"], params, use_tqdm=False, lora_request="not-there")
    finally:
        LoRAResolverRegistry.unregister_resolver(RESOLVER_NAME)
