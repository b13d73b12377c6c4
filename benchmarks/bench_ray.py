"""Adapter-affine routing on Ray Serve against adapter-blind routing.

1. Live (`--live`, the default): the embedded model, 2 engine replicas on a local Ray instance,
   rank-16 all-linear adapters, 4x as many adapters as one replica's CPU cache holds; the same
   Zipf-distributed request mix sent through the one OpenAI endpoint with adapter affinity on
   and off. Reported: adapter loads (disk -> CPU, summed over the replicas' stats) and time to
   first token (streamed, `max_tokens` tokens each).
2. Simulation (`--sim`, the default too): the routing policies alone, no model: 16 replicas,
   1,000 adapters, a CPU cache of `--sim-cache` adapters per replica, a Zipf request mix. Affine:
   a request goes to a replica holding its adapter (the less busy of two when several do), else
   to the replica holding the fewest adapters (Ray Serve's multiplexed routing); blind: round
   robin. Reported: the CPU-cache hit rate of both.

Command: `cd benchmarks && ../.venv/bin/python bench_ray.py` (`--sim` or `--live` alone).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ---- the simulation -------------------------------------------------------------------------------------


def zipf_mix(num_adapters: int, num_requests: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** s for rank in range(num_adapters)]
    order = list(range(num_adapters))
    rng.shuffle(order)  # popularity unrelated to the adapter's index
    return [order[i] for i in rng.choices(range(num_adapters), weights=weights, k=num_requests)]


def simulate(policy: str, mix: list[int], replicas: int, cache: int, seed: int) -> float:
    """The CPU-cache hit rate of `policy` ("affine" or "round-robin") over `mix`."""
    rng = random.Random(seed)
    caches = [OrderedDict() for _ in range(replicas)]
    load = [0] * replicas  # requests routed so far: stands for queue length in the tie-break
    hits = 0
    for i, adapter in enumerate(mix):
        if policy == "round-robin":
            target = i % replicas
        else:
            holders = [r for r in range(replicas) if adapter in caches[r]]
            if holders:
                pair = rng.sample(holders, min(2, len(holders)))
                target = min(pair, key=lambda r: load[r])
            else:
                fewest = min(len(c) for c in caches)
                target = rng.choice([r for r in range(replicas) if len(caches[r]) == fewest])
        held = caches[target]
        if adapter in held:
            hits += 1
            held.move_to_end(adapter)
        else:
            held[adapter] = True
            if len(held) > cache:
                held.popitem(last=False)
        load[target] += 1
    return hits / len(mix)


def run_simulation(args: argparse.Namespace) -> None:
    mix = zipf_mix(args.sim_adapters, args.sim_requests, args.zipf, seed=1)
    print(f"== simulation: {args.sim_replicas} replicas, {args.sim_adapters} adapters, CPU cache {args.sim_cache} per "
          f"replica, {args.sim_requests} requests, Zipf s={args.zipf}")
    rates = {policy: simulate(policy, mix, args.sim_replicas, args.sim_cache, seed=2) for policy in ("affine", "round-robin")}
    for policy, rate in rates.items():
        print(f"  {policy:12s} CPU-cache hit rate {rate:6.1%}   (adapter loads: {round((1 - rate) * len(mix))})")
    print(f"  affine / round-robin misses: {(1 - rates['affine']) / (1 - rates['round-robin']):.2f}x")


# ---- live, on Ray Serve ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _measure(url: str, names: list[str], mix: list[int], max_tokens: int) -> tuple[list[float], int]:
    import httpx

    ttfts = []
    with httpx.Client(base_url=url, timeout=300.0) as http:
        before = _loads(http)
        for index in mix:
            body = {"model": names[index], "prompt": "Write a haiku about the sea.", "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": True}
            start = time.perf_counter()
            with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                first = None
                for line in response.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - start
                ttfts.append(first)
        time.sleep(1.5)  # the replicas' next reports carry the last loads
        return ttfts, _loads(http) - before


def _loads(http) -> int:
    return sum(sum(r["adapter_loads"].values()) for r in http.get("/replicas").json()["data"])


def run_live(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    sys.path.insert(0, str(HERE))
    from make_adapters import make_adapters

    from loraplex.model_loader import embedded_model_dir
    from loraplex.ray import app

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ray_"))
    count = 4 * args.max_cpu_loras
    paths = make_adapters(str(embedded_model_dir()), workdir / "adapters", count, rank=16)
    names = [f"adapter-{i:03d}" for i in range(count)]
    mix = zipf_mix(count, args.requests, args.zipf, seed=3)
    port = _free_port()
    os.environ["OMP_NUM_THREADS"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        print(f"== live: embedded model, 2 replicas (max_loras {args.max_loras}, max_cpu_loras {args.max_cpu_loras}), "
              f"{count} rank-16 adapters, {len(mix)} requests (Zipf s={args.zipf}), {args.max_tokens} tokens each")
        results = {}
        for affinity in (True, False):
            values = {"max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras, "max_lora_rank": 16,
                      "enable_lora": True, "num_replicas": 2, "adapter_affinity": affinity, "disable_log_requests": True,
                      "lora_modules": [f"{n}={p}" for n, p in zip(names, paths)],
                      "kv_cache_memory_bytes": 64 << 20, "max_model_len": 512}
            serve.run(app(values), name="bench", route_prefix="/")
            _wait_replicas(url, 2)
            _measure(url, names, mix[:4], args.max_tokens)  # warm-up: compiled paths, first loads aside
            results[affinity] = _measure(url, names, mix, args.max_tokens)
        for affinity, (ttfts, loads) in results.items():
            label = "affine" if affinity else "round-robin"
            print(f"  {label:12s} adapter loads {loads:4d}   TTFT median {statistics.median(ttfts) * 1e3:7.1f} ms   "
                  f"p90 {statistics.quantiles(ttfts, n=10)[-1] * 1e3:7.1f} ms")
        (a_ttft, a_loads), (b_ttft, b_loads) = results[True], results[False]
        print(f"  affine / round-robin: loads {a_loads / max(b_loads, 1):.2f}x, "
              f"TTFT median {statistics.median(a_ttft) / statistics.median(b_ttft):.2f}x")
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_replicas(url: str, count: int, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(httpx.get(f"{url}/replicas", timeout=10).json()["data"]) == count:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{count} replicas did not start within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim", action="store_true", help="only the simulation")
    parser.add_argument("--live", action="store_true", help="only the live measurement")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the request mix")
    parser.add_argument("--sim-replicas", type=int, default=16)
    parser.add_argument("--sim-adapters", type=int, default=1000)
    parser.add_argument("--sim-cache", type=int, default=32, help="adapters per replica CPU cache (max_cpu_loras)")
    parser.add_argument("--sim-requests", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=64, help="live requests per policy")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--max-cpu-loras", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the adapters are written (default: a temporary directory)")
    args = parser.parse_args()
    both = not (args.sim or args.live)
    if args.sim or both:
        run_simulation(args)
    if args.live or both:
        run_live(args)


if __name__ == "__main__":
    main()
