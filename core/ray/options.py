"""The scale-out flags, and Ray Serve's application-builder arguments read as `loraplex serve` flags.

`serve run loraplex.ray:app model=DIR enable_lora=true num_replicas=2` hands the builder a dict
of strings (a Serve config file's `args:` a dict of YAML values); each key is a `loraplex serve`
flag with underscores (`max_cpu_loras=8` is `--max-cpu-loras 8`, `model` the positional MODEL),
so both ways of starting take the same options, checked by the same parser.

This module stays light (no Ray, no torch until the engine flags are built): `loraplex serve
--help` lists these flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def add_ray_arguments(group: argparse._ArgumentGroup) -> None:
    """`loraplex serve`'s Ray Serve flags (used with --ray, and by the `loraplex.ray:app` builder)."""
    group.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve (a local Ray instance, or the cluster RAY_ADDRESS names): "
                            "--num-replicas engines behind one OpenAI endpoint, requests routed to replicas "
                            "that already hold their adapter (see docs/scale-out.md)")
    group.add_argument("--num-replicas", type=int, default=1, help="with --ray: engine replicas (default: 1)")
    group.add_argument("--max-num-models-per-replica", type=int, default=None,
                       help="with --ray: adapters a replica holds for routing, least recently used dropped "
                            "first (default: --max-cpu-loras)")
    group.add_argument("--adapter-affinity", action=argparse.BooleanOptionalAction, default=True,
                       help="with --ray: route each request to a replica holding its adapter "
                            "(--no-adapter-affinity: Ray Serve's adapter-blind routing, for comparison)")
    group.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                       help="with --ray: CPUs Ray reserves for each engine replica (default: 1)")
    group.add_argument("--num-gpus-per-replica", type=float, default=0.0,
                       help="with --ray: GPUs Ray reserves for each engine replica (default: 0; 1 on a GPU cluster)")
    group.add_argument("--max-ongoing-requests", type=int, default=256,
                       help="with --ray: requests one replica takes at once; more wait in Ray Serve (default: 256)")


def check_ray_arguments(args: argparse.Namespace) -> None:
    """ConfigError for scale-out values that cannot work."""
    if args.num_replicas < 1:
        raise ConfigError(f"--num-replicas must be at least 1; got {args.num_replicas}")
    if args.max_num_models_per_replica is not None and args.max_num_models_per_replica < 1:
        raise ConfigError(f"--max-num-models-per-replica must be at least 1; got {args.max_num_models_per_replica}")
    if args.max_ongoing_requests < 1:
        raise ConfigError(f"--max-ongoing-requests must be at least 1; got {args.max_ongoing_requests}")


def serve_args_from_builder(values: Mapping[str, Any]) -> argparse.Namespace:
    """Ray Serve's builder arguments as the parsed `loraplex serve` flags they name (ConfigError
    names an unknown key or a bad value)."""
    from ..entrypoints.cli_args import add_serve_arguments

    parser = _RaisingParser(prog="loraplex.ray:app", add_help=False)
    add_serve_arguments(parser)
    actions = {action.dest: action for action in parser._actions}
    argv: list[str] = []
    for key, value in values.items():
        if key == "model":
            argv.append(str(value))
            continue
        action = actions.get(key)
        if action is None or not action.option_strings or key == "model_flag":
            known = sorted(dest for dest, a in actions.items() if a.option_strings and dest not in ("help", "model_flag"))
            raise ConfigError(f"unknown loraplex.ray:app argument {key!r}; use a `loraplex serve` flag's name with "
                              f"underscores, one of: model, {', '.join(known)}")
        flag = action.option_strings[0]
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            on = _truth(key, value)
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if on else "--no-" + flag[2:])
            elif on:
                argv.append(flag)
        elif action.nargs == "+":
            items = value if isinstance(value, (list, tuple)) else str(value).split()
            argv += [flag, *(item if isinstance(item, str) else _json(item) for item in items)]
        else:
            argv += [flag, str(value)]
    args = parser.parse_args(argv)
    check_ray_arguments(args)
    return args


def _truth(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"loraplex.ray:app argument {key}={value!r} is not a boolean; write true or false")


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting the Serve process."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"loraplex.ray:app arguments: {message}")
