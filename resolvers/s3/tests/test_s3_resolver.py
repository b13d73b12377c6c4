"""S3Resolver against a moto S3 server on loopback: layouts, the atomic cache, limits, the plugin."""

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
import s3fs
from fsspec.callbacks import Callback

from loraplex.errors import ConfigError, InvalidLoRAAdapterError
from loraplex.resolver import _LoRAResolverRegistry
from loraplex.testing import DEFAULT_ESCAPING_NAMES, ResolverConformance
from loraplex_resolver_s3 import RESOLVER_NAME, S3Resolver, S3UriTemplate
from loraplex_resolver_s3 import plugin as s3_plugin
from loraplex_resolver_s3.cache import MANIFEST

BASE = "tiny-base"
LOGGER = "loraplex_resolver_s3"


def resolve(resolver: S3Resolver, name: str, base: str = BASE):
    return asyncio.run(resolver.resolve_lora(base, name))


def make_resolver(bucket, tmp_path: Path, uri: str | None = None, **kwargs) -> S3Resolver:
    return S3Resolver(uri or f"s3://{bucket.name}/loras", tmp_path / "s3-cache", endpoint_url=bucket.endpoint_url, **kwargs)


def cache_listing(resolver: S3Resolver) -> list[str]:
    root = resolver.cache.root
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---- the conformance suite ------------------------------------------------------------------------


class TestS3Conformance(ResolverConformance):
    max_loop_block_seconds = 1.0  # all s3fs work runs in the resolver's threads: the loop only waits

    @pytest.fixture
    def resolver(self, bucket, tmp_path: Path, lora_adapter_dir: Path, base_model_path: Path) -> S3Resolver:
        bucket.upload_dir(lora_adapter_dir, f"loras/{base_model_path.name}/known")
        for decoy in ("x", "b", "abs", "etc", f"loras/{base_model_path.name}/x", "loras/x"):  # where escaping names would land
            bucket.upload_dir(lora_adapter_dir, decoy)
        return make_resolver(bucket, tmp_path, f"s3://{bucket.name}/loras/{{base_model_name}}/{{lora_name}}")

    @pytest.fixture
    def base_model_name(self, base_model_path: Path) -> str:
        return str(base_model_path)

    @pytest.fixture
    def publish_adapter(self, bucket, base_model_path: Path):
        """An upload over the adapter's folder (stale files deleted), in the per-base-model layout."""

        def publish(lora_name: str, adapter_dir: Path) -> None:
            prefix = f"loras/{base_model_path.name}/{lora_name}/"
            for item in bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=prefix).get("Contents", []):
                bucket.client.delete_object(Bucket=bucket.name, Key=item["Key"])
            bucket.upload_dir(adapter_dir, prefix)

        return publish

    @pytest.fixture
    def known_lora_name(self) -> str:
        return "known"

    @pytest.fixture
    def escaping_lora_names(self) -> list[str]:
        return [*DEFAULT_ESCAPING_NAMES, "known/../x", "x/./known"]


# ---- the URI template -----------------------------------------------------------------------------


def test_uri_templates() -> None:
    assert S3UriTemplate("s3://b/loras").render("m", "sql").uri == "s3://b/loras/sql/"
    assert S3UriTemplate("s3://b/loras/").render("m", "team/sql").path == "b/loras/team/sql"
    per_base = S3UriTemplate("s3://b/loras/{base_model_name}/{lora_name}")
    assert per_base.uses_base_model
    for base in ("HuggingFaceTB/SmolLM2-135M-Instruct", "/models/SmolLM2-135M-Instruct/", "SmolLM2-135M-Instruct"):
        assert per_base.render(base, "sql").key == "loras/SmolLM2-135M-Instruct/sql"
    assert S3UriTemplate("s3://b/{lora_name}/v1").render("m", "sql").key == "sql/v1"
    with pytest.raises(ValueError, match="cannot be part of an S3 key"):
        per_base.render("", "sql")


