"""docs/writing-a-resolver.md, run as an author would: each example package is written from the
guide's code blocks exactly as shown, pip-installed (offline) into a temporary directory, and its
own tests run in a subprocess; so is the package `loraplex new-resolver` lays out."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-resolver.md"
# "`path/in/the/package`:" (and the rest of its paragraph), then a fenced block: one file of the package
_FILE_BLOCK = re.compile(r"^`([\w./-]+)`:[^\n]*(?:\n[^\n]+)*\n\n```[a-z]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def guide_section(title: str) -> str:
    text = GUIDE.read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def guide_package(title: str, root: Path) -> Path:
    """The package a guide section shows, written under `root` file by file."""
    files = dict(_FILE_BLOCK.findall(guide_section(title)))
    assert "pyproject.toml" in files and any(path.startswith("tests/") for path in files), sorted(files)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def install(package: Path, site: Path) -> None:
    """pip install the package into `site`, offline (this environment's setuptools builds it)."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--disable-pip-version-check",
               "--target", str(site), str(package)]
    if importlib.util.find_spec("setuptools") is not None:
        command.insert(4, "--no-build-isolation")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def run_in(site: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "LORAPLEX_PLUGINS_STRICT")}
    environment["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    environment.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=environment, timeout=900)


def author_workflow(package: Path, site: Path, entry_point: str, **env: str) -> str:
    """Install, run the package's tests, and check `loraplex plugins --strict` lists its resolver; pytest's summary."""
    install(package, site)
    tests = run_in(site, package, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests")
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-3000:]
    plugins = run_in(site, package, "-m", "loraplex.cli", "plugins", "--json", "--strict", VLLM_PLUGINS=entry_point, **env)
    assert plugins.returncode == 0, plugins.stdout + plugins.stderr
    status = next(p for p in json.loads(plugins.stdout)["plugins"] if p["name"] == entry_point)
    assert (status["loaded"], status["resolvers_registered"]) == (True, [entry_point]), status
    return tests.stdout.strip().splitlines()[-1]


def test_the_resolver_in_under_sixty_lines_is_complete_and_passes_the_suite(tmp_path) -> None:
    package = guide_package("A resolver in under 60 lines", tmp_path / "loraplex-resolver-http-dir")
    module = package / "src" / "loraplex_resolver_http_dir" / "__init__.py"
    assert len(module.read_text().splitlines()) < 60  # the resolver and its plugin hook, whole
    summary = author_workflow(package, tmp_path / "site", "lora_http_dir_resolver", LORA_HTTP_DIR_URL="http://127.0.0.1:9")
    assert summary.startswith("9 passed, 1 skipped"), summary  # the opt-in event-loop check is skipped


def test_the_zip_example_is_complete_and_passes_the_suite(tmp_path) -> None:
    package = guide_package("A complete example", tmp_path / "loraplex-resolver-zip")
    summary = author_workflow(package, tmp_path / "site", "lora_zip_resolver", LORA_ZIP_ARCHIVE_DIR=str(tmp_path))
    assert "failed" not in summary and "passed" in summary, summary


def test_the_zip_example_unpacks_an_archive_whose_files_sit_under_one_folder(tmp_path, lora_adapter_dir) -> None:
    """The layout the guide states: files at the top, or in one top-level folder (`zip -r x.zip folder/`)."""
    import asyncio
    import shutil
    import types

    source = dict(_FILE_BLOCK.findall(guide_section("A complete example")))["src/loraplex_resolver_zip/resolver.py"]
    module = types.ModuleType("guide_zip_resolver")
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, str(GUIDE), "exec"), module.__dict__)
        shutil.copytree(lora_adapter_dir, tmp_path / "staging" / "my-adapter")
        shutil.make_archive(str(tmp_path / "archives" / "nested"), "zip", tmp_path / "staging", "my-adapter")
        resolver = module.ZipResolver(tmp_path / "archives", tmp_path / "cache")
        found = asyncio.run(resolver.resolve_lora("base", "nested"))
        assert (Path(found.lora_path) / "adapter_config.json").is_file()
        (tmp_path / "archives" / "bad.zip").write_bytes((tmp_path / "archives" / "nested.zip").read_bytes()[:-200])
        with pytest.raises(Exception):  # noqa: B017 - a truncated zip: zipfile's own error, before any cache entry
            asyncio.run(resolver.resolve_lora("base", "bad"))
        assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir()) == ["nested"]
    finally:
        del sys.modules[module.__name__]


def test_loraplex_new_resolver_lays_out_a_package_whose_tests_pass(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "loraplex.cli", "new-resolver", "model-store", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    package = tmp_path / "loraplex-resolver-model-store"
    assert f"created {package}" in result.stdout
    summary = author_workflow(package, tmp_path / "site", "lora_model_store_resolver", LORA_MODEL_STORE_DIR=str(tmp_path))
    assert "failed" not in summary and "passed" in summary, summary
    again = subprocess.run([sys.executable, "-m", "loraplex.cli", "new-resolver", "model-store", "--dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
