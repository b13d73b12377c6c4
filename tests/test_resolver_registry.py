"""loraplex.resolver: the LoRAResolver interface and the registry's contract (vLLM's names), and
vLLM-style resolver code running with only its import lines changed."""

from __future__ import annotations

import logging
import shutil
import sys
import types
from pathlib import Path

import pytest

from loraplex.lora.request import LoRARequest
from loraplex.resolver import LoRAResolver, LoRAResolverRegistry, _LoRAResolverRegistry
from resolver_helpers import DictResolver, isolated_registry, tiny_lora  # noqa: F401


def test_vllm_import_paths_name_the_same_objects() -> None:
    import loraplex
    import loraplex.lora.request
    import loraplex.lora.resolver
    import loraplex.resolver

    assert loraplex.lora.resolver.LoRAResolver is loraplex.resolver.LoRAResolver
    assert loraplex.lora.resolver.LoRAResolverRegistry is loraplex.resolver.LoRAResolverRegistry
    assert loraplex.lora.request.LoRARequest is loraplex.LoRARequest is loraplex.resolver.LoRARequest


def test_importing_the_resolver_api_does_not_load_torch() -> None:
    import subprocess

    code = "import sys, loraplex.lora.resolver, loraplex.plugins; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_resolve_lora_is_abstract() -> None:
    class Incomplete(LoRAResolver):
        pass

    with pytest.raises(TypeError, match="resolve_lora"):
        Incomplete()


def test_register_get_and_order() -> None:
    registry = _LoRAResolverRegistry()
    a, b, c = DictResolver(), DictResolver(), DictResolver()
    registry.register_resolver("b", b)
    registry.register_resolver("a", a)
    registry.register_resolver("c", c)
    assert list(registry.get_supported_resolvers()) == ["b", "a", "c"]  # registration order, not sorted
    assert registry.get_resolver("a") is a
    assert "a" in registry and "z" not in registry
    registry.unregister_resolver("a")
    assert list(registry.get_supported_resolvers()) == ["b", "c"]
    registry.clear()
    assert list(registry.get_supported_resolvers()) == []


def test_a_duplicate_name_replaces_the_old_one_in_place_with_a_warning(caplog) -> None:
    registry = _LoRAResolverRegistry()
    old, new, other = DictResolver(), DictResolver(), DictResolver()
    registry.register_resolver("s3", old)
    registry.register_resolver("fs", other)
    with caplog.at_level(logging.WARNING, logger="loraplex.resolver"):
        registry.register_resolver("s3", new)
    assert registry.get_resolver("s3") is new
    assert list(registry.get_supported_resolvers()) == ["s3", "fs"]
    # vLLM's wording, then which resolver was replaced
    assert "LoRA resolver s3 is already registered, and will be overwritten by the new resolver instance" in caplog.text
    assert repr(old) in caplog.text
    caplog.clear()
    registry.register_resolver("s3", new)  # the same object again: nothing to warn about
    assert caplog.text == ""


def test_a_missing_resolver_is_vllms_key_error_then_the_fix() -> None:
    registry = _LoRAResolverRegistry()
    registry.register_resolver("fs", DictResolver())
    registry.register_resolver("s3", DictResolver())
    vllm_text = r"LoRA resolver 'hub' not found\. Available resolvers: \['fs', 's3'\]\. Install and enable the plugin"
    with pytest.raises(KeyError, match=vllm_text):
        registry.get_resolver("hub")
    with pytest.raises(KeyError, match=vllm_text):
        registry.unregister_resolver("hub")
    with pytest.raises(KeyError, match=r"'fs' not found\. Available resolvers: \[\]"):
        _LoRAResolverRegistry().get_resolver("fs")


def test_resolvers_is_vllms_dict_of_name_to_resolver() -> None:
    registry = _LoRAResolverRegistry()
    a, b = DictResolver(), DictResolver()
    registry.register_resolver("a", a)
    registry.register_resolver("b", b)
    assert registry.resolvers == {"a": a, "b": b}
    held = registry.resolvers
    snapshot = registry._snapshot()
    registry.unregister_resolver("a")
    assert held == {"b": b}  # the same dict, kept current
    registry._restore(snapshot)  # as the plugin loader undoes a failed plugin
    assert held is registry.resolvers and held == {"a": a, "b": b}


def test_only_lora_resolvers_can_be_registered() -> None:
    class DuckTyped:
        async def resolve_lora(self, base_model_name, lora_name):
            return None

    registry = _LoRAResolverRegistry()
    with pytest.raises(TypeError, match=r"DuckTyped.*'duck'.*not a LoRAResolver"):
        registry.register_resolver("duck", DuckTyped())
    with pytest.raises(TypeError, match=r"'s3://bucket' \(a str\).*not a LoRAResolver"):
        registry.register_resolver("text", "s3://bucket")
    with pytest.raises(TypeError, match=r"the class resolver_helpers.DictResolver.*not a LoRAResolver instance"):
        registry.register_resolver("cls", DictResolver)  # the class, not an instance
    with pytest.raises(TypeError, match="non-empty string"):
        registry.register_resolver("", DictResolver())
    assert list(registry.get_supported_resolvers()) == []


