"""Reading and vetting a PEFT adapter's adapter_config.json.

Every field loraplex reads is checked for its type and range here, so a hand-edited or hostile
config is refused with a message naming the field, never with a raw Python error: the file's
size is capped (MAX_CONFIG_BYTES) before it is parsed, the regular expressions of
`rank_pattern`, `alpha_pattern` and `target_modules` are compiled here, and module names are
matched against the pattern keys under a time budget (with Python's `re`, a key such as
`(.|[^0-9])*[0-9]` backtracks for hours on one module name).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import regex

from ..errors import InvalidLoRAAdapterError, LoRAAdapterNotFoundError
from .fingerprint import FileStamp, read_stamped

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20  # PEFT writes a few KiB; a bigger file is not a LoRA config
MAX_PATTERN_KEYS = 1024  # per pattern field; PEFT writes at most one key per adapted module
# the time all pattern matching of one adapter may take: 1 s, plus 20 µs for each (module, key)
# pair (~3 µs each measured; a hostile key is refused within ~1 s plus 20 ms per 1000 pairs)
PATTERN_SECONDS = 1.0
PATTERN_SECONDS_PER_MATCH = 20e-6


def read_config_json(file: Path) -> tuple[dict[str, Any], FileStamp]:
    """The JSON object in an adapter_config.json and the stamp of the bytes parsed.

    Raises FileNotFoundError if there is no such file, ValueError naming the reason if it is not
    a readable JSON object of at most MAX_CONFIG_BYTES bytes.
    """
    try:
        if not file.is_file():
            raise FileNotFoundError(str(file))
        data, stamp = read_stamped(file, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise
    except OSError as exc:  # unreadable, a name too long for the filesystem, ...
        raise ValueError(f"it cannot be read ({type(exc).__name__}: {exc})") from exc
    if stamp.size > MAX_CONFIG_BYTES or len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"it is {max(stamp.size, len(data))} bytes, more than the {MAX_CONFIG_BYTES} bytes a LoRA config may have")
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"it is not UTF-8 text ({exc})") from exc
    except RecursionError as exc:
        raise ValueError("it is not valid JSON (nested too deeply)") from exc
    except ValueError as exc:  # JSONDecodeError, and integers of more digits than Python converts
        raise ValueError(f"it is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError("it must hold a JSON object")
    return raw, stamp


def read_adapter_config(path: Path, name: str) -> tuple[dict[str, Any], FileStamp]:
    """`read_config_json` of adapter directory `path`, its failures as loraplex errors naming adapter `name`."""
    file = path / CONFIG_FILE
    try:
        return read_config_json(file)
    except FileNotFoundError as exc:
        raise LoRAAdapterNotFoundError(
            f"LoRA adapter {name!r}: {str(file)!r} does not exist; the adapter path must be a PEFT "
            "adapter directory (adapter_config.json + adapter_model.safetensors)"
        ) from exc
    except ValueError as exc:
        raise InvalidLoRAAdapterError(
            f"LoRA adapter {name!r}: {str(file)!r}: {exc}; re-save the adapter with PEFT's save_pretrained"
        ) from exc


class _Patterns:
    """PEFT's per-module overrides: the first key whose regex matches a suffix of the module name wins."""

    def __init__(self, field_name: str, raw: object, check_value: Callable[[str, object], Any]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"{field_name} must be an object mapping module-name patterns to values; got {shown(raw)}")
        if len(raw) > MAX_PATTERN_KEYS:
            raise ValueError(f"{field_name} has {len(raw)} keys, more than the {MAX_PATTERN_KEYS} allowed")
        self.field_name = field_name
        self.entries: list[tuple[str, regex.Pattern, Any]] = []
        for key, value in raw.items():
            # PEFT's own test (peft.utils.other.get_pattern_key); `re` decides what PEFT accepts
            expression = rf"(.*\.)?({key})$"
            try:
                re.compile(expression)
                compiled = regex.compile(expression)
            except (re.error, regex.error, RecursionError, OverflowError) as exc:
                raise ValueError(f"{field_name} key {shown(key)} is not a valid regular expression ({exc})") from exc
            self.entries.append((key, compiled, check_value(f"{field_name}[{shown(key)}]", value)))

    def lookup(self, module_name: str, default: Any, deadline: float) -> Any:
        """The value of the first key matching `module_name`; TimeoutError naming the key past `deadline`."""
        for key, compiled, value in self.entries:
            try:
                matched = compiled.match(module_name, timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError as exc:
                raise TimeoutError(f"{self.field_name} keys (key {shown(key)} backtracks)") from exc
            if matched:
                return value
        return default


PEFT_DEFAULT_R = 8  # peft.LoraConfig().r
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig().lora_alpha


@dataclass
class AdapterConfig:
    """The parts of a PEFT LoRA config that decide how its weights are applied."""

    name: str
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: _Patterns
    alpha_pattern: _Patterns
    base_model_name_or_path: str | None

    @classmethod
    def from_json(cls, raw: dict[str, Any], name: str) -> "AdapterConfig":
        """Check every field loraplex reads; InvalidLoRAAdapterError naming the field otherwise."""
        _refuse_unsupported(raw, name)
        try:
            # a field PEFT's save_pretrained left out takes PEFT's LoraConfig default (r=8, lora_alpha=8)
            r = _rank("r", raw.get("r", PEFT_DEFAULT_R))
            alpha = _number("lora_alpha", raw.get("lora_alpha", PEFT_DEFAULT_ALPHA))
            use_rslora = raw.get("use_rslora", False)
            if not isinstance(use_rslora, bool) and use_rslora is not None:
                raise ValueError(f"use_rslora must be true or false; got {shown(use_rslora)}")
            base = raw.get("base_model_name_or_path")
            if base is not None and not isinstance(base, str):
                raise ValueError(f"base_model_name_or_path must be a string; got {shown(base)}")
            _check_target_modules(raw.get("target_modules"))
            return cls(
                name=name, r=r, lora_alpha=alpha, use_rslora=bool(use_rslora),
                rank_pattern=_Patterns("rank_pattern", raw.get("rank_pattern"), _rank),
                alpha_pattern=_Patterns("alpha_pattern", raw.get("alpha_pattern"), _number),
                base_model_name_or_path=base or None,
            )
        except ValueError as exc:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {name!r}: adapter_config.json is malformed: {exc}; re-save the adapter with PEFT's save_pretrained"
            ) from exc

    def ranks_and_alphas(self, module_names: list[str]) -> dict[str, tuple[int, float]]:
        """PEFT's rank and alpha of each module (full name such as `model.layers.0.self_attn.q_proj`)."""
        pairs = len(module_names) * (len(self.rank_pattern.entries) + len(self.alpha_pattern.entries))
        budget = PATTERN_SECONDS + PATTERN_SECONDS_PER_MATCH * pairs
        deadline = time.monotonic() + budget
        result = {}
        try:
            for module_name in module_names:
                result[module_name] = (self.rank_pattern.lookup(module_name, self.r, deadline),
                                       self.alpha_pattern.lookup(module_name, self.lora_alpha, deadline))
        except TimeoutError as exc:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {self.name!r}: adapter_config.json: matching its {exc} against the module names takes "
                f"longer than {budget:.1f} s; simplify the patterns"
            ) from exc
        return result

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _rank(field_name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field_name} must be a positive integer (a LoRA rank); got {shown(value)}")
    return value


