"""loraplex.testing: the tiny base model, the adapter factory, and the resolver conformance suite
(run here against a small reference resolver, and shown to catch broken ones)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from loraplex.lora.request import LoRARequest
from loraplex.resolver import LoRAResolver
from loraplex.testing import DEFAULT_ESCAPING_NAMES, ResolverConformance, make_lora_adapter, tiny_base_model
from resolver_helpers import tiny_lora  # noqa: F401


def test_tiny_base_model_is_deterministic_and_loads(tmp_path, tiny_lora) -> None:
    from transformers import AutoTokenizer

    again = tiny_base_model(tmp_path / "again")
    other_seed = tiny_base_model(tmp_path / "other", seed=1)
    weights = (tiny_lora.base / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other_seed / "model.safetensors").read_bytes() != weights
    config = json.loads((again / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 259
    tokenizer = AutoTokenizer.from_pretrained(str(again))
    text = "Any text, even ünïcödé ✓"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == text
    assert max(ids) < config["vocab_size"]


def test_make_lora_adapter_writes_a_real_peft_adapter_with_non_zero_b(tiny_lora) -> None:
    from safetensors.torch import load_file

    config = json.loads((tiny_lora.adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(tiny_lora.base)
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tensors = load_file(str(tiny_lora.adapter / "adapter_model.safetensors"))
    b = [t for k, t in tensors.items() if ".lora_B." in k]
    assert len(b) == 14 and all(t.abs().max() > 0 for t in b)
    other = load_file(str(tiny_lora.other_adapter / "adapter_model.safetensors"))
    assert any(not other[k].equal(t) for k, t in tensors.items())  # another seed, other weights


def test_make_lora_adapter_options(tiny_lora, tmp_path) -> None:
    out = make_lora_adapter(tiny_lora.base, tmp_path / "r2", rank=2, seed=3, target_modules=["q_proj", "v_proj"], lora_alpha=4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (2, 4, ["q_proj", "v_proj"])


# ---- the conformance suite, on a reference resolver ----------------------------------------------------


class DirectoryResolver(LoRAResolver):
    """Adapters as subdirectories of `root`; names that leave it are refused; I/O off the loop."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        return await asyncio.to_thread(self._find, lora_name)

    def _find(self, lora_name: str) -> LoRARequest | None:
        if os.path.isabs(lora_name) or ".." in Path(lora_name).parts:
            raise ValueError(f"LoRA adapter name {lora_name!r} leaves the adapter directory")
        path = (self.root / lora_name).resolve()
        if not path.is_relative_to(self.root) or not (path / "adapter_config.json").is_file():
            return None
        return LoRARequest(lora_name=lora_name, lora_path=str(path), lora_int_id=abs(hash(lora_name)) or 1)


def lay_out(root: Path, adapter: Path) -> None:
    shutil.copytree(adapter, root / "adapters" / "my-adapter")
    for decoy in ("x", "b"):  # where "../x" and "a/../../b" would land: an escape would find these
        shutil.copytree(adapter, root / decoy)


class TestDirectoryResolverConformance(ResolverConformance):
    max_loop_block_seconds = 2.0  # generous: the check is that I/O runs off the loop, not a benchmark

    @pytest.fixture
    def resolver(self, tmp_path, lora_adapter_dir):
        lay_out(tmp_path, lora_adapter_dir)
        return DirectoryResolver(tmp_path / "adapters")

    @pytest.fixture
    def publish_adapter(self, tmp_path):
        return lambda lora_name, adapter_dir: publish_into(tmp_path / "adapters", lora_name, adapter_dir)

    @pytest.fixture
    def base_model_name(self, base_model_path):
        return str(base_model_path)

    @pytest.fixture
    def known_lora_name(self):
        return "my-adapter"


def publish_into(root: Path, lora_name: str, adapter_dir: Path) -> None:
    shutil.rmtree(root / lora_name, ignore_errors=True)
    shutil.copytree(adapter_dir, root / lora_name)


# ---- ... which catches broken resolvers ---------------------------------------------------------------------


