"""The Ray Serve application: `build_application(args)` from `loraplex serve` flags, the builder
Ray's own tools call (`serve run loraplex.ray:app model=... num_replicas=2`), and
`loraplex serve --ray` on a local Ray instance.

Three deployments: AdapterRegistry (one replica, no CPU), EngineReplica (`--num-replicas`
engines, each `--num-cpus-per-replica` / `--num-gpus-per-replica`), and OpenAIIngress (the HTTP
routes, no CPU). VLLM_ALLOW_RUNTIME_LORA_UPDATING and the resolvers' environment variables are
read where the application is built and handed to every replica, so all of them agree.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

from ray import serve
from ray.serve import Application

from .. import envs
from .ingress import OpenAIIngress
from .lora_modules import check_lora_modules
from .options import check_ray_arguments, serve_args_from_builder
from .registry import AdapterRegistry
from .replica import EngineReplica

APP_NAME = "loraplex"
# environment variables every replica must see as the process that built the application does
_FORWARDED_ENV = ("VLLM_", "LORAPLEX_", "HF_", "AWS_", "OMP_NUM_THREADS")
# a stopping replica checks for unfinished requests this often (Serve's default: every 2 s), so
# that shutdowns and redeployments do not idle once the requests have ended
_WAIT_LOOP_S = 0.25


def build_application(args: argparse.Namespace) -> Application:
    """The deployment graph for parsed `loraplex serve` flags (with the Ray ones); ConfigError names
    a flag or a --lora-modules entry that cannot work, before anything is deployed."""
    check_ray_arguments(args)
    base_names = {name for name in (args.served_model_name, args.model_flag or args.model) if name}
    check_lora_modules(args.lora_modules, base_names)
    env = {key: value for key, value in os.environ.items() if key.startswith(_FORWARDED_ENV)}
    runtime_env = {"env_vars": env} if env else {}
    # checked every second (Serve's default: 10 s), so that a dead registry is replaced at once
    registry = serve.deployment(AdapterRegistry, name="AdapterRegistry", num_replicas=1, health_check_period_s=1,
                                graceful_shutdown_wait_loop_s=_WAIT_LOOP_S,
                                ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env},
                                ).bind(args.lora_modules)
    engines = serve.deployment(
        EngineReplica, name="EngineReplica", num_replicas=args.num_replicas,
        max_ongoing_requests=args.max_ongoing_requests, graceful_shutdown_wait_loop_s=_WAIT_LOOP_S,
        ray_actor_options={"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica,
                           "runtime_env": runtime_env},
    ).bind(_replica_args(args), registry)
    ingress = serve.deployment(serve.ingress()(OpenAIIngress), name="OpenAIIngress",
                               max_ongoing_requests=max(1000, args.max_ongoing_requests * args.num_replicas),
                               graceful_shutdown_wait_loop_s=_WAIT_LOOP_S,
                               ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env})
    return ingress.bind(engines, registry, adapter_affinity=args.adapter_affinity,
                        api_key=args.api_key or envs.api_key(),
                        allow_runtime_lora_updating=envs.allow_runtime_lora_updating())


def app(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder: `serve run loraplex.ray:app model=DIR num_replicas=2 ...`
    (keys: `loraplex serve` flags with underscores; see docs/scale-out.md)."""
    return build_application(serve_args_from_builder(args))


def _replica_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags a replica builds its engine from; --lora-modules live in the registry instead
    (loaded on demand), and LoRA is on when they are named."""
    values = dict(vars(args))
    values["enable_lora"] = bool(values.get("enable_lora")) or bool(args.lora_modules)
    values["lora_modules"] = []
    values["api_key"] = None  # the ingress checks keys
    return argparse.Namespace(**values)


def run_on_local_ray(args: argparse.Namespace) -> int:
    """`loraplex serve --ray`: start Ray here (or join RAY_ADDRESS's cluster) and serve until Ctrl-C
    or SIGTERM; then Serve and Ray stop, or on a joined cluster only this application goes."""
    import ray

    application = build_application(args)  # a bad flag or adapter stops here, before Ray starts
    joined = bool(os.environ.get("RAY_ADDRESS"))
    # "local": a Ray instance of its own, never one a `ray start` left running on this machine
    ray.init(address=None if joined else "local", namespace="loraplex")
    # after ray.init, whose core worker installs a SIGTERM handler that aborts without shutting Ray down
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"loraplex serve --ray: starting {args.num_replicas} engine replica(s) ...", flush=True)
        serve.run(application, name=APP_NAME, route_prefix="/")
        affinity = "adapter-affine" if args.adapter_affinity else "adapter-blind (--no-adapter-affinity)"
        print(f"loraplex serve --ray: listening on http://{args.host}:{args.port}; OpenAI API under /v1; "
              f"{args.num_replicas} replica(s), {affinity} routing; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a process manager's stop)
        pass
    finally:
        if joined:  # other applications may share the cluster's Serve
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    print("loraplex serve --ray: stopped", flush=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