@pytest.mark.parametrize(
    ("uri", "message"),
    [("http://b/x", "must start with s3://"), ("s3://b/{model}/{lora_name}", "unknown placeholder"),
     ("s3://{lora_name}", "must name a bucket"), ("s3:///x", "must name a bucket"), ("s3://b/{lora_name!r}", "placeholder")],
)
def test_bad_uri_templates(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S3UriTemplate(uri)


# ---- downloads and the cache ----------------------------------------------------------------------


def test_download_then_cache_hit(bucket, tmp_path: Path, local_adapter) -> None:
    bucket.upload_dir(local_adapter(), "loras/sql")
    bucket.put("loras/sql/README.md", b"# sql adapter\n")
    bucket.put("loras/sql/checkpoint-100/adapter_model.safetensors", b"not wanted")
    resolver = make_resolver(bucket, tmp_path)
    request = resolve(resolver, "sql")
    assert request is not None and request.lora_name == "sql" and request.lora_int_id >= 1
    path = Path(request.lora_path)
    assert path.parent == resolver.cache.root and not path.name.startswith(".")
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST, "adapter_config.json", "adapter_model.safetensors"]
    assert cache_listing(resolver) == [path.name]  # no temporary directory left
    assert json.loads((path / MANIFEST).read_text())["uri"] == f"s3://{bucket.name}/loras/sql/"
    again = resolve(resolver, "sql")
    assert again.lora_path == request.lora_path and resolver.downloads == 1


def test_per_base_model_layout(bucket, tmp_path: Path, local_adapter) -> None:
    bucket.upload_dir(local_adapter(), f"loras/{BASE}/sql")
    resolver = make_resolver(bucket, tmp_path, f"s3://{bucket.name}/loras/{{base_model_name}}/{{lora_name}}")
    assert resolve(resolver, "sql", f"some-org/{BASE}") is not None
    assert resolve(resolver, "sql", "other-model") is None


def test_nested_names(bucket, tmp_path: Path, local_adapter) -> None:
    bucket.upload_dir(local_adapter(), "loras/team-a/sql")
    resolver = make_resolver(bucket, tmp_path)
    assert resolve(resolver, "team-a/sql") is not None
    assert resolve(resolver, "team-a") is None  # a folder of adapters is not one


def test_a_changed_adapter_is_downloaded_again(bucket, tmp_path: Path, local_adapter) -> None:
    bucket.upload_dir(local_adapter(), "loras/sql")
    resolver = make_resolver(bucket, tmp_path)
    first = resolve(resolver, "sql")
    config = json.loads((Path(first.lora_path) / "adapter_config.json").read_text())
    config["lora_alpha"] = 99
    bucket.put("loras/sql/adapter_config.json", json.dumps(config).encode())
    second = resolve(resolver, "sql")
    assert second.lora_path == first.lora_path and resolver.downloads == 2
    assert json.loads((Path(second.lora_path) / "adapter_config.json").read_text())["lora_alpha"] == 99
    assert len(cache_listing(resolver)) == 1  # the old version is gone, no leftovers


def test_the_cached_copy_is_served_when_s3_cannot_be_listed(bucket, tmp_path, local_adapter, monkeypatch, caplog) -> None:
    bucket.upload_dir(local_adapter(), "loras/sql")
    resolver = make_resolver(bucket, tmp_path)
    first = resolve(resolver, "sql")

    def unreachable(*args, **kwargs):
        raise ConnectionError("S3 is down")

    monkeypatch.setattr(resolver.filesystem(), "ls", unreachable)
    with caplog.at_level(logging.WARNING, LOGGER):
        assert resolve(resolver, "sql").lora_path == first.lora_path
    assert "serving the cached copy" in caplog.text
    with pytest.raises(ConnectionError):
        resolve(resolver, "never-fetched")


