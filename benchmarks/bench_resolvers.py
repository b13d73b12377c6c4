"""Time to first token for a request that names an adapter the server has never seen, found
through a resolver, against the same request for an adapter already loaded; in one run.

On the embedded model (SmolLM2-135M-Instruct), with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1` and
`max_tokens=1`, each request is one `LLM.generate` call, timed from the call to its return (the
first token). For each source, `--adapters` distinct names (rank `--rank`, all linear layers):

  filesystem   loraplex-resolver-filesystem over a local directory
  s3           loraplex-resolver-s3 against a moto S3 server on 127.0.0.1 (download to an empty
               cache, atomic install, then load)

and for each name, right after, the same request again (the adapter is now in a device slot).
Both resolvers are registered, the filesystem first, as a server would have them; the series
run interleaved.
Also printed: the base model alone, and each resolver's `resolve_lora` alone (fresh names).
Needs the resolver packages and `moto[server]` (make install). Run:
`python benchmarks/bench_resolvers.py [--adapters 20] [--rank 16]`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from make_adapters import make_adapters

PROMPT = "Write a SQL query that lists the ten largest cities by population."


def summary(label: str, seconds: list[float], reference: float | None = None) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    median = statistics.median(ms)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0]
    ratio = f"   x{median / reference:5.2f} of loaded" if reference else ""
    return f"  {label:<44} median {median:8.1f} ms   p90 {p90:8.1f} ms   (n={len(ms)}){ratio}"


def time_request(llm, params, lora_request) -> float:
    start = time.perf_counter()
    llm.generate([PROMPT], params, use_tqdm=False, lora_request=lora_request)
    return time.perf_counter() - start


def time_resolver(resolver, base_model_name: str, names: list[str]) -> list[float]:
    """Each `resolve_lora` on one running event loop (as in a server), timed alone."""

    async def run() -> list[float]:
        times = []
        await resolver.resolve_lora(base_model_name, "warm-up-miss")  # the loop's worker threads start
        for name in names:
            start = time.perf_counter()
            request = await resolver.resolve_lora(base_model_name, name)
            times.append(time.perf_counter() - start)
            assert request is not None, f"{name} was not resolved"
        return times

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=20, help="distinct unseen adapters per source")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-bench-resolvers")
    args = parser.parse_args()

    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    os.environ["VLLM_PLUGINS"] = ""  # the resolvers are registered below, explicitly
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    import boto3
    from loraplex_resolver_filesystem import FilesystemResolver
    from loraplex_resolver_s3 import S3Resolver
    from moto.server import ThreadedMotoServer

    from loraplex import LLM, SamplingParams
    from loraplex.model_loader import embedded_model_dir
    from loraplex.resolver import LoRAResolverRegistry

    model_dir = str(embedded_model_dir())
    n = args.adapters
    files = make_adapters(model_dir, args.workdir / "adapters", 1, rank=args.rank)[0]
    weights_mb = (files / "adapter_model.safetensors").stat().st_size / 1e6
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))

    # sources: the same adapter files under distinct names (loraplex treats each name as its own adapter)
    fs_root = run_dir / "fs-root"
    for i in range(2 * n + 1):
        shutil.copytree(files, fs_root / f"fs-{i}")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench-loras")
    for i in range(2 * n + 1):
        for file in files.iterdir():
            s3.put_object(Bucket="bench-loras", Key=f"loras/s3-{i}/{file.name}", Body=file.read_bytes())

    fs_resolver = FilesystemResolver(fs_root)
    s3_resolver = S3Resolver("s3://bench-loras/loras", run_dir / "s3-cache", endpoint_url=endpoint)

    llm = LLM(model_dir, enable_lora=True, max_loras=4, max_lora_rank=max(16, args.rank), max_cpu_loras=8)
    base_name = llm.llm_engine.lora_resolution.base_model_name
    params = SamplingParams(temperature=0.0, max_tokens=1)

    # both registered, as a server would have them (the filesystem is asked first; an S3 name
    # costs it one directory lookup)
    LoRAResolverRegistry.register_resolver("lora_filesystem_resolver", fs_resolver)
    LoRAResolverRegistry.register_resolver("lora_s3_resolver", s3_resolver)

    # warm-up: the engine, adapter loads, and each resolver's first call (s3fs session set-up)
    time_request(llm, params, None)
    for name in ("fs-0", "s3-0"):
        time_request(llm, params, name)
        time_request(llm, params, name)

    # interleaved, so that a machine whose load drifts affects every series alike
    base_times: list[float] = []
    results = {"filesystem": ([], [], []), "s3": ([], [], [])}
    for i in range(1, n + 1):
        base_times.append(time_request(llm, params, None))
        for source, prefix in (("filesystem", "fs"), ("s3", "s3")):
            unseen, loaded, _ = results[source]
            unseen.append(time_request(llm, params, f"{prefix}-{i}"))
            loaded.append(time_request(llm, params, f"{prefix}-{i}"))
    for source, prefix, resolver in (("filesystem", "fs", fs_resolver), ("s3", "s3", s3_resolver)):
        results[source][2].extend(time_resolver(resolver, base_name, [f"{prefix}-{i}" for i in range(n + 1, 2 * n + 1)]))
    server.stop()

    print(f"loraplex resolvers: time to first token (max_tokens=1), embedded model {Path(model_dir).name}, "
          f"device {llm.llm_engine.device}, torch threads {__import__('torch').get_num_threads()}")
    print(f"adapters: rank {args.rank}, all linear layers, {weights_mb:.1f} MB of weights each; "
          f"{n} unseen names per source; prompt of {len(llm.get_tokenizer().encode(PROMPT))} tokens")
    print(summary("base model, no adapter", base_times))
    for source, (unseen, loaded, alone) in results.items():
        reference = statistics.median(loaded) * 1e3
        print(f"{source}:")
        print(summary("already-loaded adapter (in a device slot)", loaded))
        print(summary("unseen adapter, found by the resolver", unseen, reference))
        print(summary(f"  resolve_lora alone ({'download + install' if source == 's3' else 'lookup + checks'})", alone))
        extra = statistics.median(unseen) - statistics.median(loaded)
        print(f"  first request for an unseen adapter costs {extra * 1e3:.1f} ms more (median) than for a loaded one")
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