class NaiveResolver(LoRAResolver):
    """Joins the name onto its root without checks: "../x" escapes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def resolve_lora(self, base_model_name, lora_name):
        path = os.path.join(self.root, lora_name)
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            return LoRARequest(lora_name=lora_name, lora_path=path, lora_int_id=1)
        return None


class RaisesWhenMissing(DirectoryResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        found = await super().resolve_lora(base_model_name, lora_name)
        if found is None:
            raise FileNotFoundError(lora_name)
        return found


class Blocking(DirectoryResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        time.sleep(0.3)  # blocking I/O on the event loop
        return self._find(lora_name)


class NotACoroutine(LoRAResolver):
    def resolve_lora(self, base_model_name, lora_name):  # forgot `async`
        return None


class WrongName(DirectoryResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        found = await super().resolve_lora(base_model_name, lora_name)
        return found and LoRARequest("something-else", 1, found.lora_path)


def test_the_suite_catches_broken_resolvers(tmp_path, tiny_lora) -> None:
    lay_out(tmp_path, tiny_lora.adapter)
    suite, root, base = ResolverConformance(), tmp_path / "adapters", str(tiny_lora.base)

    with pytest.raises(AssertionError, match=r"'\.\./x' resolved to .*must give None or ValueError"):
        suite.test_escaping_names_never_resolve(NaiveResolver(root), base, DEFAULT_ESCAPING_NAMES)
    with pytest.raises(AssertionError, match="must give None, not raise FileNotFoundError"):
        suite.test_unknown_name_returns_none(RaisesWhenMissing(root), base, "nothing-here")
    with pytest.raises(AssertionError, match="must be `async def`"):
        suite.test_resolve_lora_is_a_coroutine(NotACoroutine())
    with pytest.raises(AssertionError, match="names 'something-else', not 'my-adapter'"):
        suite.test_known_name_resolves_to_an_adapter_directory(WrongName(root), base, "my-adapter")

    class Strict(ResolverConformance):
        max_loop_block_seconds = 0.1

    with pytest.raises(AssertionError, match=r"blocked the event loop for 0\.[3-9]\d* s"):
        Strict().test_resolve_does_not_block_the_event_loop(Blocking(root), base, "my-adapter", "nothing-here")


# ---- ... and resolvers that keep copies badly ---------------------------------------------------------------


class CopiesWithoutChecking(LoRAResolver):
    """Copies <source>/<name> into its cache under the real name, unchecked, and serves that copy
    from then on: the trap of a cache filled before validation."""

    def __init__(self, source: Path, cache: Path) -> None:
        self.source, self.cache = source, cache

    async def resolve_lora(self, base_model_name, lora_name):
        target = self.cache / lora_name
        if not target.is_dir():
            if not (self.source / lora_name).is_dir():
                return None
            shutil.copytree(self.source / lora_name, target)
        return LoRARequest(lora_name=lora_name, lora_path=str(target), lora_int_id=1)


class ChecksThenCopies(CopiesWithoutChecking):
    """Copies only what looks like an adapter, but never fetches a name again (keeps the first copy)."""

    async def resolve_lora(self, base_model_name, lora_name):
        config = self.source / lora_name / "adapter_config.json"
        if not (self.cache / lora_name).is_dir():
            try:
                json.loads(config.read_text())
            except (OSError, ValueError):
                return None
            if not (config.parent / "adapter_model.safetensors").is_file():
                return None
        return await super().resolve_lora(base_model_name, lora_name)


def test_the_suite_catches_a_broken_adapter_kept_under_the_real_name(tmp_path, base_model_path, lora_adapter_dir,
                                                                      other_lora_adapter_dir) -> None:
    from loraplex.testing.conformance import _engine

    suite, source, base = ResolverConformance(), tmp_path / "source", str(base_model_path)
    engines = {}

    def engine_for(name):
        return engines.setdefault(name, _engine(base_model_path, name))

    def publish(lora_name, adapter_dir):
        publish_into(source, lora_name, adapter_dir)

    for breakage in ("config-not-json", "no-weights"):
        resolver = CopiesWithoutChecking(source, tmp_path / f"cache-{breakage}")
        with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(pytest.fail.Exception, match=(
                rf"the source was fixed after holding a broken adapter \({breakage}\), but 'fresh' still fails: .*"
                "must never keep a broken one under the adapter's name")):
            suite.test_a_broken_adapter_fails_clearly_and_its_fix_is_served(
                resolver, base, "fresh", publish, lora_adapter_dir, engine_for, _Factory(tmp_path / breakage), monkeypatch,
                breakage)

    checked = ChecksThenCopies(source, tmp_path / "cache-checked")
    with pytest.MonkeyPatch.context() as monkeypatch:  # checking first passes the broken-adapter check...
        suite.test_a_broken_adapter_fails_clearly_and_its_fix_is_served(
            checked, base, "fixed", publish, lora_adapter_dir, engine_for, _Factory(tmp_path / "f"), monkeypatch, "no-weights")
    # ... but a resolver that keeps its first copy must say so (serves_replaced_adapters = False)
    with pytest.raises(AssertionError, match="does not hold the replacement"):
        suite.test_a_replaced_adapter_is_served_as_documented(checked, base, "replaced", publish, lora_adapter_dir,
                                                              other_lora_adapter_dir)

    class KeepsFirstCopy(ResolverConformance):
        serves_replaced_adapters = False

    KeepsFirstCopy().test_a_replaced_adapter_is_served_as_documented(
        ChecksThenCopies(source, tmp_path / "cache-2"), base, "replaced-2", publish, lora_adapter_dir, other_lora_adapter_dir)


class _Factory:
    """A stand-in for pytest's tmp_path_factory when a check is called directly."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path


# ---- the fixtures work outside the mixin, in any project that installs loraplex --------------------------------


def test_the_fixtures_are_there_for_module_level_tests(base_model_path, lora_adapter_dir, other_lora_adapter_dir) -> None:
    assert json.loads((lora_adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_model_path)
    weights = "adapter_model.safetensors"
    assert (lora_adapter_dir / weights).read_bytes() != (other_lora_adapter_dir / weights).read_bytes()


AUTHOR_TEST = """
import json

from loraplex.testing import ResolverConformance


def test_a_module_level_test_gets_the_kit_fixtures(base_model_path, lora_adapter_dir):
    config = json.loads((lora_adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_model_path)


class TestNothingElse:
    def test_the_mixin_imports(self):
        assert ResolverConformance.serves_replaced_adapters is True
"""


def test_an_author_project_gets_the_fixtures_from_the_installed_plugin(tmp_path) -> None:
    """A project outside this repository (no conftest.py of ours): the fixtures come through the
    `pytest11` entry point of the installed loraplex."""
    import subprocess
    import sys

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_author.py").write_text(AUTHOR_TEST)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