def test_concurrent_resolves_download_once(bucket, tmp_path: Path, local_adapter, monkeypatch) -> None:
    bucket.upload_dir(local_adapter(), "loras/sql")
    resolver = make_resolver(bucket, tmp_path)
    fetched: list[str] = []
    real_get_file = s3fs.S3FileSystem._get_file

    async def counting_get_file(self, rpath, lpath, **kwargs):
        fetched.append(rpath)
        await asyncio.sleep(0.05)  # a slow network: the other resolves arrive while this one downloads
        return await real_get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counting_get_file)

    async def many():
        return await asyncio.gather(*(resolver.resolve_lora(BASE, "sql") for _ in range(8)))

    results = asyncio.run(many())
    assert len({r.lora_path for r in results}) == 1
    assert resolver.downloads == 1 and len(fetched) == 2, fetched


def test_work_that_is_done_before_its_callback_is_added_does_not_deadlock(bucket, tmp_path, local_adapter, monkeypatch) -> None:
    """The executor may finish (or fail) before resolve_lora attaches its clean-up callback."""
    import concurrent.futures
    import threading

    bucket.upload_dir(local_adapter(), "loras/sql")
    resolver = make_resolver(bucket, tmp_path)

    def run_now(fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future

    monkeypatch.setattr(resolver._executor, "submit", run_now)
    results: list = []
    worker = threading.Thread(target=lambda: results.append(resolve(resolver, "sql")), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "resolve_lora deadlocked"
    assert results[0] is not None and resolver._inflight == {}


# ---- a download cut off midway ----------------------------------------------------------------------


class _CutOff(Callback):
    """Raises once half of the file has arrived, as a dropped connection would."""

    def call(self, *args, **kwargs) -> None:
        if self.size and 0 < self.value < self.size and self.value >= self.size // 2:
            raise ConnectionResetError(f"connection reset after {self.value} of {self.size} bytes")


def test_a_download_cut_off_midway_leaves_nothing_and_the_retry_succeeds(bucket, tmp_path, local_adapter, monkeypatch) -> None:
    adapter = local_adapter()
    assert (adapter / "adapter_model.safetensors").stat().st_size > 2 * 2**16  # several reads: a cut can fall midway
    bucket.upload_dir(adapter, "loras/sql")
    resolver = make_resolver(bucket, tmp_path)
    real_get_file = s3fs.S3FileSystem._get_file
    partial: list[int] = []

    async def faulty_get_file(self, rpath, lpath, **kwargs):
        if rpath.endswith("adapter_model.safetensors") and not partial:  # the second object, the first time
            try:
                return await real_get_file(self, rpath, lpath, **{**kwargs, "callback": _CutOff()})
            finally:
                partial.append(os.path.getsize(lpath))
        return await real_get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", faulty_get_file)
    with pytest.raises(ConnectionResetError):
        resolve(resolver, "sql")
    assert 0 < partial[0] < (adapter / "adapter_model.safetensors").stat().st_size  # it really was cut midway
    assert cache_listing(resolver) == []  # no entry, no temporary directory
    request = resolve(resolver, "sql")
    assert request is not None and resolver.downloads == 1
    weights = "adapter_model.safetensors"
    assert (Path(request.lora_path) / weights).read_bytes() == (adapter / weights).read_bytes()


def test_a_size_mismatch_is_not_cached(bucket, tmp_path: Path, local_adapter, monkeypatch) -> None:
    bucket.upload_dir(local_adapter(), "loras/sql")
    resolver = make_resolver(bucket, tmp_path)
    real_get_file = s3fs.S3FileSystem._get_file

    async def truncating_get_file(self, rpath, lpath, **kwargs):
        result = await real_get_file(self, rpath, lpath, **kwargs)
        if rpath.endswith("adapter_model.safetensors"):
            os.truncate(lpath, 100)  # the object changed between listing and download, say
        return result

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", truncating_get_file)
    with pytest.raises(OSError, match="S3 listed"):
        resolve(resolver, "sql")
    assert cache_listing(resolver) == []


# ---- limits, misses and refusals ----------------------------------------------------------------------


def test_the_size_limit_refuses_before_downloading(bucket, tmp_path: Path, local_adapter, monkeypatch) -> None:
    adapter = local_adapter()
    bucket.upload_dir(adapter, "loras/sql")
    total = sum((adapter / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors"))

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    small = make_resolver(bucket, tmp_path, max_bytes=total - 1)
    monkeypatch.setattr(small.filesystem(), "get_file", no_download)
    with pytest.raises(InvalidLoRAAdapterError, match=f"{total} bytes, over the limit of {total - 1}"):
        resolve(small, "sql")
    assert cache_listing(small) == []
    assert resolve(make_resolver(bucket, tmp_path / "other", max_bytes=total), "sql") is not None


def test_a_missing_adapter_is_none_quietly(bucket, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, LOGGER):
        assert resolve(make_resolver(bucket, tmp_path), "nope") is None
    assert not caplog.records


def test_a_missing_bucket_is_none(bucket, tmp_path: Path) -> None:
    assert resolve(make_resolver(bucket, tmp_path, "s3://no-such-bucket/loras"), "sql") is None


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter weights"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "cannot be read"),
        (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "IA3"}'), "'IA3'"),
    ],
    ids=["no-config", "no-weights", "bad-json", "not-lora"],
)
def test_what_is_not_a_lora_adapter_is_refused(bucket, tmp_path, local_adapter, caplog, mutate, words: str) -> None:
    bucket.upload_dir(local_adapter(mutate), "loras/sql")
    resolver = make_resolver(bucket, tmp_path)
    with caplog.at_level(logging.INFO, LOGGER):
        assert resolve(resolver, "sql") is None
    assert words in caplog.text
    assert [n for n in cache_listing(resolver) if not n.startswith(".")] == []
    assert [n for n in cache_listing(resolver) if ".tmp-" in n] == []


def test_another_base_models_adapter_is_refused(bucket, tmp_path, local_adapter, caplog) -> None:
    def retarget(local: Path) -> None:
        config = json.loads((local / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
        (local / "adapter_config.json").write_text(json.dumps(config))

    bucket.upload_dir(local_adapter(retarget), "loras/sql")
    with caplog.at_level(logging.WARNING, LOGGER):
        assert resolve(make_resolver(bucket, tmp_path), "sql") is None
    assert "trained for base model 'meta-llama/Llama-3.2-1B'" in caplog.text


@pytest.mark.parametrize("name", ["../sql", "/sql", "a/../sql", "", "a//b", "a\\b", ".", "sql/"])
def test_names_that_leave_the_prefix_are_refused(bucket, tmp_path, local_adapter, caplog, name: str) -> None:
    bucket.upload_dir(local_adapter(), "sql")
    bucket.upload_dir(local_adapter(), "loras/sql")
    with caplog.at_level(logging.WARNING, LOGGER):
        assert resolve(make_resolver(bucket, tmp_path), name) is None
    assert "refusing" in caplog.text


def test_an_unusable_base_model_name_in_the_template(bucket, tmp_path, caplog) -> None:
    resolver = make_resolver(bucket, tmp_path, f"s3://{bucket.name}/loras/{{base_model_name}}/{{lora_name}}")
    with caplog.at_level(logging.WARNING, LOGGER):
        assert resolve(resolver, "sql", base="..") is None
    assert "base_model_name" in caplog.text


# ---- configuration and the opt-in plugin ------------------------------------------------------------


def _register(monkeypatch, **env: str | None) -> _LoRAResolverRegistry:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    registry = _LoRAResolverRegistry()
    s3_plugin.register_lora_resolvers(registry)
    return registry


def test_plugin_is_opt_in(monkeypatch, caplog) -> None:
    for selection in (None, "", "lora_filesystem_resolver"):
        with caplog.at_level(logging.INFO, LOGGER):
            registry = _register(monkeypatch, VLLM_PLUGINS=selection, LORAPLEX_S3_LORA_URI="s3://b/loras")
        assert registry.get_supported_resolvers() == []
        assert "opt-in" in caplog.text


def test_plugin_registers_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    registry = _register(
        monkeypatch, VLLM_PLUGINS="lora_s3_resolver", LORAPLEX_S3_LORA_URI="s3://b/loras/{base_model_name}",
        LORAPLEX_S3_LORA_CACHE_DIR=str(tmp_path / "c"), LORAPLEX_S3_LORA_MAX_BYTES="1000000",
        AWS_ENDPOINT_URL="http://127.0.0.1:1", AWS_ENDPOINT_URL_S3="http://127.0.0.1:2",
    )
    resolver = registry.get_resolver(RESOLVER_NAME)
    assert isinstance(resolver, S3Resolver)
    assert resolver.template.template == "s3://b/loras/{base_model_name}/{lora_name}"
    assert resolver.cache.root == tmp_path / "c" and resolver.max_bytes == 1_000_000
    assert resolver.endpoint_url == "http://127.0.0.1:2"  # the S3-specific variable wins


def test_plugin_defaults(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    registry = _register(monkeypatch, VLLM_PLUGINS="lora_s3_resolver", LORAPLEX_S3_LORA_URI="s3://b/loras",
                         LORAPLEX_S3_LORA_CACHE_DIR=None, LORAPLEX_S3_LORA_MAX_BYTES=None)
    resolver = registry.get_resolver(RESOLVER_NAME)
    assert resolver.cache.root == tmp_path / "s3-loras" and resolver.max_bytes is None and resolver.endpoint_url is None


@pytest.mark.parametrize(
    ("env", "message"),
    [({"LORAPLEX_S3_LORA_URI": None}, "LORAPLEX_S3_LORA_URI is not set"),
     ({"LORAPLEX_S3_LORA_URI": "https://b/x"}, "must start with s3://"),
     ({"LORAPLEX_S3_LORA_URI": "s3://b/x", "LORAPLEX_S3_LORA_MAX_BYTES": "1GB"}, "LORAPLEX_S3_LORA_MAX_BYTES")],
)
def test_plugin_named_but_misconfigured_fails_with_the_fix(monkeypatch, env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _register(monkeypatch, VLLM_PLUGINS="lora_s3_resolver", **env)


def test_the_installed_plugin_end_to_end(bucket, tmp_path: Path, local_adapter) -> None:
    """In a fresh process, as a server would: VLLM_PLUGINS opts in, the endpoint and credentials
    come from the standard AWS variables."""
    bucket.upload_dir(local_adapter(), f"loras/{BASE}/sql")
    code = textwrap.dedent(
        f"""
        import asyncio
        from loraplex.plugins import load_plugins
        from loraplex.resolver import LoRAResolverRegistry
        status = {{s.name: s for s in load_plugins(strict=True)}}["{RESOLVER_NAME}"]
        assert status.loaded and status.package == "loraplex-resolver-s3", status
        resolver = LoRAResolverRegistry.get_resolver("{RESOLVER_NAME}")
        print(asyncio.run(resolver.resolve_lora("/models/{BASE}", "sql")).lora_path)
        """
    )
    env = {**os.environ, "VLLM_PLUGINS": RESOLVER_NAME, "AWS_ENDPOINT_URL_S3": bucket.endpoint_url,
           "LORAPLEX_S3_LORA_URI": f"s3://{bucket.name}/loras/{{base_model_name}}/{{lora_name}}",
           "LORAPLEX_S3_LORA_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.parent == tmp_path / "cache" and (path / "adapter_model.safetensors").is_file()
