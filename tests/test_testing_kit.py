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
    def base_model_name(self, base_model_path):
        return str(base_model_path)

    @pytest.fixture
    def known_lora_name(self):
        return "my-adapter"


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


# ---- the complete example of docs/writing-a-resolver.md passes the suite ---------------------------------------

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-resolver.md"


def guide_code_block(after: str) -> str:
    text = GUIDE.read_text()
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start:text.index("```", start)]


def guide_zip_resolver():
    import sys
    import types

    module = types.ModuleType("guide_zip_resolver")
    sys.modules[module.__name__] = module  # for dataclasses / pickling, as a real import would
    exec(compile(guide_code_block("`src/loraplex_resolver_zip/resolver.py`:"), str(GUIDE), "exec"), module.__dict__)
    return module.ZipResolver


class TestGuideExampleConformance(ResolverConformance):
    @pytest.fixture
    def resolver(self, tmp_path, lora_adapter_dir):
        shutil.make_archive(str(tmp_path / "archives" / "my-adapter"), "zip", lora_adapter_dir)
        return guide_zip_resolver()(tmp_path / "archives", tmp_path / "cache")

    @pytest.fixture
    def base_model_name(self, base_model_path):
        return str(base_model_path)

    @pytest.fixture
    def known_lora_name(self):
        return "my-adapter"


def test_the_guide_example_test_file_matches_this_one() -> None:
    """The guide's test file is the fixture set above, with the package import instead of the guide's."""
    test_file = guide_code_block("`tests/test_zip_resolver.py`")
    assert "class TestZipResolver(ResolverConformance):" in test_file
    assert 'shutil.make_archive(str(tmp_path / "archives" / "my-adapter"), "zip", lora_adapter_dir)' in test_file
    assert 'return ZipResolver(tmp_path / "archives", tmp_path / "cache")' in test_file
