"""HttpArchiveResolver against an HTTP server on loopback, plus loraplex's conformance suite."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from archive_server import ArchiveServer, dir_members, tar_gz

from loraplex.resolver import _LoRAResolverRegistry
from loraplex.testing import ResolverConformance
from loraplex_resolver_http_archive import RESOLVER_NAME, ArchiveResolverConfig, HttpArchiveResolver
from loraplex_resolver_http_archive import plugin

BASE = "tiny-base"
LOGGER = "loraplex_resolver_http_archive"


def make_resolver(server: ArchiveServer, tmp_path: Path, **kwargs) -> HttpArchiveResolver:
    return HttpArchiveResolver(ArchiveResolverConfig(f"{server.url}/loras", tmp_path / "cache", **kwargs))


def resolve(resolver: HttpArchiveResolver, name: str, base: str = BASE):
    return asyncio.run(resolver.resolve_lora(base, name))


def cache_names(tmp_path: Path) -> list[str]:
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


class TestHttpArchiveConformance(ResolverConformance):
    """The resolver contract every loraplex resolver should meet (from loraplex.testing)."""

    serves_replaced_adapters = False  # a cached adapter is served until its cache entry is deleted (README)

    @pytest.fixture
    def publish_adapter(self, server: ArchiveServer):
        def publish(lora_name: str, adapter_dir: Path) -> None:
            server.files[f"/loras/{lora_name}.tar.gz"] = tar_gz(dir_members(adapter_dir))

        return publish

    @pytest.fixture
    def resolver(self, server: ArchiveServer, tmp_path: Path, lora_adapter_dir: Path) -> HttpArchiveResolver:
        server.files["/loras/known.tar.gz"] = tar_gz(dir_members(lora_adapter_dir))
        server.files["/x.tar.gz"] = server.files["/loras/known.tar.gz"]  # where "../x" would land
        return make_resolver(server, tmp_path)

    @pytest.fixture
    def base_model_name(self, base_model_path: Path) -> str:
        return str(base_model_path)

    @pytest.fixture
    def known_lora_name(self) -> str:
        return "known"


def test_an_archive_with_the_files_at_its_top(server, tmp_path: Path, adapter_dir: Path) -> None:
    server.files["/loras/sql.tar.gz"] = tar_gz(dir_members(adapter_dir))
    resolver = make_resolver(server, tmp_path)
    request = resolve(resolver, "sql")
    assert request is not None and request.lora_name == "sql"
    path = Path(request.lora_path)
    assert (path / "adapter_model.safetensors").read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert cache_names(tmp_path) == [path.name]  # nothing else left behind
    assert resolve(resolver, "sql").lora_path == request.lora_path
    assert server.requests == ["/loras/sql.tar.gz"]  # the second resolve came from the cache


def test_an_archive_with_one_top_level_folder(server, tmp_path: Path, adapter_dir: Path) -> None:
    server.files["/loras/team/sql.tar.gz"] = tar_gz(dir_members(adapter_dir, "sql-v3/"))
    assert resolve(make_resolver(server, tmp_path), "team/sql") is not None


def test_a_missing_archive_is_none(server, tmp_path: Path) -> None:
    assert resolve(make_resolver(server, tmp_path), "nope") is None
    assert cache_names(tmp_path) == []


def test_concurrent_resolves_download_once(server, tmp_path: Path, adapter_dir: Path) -> None:
    server.files["/loras/sql.tar.gz"] = tar_gz(dir_members(adapter_dir))
    resolver = make_resolver(server, tmp_path)

    async def many():
        return await asyncio.gather(*(resolver.resolve_lora(BASE, "sql") for _ in range(6)))

    assert len({r.lora_path for r in asyncio.run(many())}) == 1
    assert server.requests == ["/loras/sql.tar.gz"] and resolver.downloads == 1


def test_a_download_cut_off_leaves_nothing_and_the_retry_succeeds(server, tmp_path: Path, adapter_dir: Path) -> None:
    server.files["/loras/sql.tar.gz"] = tar_gz(dir_members(adapter_dir))
    server.cut_off_next.add("/loras/sql.tar.gz")
    resolver = make_resolver(server, tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - whatever the HTTP client raises for a short body
        resolve(resolver, "sql")
    assert cache_names(tmp_path) == []
    assert resolve(resolver, "sql") is not None


def test_an_archive_over_the_size_limit(server, tmp_path: Path, adapter_dir: Path) -> None:
    server.files["/loras/sql.tar.gz"] = tar_gz(dir_members(adapter_dir))
    with pytest.raises(ValueError, match="larger than 1000 bytes"):
        resolve(make_resolver(server, tmp_path, max_bytes=1000), "sql")
    assert cache_names(tmp_path) == []


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"../evil.txt": b"x"}, "'..' component"),
        ({"sub/../../evil.txt": b"x"}, "'..' component"),
        ({"/tmp/evil.txt": b"x"}, "absolute"),
        ({"link": _link("link", "/etc/passwd")}, "is a link"),
        ({"hard": _link("hard", "/etc/passwd", tarfile.LNKTYPE)}, "is a link"),
        ({"dev": _device("dev")}, "special file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device"],
)
def test_unsafe_archives_are_refused_whole(server, tmp_path, adapter_dir, caplog, extra: dict, reason: str) -> None:
    server.files["/loras/sql.tar.gz"] = tar_gz({**dir_members(adapter_dir), **extra})
    with caplog.at_level(logging.WARNING, LOGGER):
        assert resolve(make_resolver(server, tmp_path), "sql") is None
    assert reason in caplog.text
    assert cache_names(tmp_path) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_an_archive_that_is_not_an_adapter(server, tmp_path: Path, caplog) -> None:
    server.files["/loras/a.tar.gz"] = tar_gz({"README.md": b"hello"})
    server.files["/loras/b.tar.gz"] = tar_gz({"adapter_config.json": b'{"peft_type": "IA3"}', "adapter_model.bin": b"x"})
    server.files["/loras/c.tar.gz"] = b"this is not gzip"
    resolver = make_resolver(server, tmp_path)
    with caplog.at_level(logging.WARNING, LOGGER):
        assert resolve(resolver, "a") is None and resolve(resolver, "b") is None and resolve(resolver, "c") is None
    assert "no adapter_config.json" in caplog.text and "peft_type LORA" in caplog.text and "not a readable tar" in caplog.text
    assert cache_names(tmp_path) == []


def test_another_base_models_adapter_is_refused(server, tmp_path: Path, adapter_dir: Path, caplog) -> None:
    members = dir_members(adapter_dir)
    config = json.loads(members["adapter_config.json"])
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    server.files["/loras/sql.tar.gz"] = tar_gz({**members, "adapter_config.json": json.dumps(config).encode()})
    with caplog.at_level(logging.WARNING, LOGGER):
        assert resolve(make_resolver(server, tmp_path), "sql") is None
    assert "trained for base model 'meta-llama/Llama-3.2-1B'" in caplog.text


@pytest.mark.parametrize("name", ["../x", "/x", ".hidden", "a//b", "a/../b", "x?y", "", "a b"])
def test_odd_names_are_refused(server, tmp_path: Path, name: str) -> None:
    assert resolve(make_resolver(server, tmp_path), name) is None
    assert server.requests == []


def test_config_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORA_HTTP_ARCHIVE_URL", raising=False)
    assert ArchiveResolverConfig.from_env() is None
    monkeypatch.setenv("LORA_HTTP_ARCHIVE_URL", "https://host/a/{lora_name}.tgz")
    monkeypatch.setenv("LORA_HTTP_ARCHIVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_HTTP_ARCHIVE_MAX_BYTES", "12345")
    config = ArchiveResolverConfig.from_env()
    assert config.url_for("x") == "https://host/a/x.tgz" and config.cache_dir == tmp_path and config.max_bytes == 12345
    assert ArchiveResolverConfig("https://host/loras/", tmp_path).url_for("x") == "https://host/loras/x.tar.gz"
    with pytest.raises(ValueError, match="only placeholder"):
        ArchiveResolverConfig("https://host/{model}/{lora_name}", tmp_path)


def test_plugin_registers_only_when_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORA_HTTP_ARCHIVE_URL", raising=False)
    registry = _LoRAResolverRegistry()
    plugin.register_lora_resolvers(registry)
    assert registry.get_supported_resolvers() == []
    monkeypatch.setenv("LORA_HTTP_ARCHIVE_URL", "https://host/loras")
    plugin.register_lora_resolvers(registry)
    assert isinstance(registry.get_resolver(RESOLVER_NAME), HttpArchiveResolver)


def test_installed_plugin_in_a_fresh_process(server, tmp_path: Path, adapter_dir: Path) -> None:
    server.files["/loras/sql.tar.gz"] = tar_gz(dir_members(adapter_dir))
    code = textwrap.dedent(
        f"""
        import asyncio
        from loraplex.plugins import load_plugins
        from loraplex.resolver import LoRAResolverRegistry
        status = {{s.name: s for s in load_plugins(strict=True)}}["{RESOLVER_NAME}"]
        assert status.loaded and status.package == "loraplex-resolver-http-archive", status
        resolver = LoRAResolverRegistry.get_resolver("{RESOLVER_NAME}")
        print(asyncio.run(resolver.resolve_lora("{BASE}", "sql")).lora_path)
        """
    )
    env = {**os.environ, "VLLM_PLUGINS": RESOLVER_NAME, "LORA_HTTP_ARCHIVE_URL": f"{server.url}/loras",
           "LORA_HTTP_ARCHIVE_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == tmp_path / "cache"
