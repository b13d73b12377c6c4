"""Checks resolvers share: a safe adapter name, a PEFT LoRA adapter directory for the served model."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .peft_config import CONFIG_FILE, read_config_json, shown

__all__ = ["WEIGHT_FILES", "adapter_problem", "name_parts", "name_problem", "short_model_name", "stable_lora_id"]

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_NAME = 1024
_MAX_PART = 255


def name_problem(lora_name: object) -> str | None:
    """Why `lora_name` cannot name a directory under the resolver's root, or None if it can.

    Allowed: one or more `/`-separated components, each a plain file name. Refused: empty
    names, absolute paths, `.` / `..` / empty components, backslashes, control characters,
    surrounding whitespace, over-long names.
    """
    if not isinstance(lora_name, str) or not lora_name:
        return "it is empty or not a string"
    if len(lora_name) > _MAX_NAME:
        return f"it is longer than {_MAX_NAME} characters"
    if lora_name != lora_name.strip():
        return "it starts or ends with whitespace"
    if lora_name.startswith("/"):
        return "it is an absolute path"
    if "\\" in lora_name:
        return "it contains a backslash"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in lora_name):
        return "it contains a control character"
    for part in lora_name.split("/"):
        if part in (".", ".."):
            return f"it has a {part!r} path component"
        if not part:
            return "it has an empty path component"
        if len(part) > _MAX_PART:
            return f"a path component is longer than {_MAX_PART} characters"
    return None


def name_parts(lora_name: str) -> list[str]:
    """The path components of a name that `name_problem` accepted."""
    return lora_name.split("/")


def short_model_name(model_name: str) -> str:
    """A model's last path component, lower-cased: `Org/Model-1B` and `/models/model-1b` match."""
    return model_name.rstrip("/").rsplit("/", 1)[-1].lower()


def stable_lora_id(lora_name: str) -> int:
    """A positive id derived from the name, the same in every process (unlike `hash()`)."""
    return int.from_bytes(hashlib.sha256(lora_name.encode()).digest()[:4], "big") % (2**31 - 1) + 1


def adapter_problem(path: Path, base_model_name: str, root: Path) -> str | None:
    """Why directory `path` is not a PEFT LoRA adapter for `base_model_name`, or None if it is.

    `root` is the resolved resolver root: the config and weight files must resolve inside it
    too (a symlinked file pointing elsewhere is refused). The config is read as the loader reads
    it (size cap, JSON checks: see peft_config); the full check happens when it is loaded.
    """
    config_file = path / CONFIG_FILE
    try:
        if not config_file.is_file():
            return "it has no adapter_config.json"
        weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not weights:
            return f"it has no adapter weights ({' or '.join(WEIGHT_FILES)})"
        for file in (config_file, *weights):
            if not file.resolve().is_relative_to(root):
                return f"{file.name} is a link to {str(file.resolve())!r}, outside {str(root)!r}"
        config, _ = read_config_json(config_file)
    except FileNotFoundError:  # removed while we looked
        return "it has no adapter_config.json"
    except OSError as exc:  # e.g. a name too long for the filesystem, a directory we may not list
        return f"its files cannot be examined ({exc.strerror or exc})"
    except ValueError as exc:
        return f"adapter_config.json cannot be read ({exc})"
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        return f"its peft_type is {shown(peft_type)}, not 'LORA'"
    trained_for = config.get("base_model_name_or_path")
    if not isinstance(trained_for, (str, type(None))):
        return f"its base_model_name_or_path is {shown(trained_for)}, not a model name"
    if trained_for and base_model_name and short_model_name(trained_for) != short_model_name(base_model_name):
        return f"it was trained for base model {shown(trained_for)}, not the served {base_model_name!r}"
    return None
