"""`--lora-modules` checked where the Ray Serve application is built.

A single server loads every --lora-modules adapter before it listens, so a bad entry stops the
start. On Ray Serve the AdapterRegistry keeps only names and paths and a replica reads an
adapter when a request first names it: without this check a typo would surface minutes later
as one request's 404, on one replica, while the deployment looks healthy. So the builder (run by
`serve run`, `serve deploy` and `loraplex serve --ray` alike) refuses an entry whose name cannot
reach an adapter or whose path holds no PEFT LoRA adapter, naming the entry. Weight shapes are
checked against the model when a replica loads it, as on one server.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, LoRAError
from ..lora.adapter_dir import WEIGHT_FILES
from ..lora.peft_config import AdapterConfig, read_adapter_config, shown


def check_lora_modules(modules: list[dict[str, str]], base_names: set[str]) -> None:
    """ConfigError naming the first entry of `modules` (parsed --lora-modules) that cannot be served;
    `base_names`: what requests name the base model by (an adapter of that name is unreachable)."""
    paths: dict[str, str] = {}
    for module in modules:
        name, path = module.get("name", ""), module.get("path", "")
        problem = _name_problem(name, base_names) or _duplicate_problem(name, path, paths) or _adapter_problem(name, path)
        if problem is not None:
            raise ConfigError(f"--lora-modules (lora_modules) entry {shown(f'{name}={path}', 200)} is refused: {problem}")
        paths[name] = path


def _name_problem(name: str, base_names: set[str]) -> str | None:
    if not name or name != name.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return ("its name is empty or has surrounding whitespace or control characters, which no request's `model` "
                "names; write NAME=PATH with a plain name")
    if name in base_names:
        return (f"its name {name!r} is the base model's, so requests for it would reach the base model; "
                "give the adapter another name")
    return None


def _duplicate_problem(name: str, path: str, paths: dict[str, str]) -> str | None:
    if name in paths and paths[name] != path:
        return (f"the name {name!r} is already given to {paths[name]!r}; give each adapter its own name "
                "(one name serves one adapter)")
    return None


def _adapter_problem(name: str, path: str) -> str | None:
    """Why directory `path` holds no PEFT LoRA adapter loraplex serves (its files and config), or None."""
    if not path:
        return "its path is empty; write NAME=PATH with the path of a PEFT adapter directory"
    directory = Path(path)
    try:
        if not directory.is_dir():
            return (f"{path!r} does not exist or is not a directory here, where the application is built; give the "
                    "path of a PEFT adapter directory that every node reads at the same path")
        if not any((directory / file).is_file() for file in WEIGHT_FILES):
            return f"{path!r} has no adapter weights ({' or '.join(WEIGHT_FILES)}); save the adapter with PEFT's save_pretrained"
        raw, _ = read_adapter_config(directory, name)
        AdapterConfig.from_json(raw, name)
    except LoRAError as exc:
        return str(exc)
    except OSError as exc:  # e.g. a directory we may not list
        return f"{path!r} cannot be read ({exc.strerror or exc}); make it readable by the Ray workers"
    return None
