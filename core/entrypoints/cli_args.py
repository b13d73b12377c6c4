"""The flags of `loraplex serve` and `loraplex generate` (vLLM's names).

Every EngineArgs field is a flag, `--field-name`, its type and default read from the dataclass,
so defaults live in EngineArgs alone; ENGINE_FLAGS only groups and explains them (a new field
shows up under "Engine" until it gets a line there). The server's own flags follow.

This module stays light (torch loads only when the engine flags are built), so `loraplex plugins`
starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import TYPE_CHECKING, Any

from ..ray.options import add_ray_arguments

if TYPE_CHECKING:
    from ..config import EngineArgs

MODEL, BATCHING, LORA, SERVER = "Model", "Batching and memory", "LoRA adapters", "Server"
MULTIMODAL = "Multi-modal (vision-language models)"
VLLM = "Accepted for vLLM compatibility (see docs/vllm-compatibility.md)"

# EngineArgs field -> (group, help); the default is appended from the field itself
ENGINE_FLAGS: dict[str, tuple[str, str]] = {
    "tokenizer": (MODEL, "tokenizer directory or Hub repo id (default: the model's)"),
    "served_model_name": (MODEL, "the name clients put in `model` (default: MODEL as given, or the embedded model's name)"),
    "dtype": (MODEL, "dtype of weights and activations: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16"),
    "device": (MODEL, "auto (a CUDA GPU when there is one), cpu, cuda or cuda:N"),
    "seed": (MODEL, "the engine's sampling seed (requests may set their own `seed`)"),
    "max_model_len": (BATCHING, "the longest sequence, prompt and reply, in tokens (default: the model's limit)"),
    "max_num_seqs": (BATCHING, "the most sequences in one batch"),
    "max_num_batched_tokens": (BATCHING, "the most tokens one step processes: decodes, then prefill chunks "
                                         "(default: with chunked prefill 512 on CPU, 2048 on GPU; without, max(max-model-len, 2048))"),
    "block_size": (BATCHING, "tokens per KV cache block"),
    "kv_cache_memory_bytes": (BATCHING, "KV cache size in bytes (default: VLLM_CPU_KVCACHE_SPACE GiB on CPU, "
                                        "--gpu-memory-utilization of a GPU)"),
    "gpu_memory_utilization": (BATCHING, "the fraction of GPU memory the engine may take"),
    "enable_prefix_caching": (BATCHING, "share the KV cache of common prompt prefixes between requests of the same "
                                        "model or adapter version (--no-enable-prefix-caching: off)"),
    "enable_chunked_prefill": (BATCHING, "prefill long prompts in chunks of --max-num-batched-tokens while other "
                                         "requests keep decoding (--no-enable-chunked-prefill: whole prompts)"),
    "enable_lora": (LORA, "serve LoRA adapters (implied by --lora-modules)"),
    "max_loras": (LORA, "adapters held in device slots at once, so the most distinct adapters in one step"),
    "max_lora_rank": (LORA, "the highest adapter rank accepted"),
    "max_cpu_loras": (LORA, "adapters cached in CPU memory (default: --max-loras)"),
    "lora_dtype": (LORA, "dtype adapters are kept in: auto (the model's), float32, bfloat16, float16"),
    "limit_mm_per_prompt": (MULTIMODAL, 'JSON: the most items of each modality in one prompt, e.g. \'{"image": 4}\' '
                                        "(default: 999 each)"),
    "default_mm_loras": (MULTIMODAL, 'JSON: an adapter applied to requests carrying a modality that name no adapter, '
                                     'e.g. \'{"image": "/adapters/vision"}\' (implies --enable-lora)'),
    "allowed_local_media_path": (MULTIMODAL, "let chat messages read file:// images under this directory "
                                             "(a security risk: trusted clients only)"),
    "allowed_media_domains": (MULTIMODAL, "let chat messages fetch http(s) images from these hosts (default: none)"),
}
# fields whose flag takes JSON (EngineArgs parses it) or several values
_JSON_FIELDS = ("limit_mm_per_prompt", "default_mm_loras")
_LIST_FIELDS = ("allowed_media_domains",)
_OTHER = "Engine"
_GROUP_ORDER = (MODEL, BATCHING, LORA, MULTIMODAL, _OTHER, VLLM, SERVER)

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_engine_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """MODEL, a flag per EngineArgs field and --lora-modules (what `serve` and `generate` share);
    the argument groups by title, for the caller to add to."""
    from ..config import EngineArgs  # torch loads here, not at import
    from ..vllm_compat import VLLM_ARGS

    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="model directory or Hub repo id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    groups = {title: parser.add_argument_group(title) for title in _GROUP_ORDER}
    hints = typing.get_type_hints(EngineArgs)
    for field in dataclasses.fields(EngineArgs):
        if field.init and field.name != "model":
            if field.name in ENGINE_FLAGS:
                group, text = ENGINE_FLAGS[field.name]
            elif field.name in VLLM_ARGS:  # what loraplex does with vLLM's argument
                group, text = VLLM, VLLM_ARGS[field.name].does
            else:
                group, text = _OTHER, f"EngineArgs.{field.name}"
            _add_field(groups[group], field, hints[field.name], text)
    groups[LORA].add_argument(
        "--lora-modules", nargs="+", action="extend", default=[], type=lora_module, metavar="NAME=PATH",
        help='adapters to serve from the start: NAME=PATH, or JSON {"name": ..., "path": ..., "base_model_name": ...}; '
             "repeated flags add up",
    )
    return groups


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `loraplex serve`'s arguments to `parser`."""
    server = add_engine_arguments(parser)[SERVER]
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    server.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer <key>` on the API (default: VLLM_API_KEY, else no key)")
    server.add_argument("--uvicorn-log-level", default="info", choices=UVICORN_LOG_LEVELS,
                        help="uvicorn's log level (default: info)")
    server.add_argument("--disable-log-requests", action="store_true", help="do not log each request")
    add_ray_arguments(server)
    return parser


def engine_args_from(args: argparse.Namespace, enable_lora: bool = False) -> EngineArgs:
    """The EngineArgs the parsed flags describe (ConfigError names a bad value). Naming adapters
    (--lora-modules) turns LoRA on, as does `enable_lora`."""
    from ..config import EngineArgs

    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(EngineArgs)
              if field.init and field.name != "model"}
    values["enable_lora"] = (bool(values.get("enable_lora")) or bool(args.lora_modules) or bool(values.get("default_mm_loras"))
                             or enable_lora)
    return EngineArgs(model=args.model_flag or args.model, **values)


def _add_field(group: argparse._ArgumentGroup, field: dataclasses.Field, hint: Any, text: str) -> None:
    flag = "--" + field.name.replace("_", "-")
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        raise TypeError(f"EngineArgs.{field.name} has no default; `loraplex serve` needs one to make it a flag")
    if field.name in _JSON_FIELDS:
        group.add_argument(flag, dest=field.name, default=default, metavar="JSON", help=text)
        return
    if field.name in _LIST_FIELDS:
        group.add_argument(flag, dest=field.name, nargs="+", default=default, metavar="HOST", help=text)
        return
    kind = _plain_type(hint)
    if kind is bool:
        action = argparse.BooleanOptionalAction if default else "store_true"
        group.add_argument(flag, dest=field.name, action=action, default=default, help=text)
        return
    if kind not in (int, float, str):
        raise TypeError(f"EngineArgs.{field.name} is a {hint}, which `loraplex serve` cannot read from the command line; "
                        "give it a bool, int, float or str type, or add its flag to loraplex.entrypoints.cli_args")
    if default is not None and "(default" not in text:
        text = f"{text} (default: {default})"
    group.add_argument(flag, dest=field.name, type=kind, default=default, help=text.replace("%", "%%"))


def _plain_type(hint: Any) -> Any:
    """`int | None` -> int; any other hint as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def lora_module(text: str) -> dict[str, str]:
    """One --lora-modules entry, as vLLM spells it: `name=path` or a JSON object."""
    if text.lstrip().startswith("{"):
        try:
            module = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc})") from None
        keys = set(module) if isinstance(module, dict) else set()
        if not {"name", "path"} <= keys <= {"name", "path", "base_model_name"}:
            raise argparse.ArgumentTypeError(
                f'{text!r}: a JSON entry needs "name" and "path" (and optionally "base_model_name"), nothing else'
            )
        return {key: str(value) for key, value in module.items()}
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH; write e.g. sql=/adapters/sql-lora")
    return {"name": name, "path": path}