def test_large_ids_like_abs_hash_are_accepted() -> None:
    request = LoRARequest(lora_name="x", lora_path="/p", lora_int_id=abs(hash("x")) or 1)
    assert request.lora_int_id >= 1


# ---- vLLM's documented custom S3 resolver, with only its imports changed -------------------------------------
#
# vLLM's LoRA guide ("Using Plugins") shows an S3 resolver built on s3fs: it formats an S3 and a local
# path from the templates in S3_PATH_TEMPLATE / LOCAL_PATH_TEMPLATE, downloads with
# `await self.s3._get(s3_path, local_path, recursive=True, maxdepth=1)`, returns
# `LoRARequest(lora_name=..., lora_path=..., lora_int_id=abs(hash(lora_name)))`, and is registered
# with `LoRAResolverRegistry.register_resolver("s3_resolver", ...)`. The code below does exactly that,
# against a stand-in `s3fs` that serves a local directory as the bucket.

VLLM_STYLE_S3_RESOLVER = '''
import os
import s3fs
from loraplex.lora.request import LoRARequest          # vLLM: from vllm.lora.request import LoRARequest
from loraplex.lora.resolver import LoRAResolver        # vLLM: from vllm.lora.resolver import LoRAResolver


class S3LoRAResolver(LoRAResolver):
    def __init__(self):
        self.s3 = s3fs.S3FileSystem()
        self.s3_path_format = os.getenv("S3_PATH_TEMPLATE")
        self.local_path_format = os.getenv("LOCAL_PATH_TEMPLATE")

    async def resolve_lora(self, base_model_name, lora_name):
        s3_path = self.s3_path_format.format(base_model_name=base_model_name, lora_name=lora_name)
        local_path = self.local_path_format.format(base_model_name=base_model_name, lora_name=lora_name)
        await self.s3._get(s3_path, local_path, recursive=True, maxdepth=1)
        return LoRARequest(lora_name=lora_name, lora_path=local_path, lora_int_id=abs(hash(lora_name)))


def register_s3_resolver():
    from loraplex.lora.resolver import LoRAResolverRegistry  # vLLM: from vllm.lora.resolver import ...

    s3_resolver = S3LoRAResolver()
    LoRAResolverRegistry.register_resolver("s3_resolver", s3_resolver)
'''


def fake_s3fs(bucket_root: Path) -> types.ModuleType:
    class S3FileSystem:
        def __init__(self, **kwargs) -> None:
            self.gets: list[tuple[str, str]] = []

        async def _get(self, rpath: str, lpath: str, recursive: bool = False, maxdepth: int | None = None) -> None:
            assert rpath.startswith("s3://") and recursive and maxdepth == 1
            self.gets.append((rpath, lpath))
            source = bucket_root / rpath[len("s3://"):]
            if not source.is_dir():
                raise FileNotFoundError(rpath)
            shutil.copytree(source, lpath, dirs_exist_ok=True)

    module = types.ModuleType("s3fs")
    module.S3FileSystem = S3FileSystem
    return module


def test_vllm_s3_resolver_example_serves_adapters(tiny_lora, isolated_registry, monkeypatch, tmp_path) -> None:
    from loraplex import LLM, SamplingParams
    from loraplex.testing import peft_greedy_tokens

    shutil.copytree(tiny_lora.adapter, tmp_path / "bucket" / "loras" / "sql-adapter")
    monkeypatch.setitem(sys.modules, "s3fs", fake_s3fs(tmp_path / "bucket"))
    monkeypatch.setenv("S3_PATH_TEMPLATE", "s3://loras/{lora_name}")
    monkeypatch.setenv("LOCAL_PATH_TEMPLATE", str(tmp_path / "cache" / "{lora_name}"))
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    namespace: dict = {}
    exec(compile(VLLM_STYLE_S3_RESOLVER, "vllm_style_s3_resolver.py", "exec"), namespace)
    namespace["register_s3_resolver"]()
    assert list(LoRAResolverRegistry.get_supported_resolvers()) == ["s3_resolver"]

    llm = LLM(str(tiny_lora.base), enable_lora=True, max_lora_rank=8, kv_cache_memory_bytes=1 << 20, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = llm.generate("Fetched from S3", params, use_tqdm=False, lora_request="sql-adapter")[0]
    assert out.outputs[0].token_ids == peft_greedy_tokens(tiny_lora.base, tiny_lora.adapter, "Fetched from S3", 6)
    assert out.lora_request.lora_path == str(tmp_path / "cache" / "sql-adapter")
    assert out.lora_request.lora_int_id == abs(hash("sql-adapter"))  # a large id, kept as given
    # a name the bucket lacks: the example raises FileNotFoundError, which is reported as that resolver's error
    from loraplex.errors import LoRAAdapterNotFoundError

    with pytest.raises(LoRAAdapterNotFoundError, match=r"'missing'.*'s3_resolver': error \(FileNotFoundError"):
        llm.generate("x", params, use_tqdm=False, lora_request="missing")