def _number(field_name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field_name} must be a number; got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{field_name} must be a finite number; got {shown(value)}")
    return number


def _check_target_modules(value: object) -> None:
    """PEFT takes a list of module names or one regular expression (matched in full)."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as exc:
            raise ValueError(f"target_modules {shown(value)} is not a valid regular expression ({exc})") from exc
    elif not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"target_modules must be a list of module names or a regular expression; got {shown(value)}")


def shown(value: object, limit: int = 80) -> str:
    """A value for an error message, shortened: a hostile config or path may be megabytes long."""
    try:
        text = repr(value)
    except RecursionError:  # JSON nested almost as deep as the parser allows
        return "a deeply nested value"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _refuse_unsupported(raw: dict, name: str) -> None:
    """Refuse what loraplex cannot apply exactly, rather than serving something subtly wrong."""
    def refuse(reason: str, fix: str) -> None:
        raise InvalidLoRAAdapterError(f"LoRA adapter {name!r}: {reason}; {fix}")

    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        refuse(f"peft_type is {shown(peft_type)}, only LORA adapters are served", "convert or retrain it as a LoRA adapter")
    if raw.get("use_dora"):
        refuse("it is a DoRA adapter (use_dora=true), which is not supported", "retrain without DoRA or merge it into the base model")
    if raw.get("bias", "none") not in ("none", None):
        refuse(f"it trains biases (bias={shown(raw.get('bias'))}), which is not supported", "retrain with bias='none'")
    if raw.get("lora_bias"):
        refuse("it has LoRA biases (lora_bias=true), which are not supported", "retrain with lora_bias=False")
    if raw.get("modules_to_save"):
        refuse(
            f"it replaces whole modules (modules_to_save={shown(raw['modules_to_save'])}), which cannot be shared across a batch",
            "retrain without modules_to_save or merge the adapter into a separate model",
        )
    if raw.get("fan_in_fan_out"):
        refuse("fan_in_fan_out=true is for Conv1D models, not this model's linears", "re-save it for a Llama-family model")
    if raw.get("alora_invocation_tokens"):
        refuse(
            "it is an activated LoRA (alora_invocation_tokens), which applies only after its invocation tokens; "
            "that is not supported",
            "retrain it as a plain LoRA adapter",
        )
    for unsupported in ("layer_replication", "trainable_token_indices", "arrow_config", "use_bdlora"):
        if raw.get(unsupported):
            refuse(f"it uses {unsupported}, which is not supported", f"retrain without {unsupported}")
