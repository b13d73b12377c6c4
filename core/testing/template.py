"""`loraplex new-resolver NAME`: a resolver package laid out as the guide shows, whose conformance
tests pass as generated (a local-folder resolver to start from: replace `_find` with your source).

    loraplex-resolver-NAME/
    ├── pyproject.toml            the entry point lora_NAME_resolver, extras test = loraplex[testing]
    ├── README.md
    ├── src/loraplex_resolver_NAME/__init__.py
    ├── src/loraplex_resolver_NAME/resolver.py
    ├── src/loraplex_resolver_NAME/plugin.py
    └── tests/test_conformance.py
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError

__all__ = ["write_resolver_package"]

_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


def write_resolver_package(name: str, parent: str | Path = ".") -> Path:
    """Write the package for resolver `name` (e.g. "artifacts") into `parent`; its folder."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"resolver name {name!r} is not usable: use lower-case letters, digits and single '-' or '_' "
                          "between them, starting with a letter (e.g. 'artifacts' or 'model-store')")
    snake = name.replace("-", "_")
    values = {
        "name": name,
        "module": f"loraplex_resolver_{snake}",
        "entry_point": f"lora_{snake}_resolver",
        "cls": "".join(part.capitalize() for part in snake.split("_")) + "Resolver",
        "env": f"LORA_{snake.upper()}_DIR",
    }
    root = Path(parent) / f"loraplex-resolver-{name}"
    if root.exists():
        raise ConfigError(f"{str(root)!r} already exists; choose another --dir or name, or remove it")
    for path, text in _FILES.items():
        target = root / path.format(**values)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text.format(**values).lstrip("\n"), encoding="utf-8")
    return root


# the files, as str.format templates ({{ }} are literal braces)
_FILES = {
    "pyproject.toml": '''
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "loraplex-resolver-{name}"
version = "0.1.0"
dependencies = ["loraplex"]

[project.optional-dependencies]
test = ["loraplex[testing]"]

[project.entry-points."loraplex.plugins"]
{entry_point} = "{module}.plugin"
''',
    "README.md": '''
# loraplex-resolver-{name}

A loraplex LoRA resolver: `{cls}` serves `${env}/<lora_name>/` (a PEFT adapter folder).
Replace `{cls}._find` with your source's lookup, keeping its rules (see loraplex's
docs/writing-a-resolver.md).

```bash
pip install -e '.[test]' && pytest           # the conformance suite passes as generated
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True {env}=/srv/loras
loraplex plugins --strict                    # {entry_point} ... loaded
loraplex serve --enable-lora
```
''',
    "src/{module}/__init__.py": '''
"""loraplex LoRA resolver `{entry_point}`."""

from .resolver import {cls}

__all__ = ["{cls}"]
''',
    "src/{module}/resolver.py": '''
"""`{cls}`: finds LoRA adapters by name. Start here: replace `_find` with your source's lookup."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from loraplex.lora.request import LoRARequest
from loraplex.lora.resolver import LoRAResolver

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # one path component: no "/", no ".."


class {cls}(LoRAResolver):
    """Serves `<root>/<lora_name>/`, a PEFT adapter folder.

    For a remote source, make `_find` download into a temporary folder beside your cache, check
    it cheaply (adapter_config.json parses, the weights are there), then rename it into place:
    never a broken or half-written copy under the adapter's name.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if not _NAME.match(lora_name) or lora_name.endswith("."):
            return None  # a name that could leave the source is not ours
        path = await asyncio.to_thread(self._find, lora_name)  # blocking I/O off the event loop
        if path is None:
            return None
        return LoRARequest(lora_name=lora_name, lora_path=str(path), lora_int_id=abs(hash(lora_name)) or 1)

    def _find(self, lora_name: str) -> Path | None:
        path = self.root / lora_name
        return path if (path / "adapter_config.json").is_file() else None
''',
    "src/{module}/plugin.py": '''
"""The plugin: entry point `{entry_point}` in the group `loraplex.plugins`."""

import logging
import os

from loraplex.plugins import hookimpl

from .resolver import {cls}

logger = logging.getLogger(__name__)


@hookimpl
def register_lora_resolvers(registry):
    root = os.environ.get("{env}")
    if not root:
        logger.info("{env} is not set: {entry_point} is not registered")
        return
    registry.register_resolver("{entry_point}", {cls}(root))
''',
    "tests/test_conformance.py": '''
"""loraplex's resolver conformance suite, run against `{cls}`."""

import shutil

import pytest

from loraplex.testing import ResolverConformance
from {module} import {cls}


class Test{cls}(ResolverConformance):
    @pytest.fixture
    def resolver(self, tmp_path, lora_adapter_dir):
        shutil.copytree(lora_adapter_dir, tmp_path / "source" / "my-adapter")
        return {cls}(tmp_path / "source")

    @pytest.fixture
    def publish_adapter(self, tmp_path):
        def publish(lora_name, adapter_dir):
            shutil.rmtree(tmp_path / "source" / lora_name, ignore_errors=True)
            shutil.copytree(adapter_dir, tmp_path / "source" / lora_name)

        return publish

    @pytest.fixture
    def base_model_name(self, base_model_path):
        return str(base_model_path)

    @pytest.fixture
    def known_lora_name(self):
        return "my-adapter"
''',
}
