"""The OpenAI server (`loraplex serve`) under concurrent streaming clients, against the offline engine.

Two measurements, on the embedded model with rank-16 all-linear adapters (made with PEFT, as
bench_lora.py makes them):

1. Throughput. `--requests` completions (the benchmark prompts, greedy, `ignore_eos`,
   `--max-tokens` each) cycling over `--adapters` adapters, sent by `--clients` concurrent
   streaming clients (httpx, server-sent events, on loopback) to a `loraplex serve` subprocess,
   against the same requests through `LLM.generate` in another process with the same engine
   options (`max_num_seqs = --clients`, so the offline engine runs as many sequences at once as
   the clients keep in flight). The two alternate, one idle while the other runs, for
   `--repeats` rounds, every other round in reverse order; the server's throughput as a ratio of
   the offline engine's is the median over rounds of each round's ratio. Also printed: time to
   first token (TTFT, from sending the request to its first streamed chunk) and inter-token
   latency (ITL, the gaps between a stream's chunks), p50 and p99 over every request of every
   round.
2. Time to first token under adapter churn. Requests cycle over the adapters on servers whose
   `max_loras` is half their number, so every request finds its adapter out of the device slots:
   with `max_cpu_loras` = all the adapters it is copied from the CPU cache ("CPU cache"), with
   `max_cpu_loras = max_loras` it is read from disk again ("disk"). Against a server with every
   adapter resident (`max_loras` = all of them). `max_loras` clients send the requests, so no
   more adapters run at once than there are slots: TTFT measures making an adapter ready, not
   waiting for a slot to free up. The three servers run side by side, idle but for the one
   measured, in `--repeats` alternating rounds; the server's own counters (/metrics) confirm
   that every churn request activated its adapter (and read it from disk in the disk variant).
   Then the same with one client per adapter, on the resident and the CPU-cache servers: more
   adapters run at once than there are slots, so half the requests also wait for a running
   request to finish and free one.

3. Long prompts arriving during steady decoding. `--stall-streams` streaming clients decode
   `--stall-tokens` tokens each (cycling over the adapters) while long prompts
   (`--long-prompt-tokens` token ids each, all different, so the prefix cache cannot help) arrive
   one after another; the inter-token latency of the steady streams while the long prompts are
   prefilled (from the first one's arrival to the last one's first token), p50 / p99 / max, on a
   server with chunked prefill (the default; `--stall-budget` as max_num_batched_tokens, the
   engine's default when 0) against one with whole-prompt prefill (`--no-enable-chunked-prefill`),
   side by side in `--repeats` alternating rounds. Target: p99 at least 3x lower with chunking.

Both sides run with the same OMP_WAIT_POLICY (`--omp-wait-policy`, passive by default; see
subprocess_env). The CPU time of each side's threads is printed too: on a shared machine it
moves less than wall time, and it shows what the HTTP side costs.

Run: `cd benchmarks && ../.venv/bin/python bench_server.py` (adapters are written once under
--workdir); `--quick` for a smoke run, `--markdown` for the rows of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from prompts import benchmark_prompts

HERE = Path(__file__).resolve().parent
# The KV cache of every engine here (server and offline): far more than the runs need, far less
# than the default 4 GiB, so several servers fit side by side.
KV_CACHE_BYTES = 512 << 20
LORA_RANK = 16


# ---- the work ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """`requests` completions: prompt i on adapter i mod `adapters`, `max_tokens` greedy tokens each."""

    requests: int
    adapters: int
    max_tokens: int

    def items(self) -> list[tuple[str, str]]:
        """(prompt, adapter name) per request."""
        return [(prompt, adapter_name(i % self.adapters)) for i, prompt in enumerate(benchmark_prompts(self.requests))]


def adapter_name(index: int) -> str:
    return f"bench-{index}"


def engine_options(clients: int, max_loras: int, max_cpu_loras: int) -> dict[str, int]:
    """EngineArgs fields shared by a server and its offline counterpart."""
    return {"max_num_seqs": clients, "max_loras": max_loras, "max_cpu_loras": max_cpu_loras,
            "max_lora_rank": LORA_RANK, "kv_cache_memory_bytes": KV_CACHE_BYTES, "seed": 0}


# ---- the server --------------------------------------------------------------------------------


def subprocess_env(omp_wait_policy: str) -> dict[str, str]:
    """The environment of the server and the offline worker: the same OpenMP wait policy for both.

    By default, libgomp's workers spin for a while after each parallel region, unless the process
    runs more OpenMP threads than there are CPUs; the server's engine thread makes it do so, the
    offline engine in its main thread does not. With anything else on the cores (the benchmark's
    own clients, the server's event loop, another process), a spinning worker that loses its core
    stalls every region. One explicit policy for both sides compares the engines, not the spin.
    """
    env = dict(os.environ)
    if omp_wait_policy == "default":
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    return env


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`loraplex serve` in a subprocess on 127.0.0.1, its output in a log file."""

    def __init__(self, label: str, adapters: list[Path], options: dict[str, int], log_dir: Path, env: dict[str, str],
                 extra_flags: tuple[str, ...] = ()) -> None:
        self.label = label
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{label.replace(' ', '-')}.log"
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
        modules = [f"{adapter_name(i)}={path}" for i, path in enumerate(adapters)]
        command = [*_loraplex_command(), "serve", "--enable-lora", *flags, "--lora-modules", *modules,
                   "--host", "127.0.0.1", "--port", str(self.port), "--uvicorn-log-level", "warning",
                   "--disable-log-requests", *extra_flags]
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait until /health answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.label} server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the {self.label} server did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def counters(self) -> dict[str, float]:
        """The server's per-adapter counters (loraplex:lora_*_total), summed over adapters."""
        from prometheus_client.parser import text_string_to_metric_families

        totals: dict[str, float] = {}
        text = httpx.get(f"{self.url}/metrics", timeout=10.0).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("loraplex:lora_") and sample.name.endswith("_total"):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on Ctrl-C
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _loraplex_command() -> list[str]:
    """The `loraplex` console script of this interpreter's environment, else the module."""
    script = Path(sys.executable).parent / "loraplex"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "loraplex.cli"]


# ---- the clients -------------------------------------------------------------------------------


@dataclass
class Record:
    """One streamed completion, as its client saw it (perf_counter seconds)."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk that carried a choice
    done: float = 0.0
    tokens: int = 0  # completion_tokens of the final usage chunk
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


async def _complete(client: httpx.AsyncClient, prompt: str | list[int], model: str, max_tokens: int,
                    record: Record | None = None) -> Record:
    """Stream one completion; `record` (if given) fills as chunks arrive, for a caller that watches."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    record = record or Record(sent=0.0)
    record.sent = time.perf_counter()
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                raise RuntimeError(f"{model}: error in the stream: {event['error']}")
            if event["choices"]:
                record.chunks.append(time.perf_counter())
                text.append(event["choices"][0]["text"])
            if event.get("usage"):
                record.tokens = event["usage"]["completion_tokens"]
    record.done = time.perf_counter()
    record.text = "".join(text)
    return record


async def _drive(url: str, items: list[tuple[str, str]], max_tokens: int, clients: int) -> tuple[list[Record], float]:
    """Each of `clients` streams one request at a time, taking the next from `items` until none is
    left; the records in `items`' order, and the wall time from the first send to the last answer."""
    records: list[Record | None] = [None] * len(items)
    next_index = iter(range(len(items)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:

        async def worker() -> None:
            for i in next_index:
                prompt, model = items[i]
                records[i] = await _complete(client, prompt, model, max_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return records, elapsed  # type: ignore[return-value]


def drive(url: str, items: list[tuple[str, str]], max_tokens: int, clients: int) -> tuple[list[Record], float]:
    return asyncio.run(_drive(url, items, max_tokens, clients))


# ---- the offline engine, in its own process ------------------------------------------------------


class OfflineWorker:
    """This script with --offline-worker: an LLM with the same engine options, running the work
    through `LLM.generate` each time it is asked (so it never shares the cores with the server)."""

    def __init__(self, adapters: list[Path], options: dict[str, int], work: Work, log_dir: Path, env: dict[str, str]) -> None:
        config = {"adapters": [str(p) for p in adapters], "options": options, "work": work.__dict__}
        self._log = (log_dir / "offline.log").open("w")
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--offline-worker", json.dumps(config)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=HERE,
                                        env=env)
        self._answer()  # ready: the model is loaded

    def run(self, command: str = "run") -> tuple[float, list[str]]:
        """Generated tokens per second of one run, and each request's text ("warm": the first
        max_num_seqs requests only)."""
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        return answer["tok_s"], answer["texts"]

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise RuntimeError(f"the offline worker exited with {self.process.wait()}; see {self._log.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self._log.close()


def offline_worker_main(config_json: str) -> None:
    from loraplex import LLM, LoRARequest, SamplingParams

    config = json.loads(config_json)
    work = Work(**config["work"])
    llm = LLM(enable_lora=True, **config["options"])
    loras = {adapter_name(i): LoRARequest(adapter_name(i), i + 1, path) for i, path in enumerate(config["adapters"])}
    items = work.items()
    prompts = [prompt for prompt, _ in items]
    requests = [loras[name] for _, name in items]
    params = SamplingParams(temperature=0.0, max_tokens=work.max_tokens, ignore_eos=True)
    print("RESULT {}", flush=True)
    for command in sys.stdin:
        if command.strip() not in ("run", "warm"):
            break
        count = len(prompts) if command.strip() == "run" else config["options"]["max_num_seqs"]
        start = time.perf_counter()
        outputs = llm.generate(prompts[:count], params, lora_request=requests[:count], use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
        texts = [out.outputs[0].text for out in outputs]
        print("RESULT " + json.dumps({"tok_s": tokens / elapsed, "texts": texts}), flush=True)


# ---- reporting ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1e3:.1f} ms, p99 {percentile(values, 99) * 1e3:.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`; empty where /proc is missing."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    times = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        times[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return times


class CpuSplit:
    """CPU seconds a process spends in its main thread and in its other threads over a span.

    The server's main thread runs the event loop (HTTP, server-sent events, tokenisation); its other
    threads are the engine thread and torch's workers. The offline engine's main thread runs the
    engine (and is torch's first worker).
    """

    def __init__(self) -> None:
        self.main = self.others = 0.0

    def measure(self, pid: int, run):
        before = thread_cpu(pid)
        result = run()
        after = thread_cpu(pid)
        for tid, seconds in after.items():
            spent = seconds - before.get(tid, 0.0)
            if tid == pid:
                self.main += spent
            else:
                self.others += spent
        return result

    @property
    def total(self) -> float:
        return self.main + self.others

    def per_k_tokens(self, tokens: int) -> str:
        return f"{self.main / tokens * 1e3:.2f} s main thread + {self.others / tokens * 1e3:.2f} s other threads"


# ---- the measurements ---------------------------------------------------------------------------------


def throughput(args: argparse.Namespace, adapters: list[Path], log_dir: Path) -> list[str]:
    """Server against offline on the same work; the markdown rows."""
    work = Work(args.requests, args.adapters, args.max_tokens)
    items = work.items()
    options = engine_options(args.clients, args.adapters, args.adapters)
    print(f"\n== throughput: {work.requests} requests over {work.adapters} adapters, {work.max_tokens} tokens each, "
          f"{args.clients} clients; engine: {options}")
    env = subprocess_env(args.omp_wait_policy)
    server = Server("throughput", adapters, options, log_dir, env)
    try:
        offline = OfflineWorker(adapters, options, work, log_dir, env)
        try:
            server.wait_ready()
            # untimed, on each side: as many requests as run at once (every adapter loaded, the
            # batch shapes of the timed runs seen)
            offline.run("warm")
            drive(server.url, items[:args.clients], work.max_tokens, args.clients)
            server_tps, offline_tps, records = [], [], []
            server_cpu, offline_cpu, client_cpu = CpuSplit(), CpuSplit(), CpuSplit()
            for round_index in range(args.repeats):
                order = ("offline", "server") if round_index % 2 == 0 else ("server", "offline")
                for side in order:
                    if side == "offline":
                        tps, offline_texts = offline_cpu.measure(offline.process.pid, offline.run)
                        offline_tps.append(tps)
                    else:
                        round_records, elapsed = client_cpu.measure(os.getpid(), lambda: server_cpu.measure(
                            server.process.pid, lambda: drive(server.url, items, work.max_tokens, args.clients)))
                        expected = work.requests * work.max_tokens
                        tokens = sum(r.tokens for r in round_records)
                        if tokens != expected:
                            raise RuntimeError(f"the server generated {tokens} tokens, not {expected}")
                        server_tps.append(tokens / elapsed)
                        records.extend(round_records)
                        server_texts = [r.text for r in round_records]
                same = sum(a == b for a, b in zip(server_texts, offline_texts))
                print(f"round {round_index + 1}: server {server_tps[-1]:.1f} tok/s, offline {offline_tps[-1]:.1f} tok/s, "
                      f"ratio {server_tps[-1] / offline_tps[-1]:.3f}")
        finally:
            offline.stop()
    finally:
        server.stop()
    ratios = sorted(s / o for s, o in zip(server_tps, offline_tps))
    ratio = statistics.median(ratios)
    ttft = [r.ttft for r in records]
    itl = [gap for r in records for gap in r.gaps]
    print(f"server:  {max(server_tps):.1f} tok/s (best of {args.repeats}; median {statistics.median(server_tps):.1f})")
    print(f"offline: {max(offline_tps):.1f} tok/s (best of {args.repeats}; median {statistics.median(offline_tps):.1f})")
    print(f"server / offline: {ratio:.3f}x, median of {len(ratios)} rounds: {ratios[0]:.3f} to {ratios[-1]:.3f} "
          f"(target >= 0.9) {verdict(ratio >= 0.9)}")
    print(f"TTFT {ms(ttft)}; ITL {ms(itl)} ({len(ttft)} requests, {len(itl)} gaps)")
    print(f"same greedy text, server and offline (last round): {same}/{work.requests}")
    tokens = work.requests * work.max_tokens * args.repeats
    print(f"CPU seconds per 1000 tokens: server {server_cpu.per_k_tokens(tokens)}; offline {offline_cpu.per_k_tokens(tokens)}; "
          f"the benchmark's clients {client_cpu.total / tokens * 1e3:.2f} s")
    print(f"server CPU / offline CPU, same tokens: {server_cpu.total / offline_cpu.total:.3f}")
    setting = f"{work.requests} requests / {work.adapters} adapters, {args.clients} clients, {work.max_tokens} tokens"
    return [
        f"| {setting} | {max(server_tps):.1f} | {max(offline_tps):.1f} | {ratio:.3f}x ({ratios[0]:.3f} to {ratios[-1]:.3f}) "
        f"| {percentile(ttft, 50) * 1e3:.0f} / {percentile(ttft, 99) * 1e3:.0f} ms "
        f"| {percentile(itl, 50) * 1e3:.1f} / {percentile(itl, 99) * 1e3:.1f} ms | {same}/{work.requests} "
        f"| 0.9x ({verdict(ratio >= 0.9)}) |",
    ]


def churn(args: argparse.Namespace, adapters: list[Path], log_dir: Path) -> list[str]:
    """TTFT with adapters cycling through half as many slots as adapters, against all resident."""
    slots = max(1, args.adapters // 2)
    work = Work(args.churn_requests, args.adapters, args.churn_max_tokens)
    items = work.items()
    options = {  # max_num_seqs as in the throughput runs (it must be at least max_loras)
        "all resident": engine_options(args.clients, args.adapters, args.adapters),
        "churn, CPU cache": engine_options(args.clients, slots, args.adapters),
        "churn, disk": engine_options(args.clients, slots, slots),
    }
    # (run, its server, its clients, the run it is compared with). With `slots` clients no more
    # adapters run at once than there are slots; with one client per adapter, half the requests
    # also wait for a slot to free up, that is for a running request to finish.
    runs = [("all resident", "all resident", slots, "all resident"),
            ("churn, CPU cache", "churn, CPU cache", slots, "all resident"),
            ("churn, disk", "churn, disk", slots, "all resident")]
    if args.adapters <= args.clients:
        crowd = f"{args.adapters} clients"
        runs += [(f"all resident, {crowd}", "all resident", args.adapters, f"all resident, {crowd}"),
                 (f"churn, CPU cache, {crowd}", "churn, CPU cache", args.adapters, f"all resident, {crowd}")]
    print(f"\n== TTFT under adapter churn: {work.requests} requests cycling over {work.adapters} adapters, "
          f"{work.max_tokens} tokens each, {slots} clients (and {args.adapters}); max_loras {slots} (churn) "
          f"or {args.adapters} (resident)")
    env = subprocess_env(args.omp_wait_policy)
    servers = {label: Server(label, adapters, opts, log_dir, env) for label, opts in options.items()}
    ttfts: dict[str, list[float]] = {run: [] for run, _, _, _ in runs}
    counts: dict[str, dict[str, float]] = {run: {} for run, _, _, _ in runs}
    try:
        for server in servers.values():
            server.wait_ready()
            drive(server.url, items, work.max_tokens, slots)  # untimed: adapters loaded, batch shapes seen
        for round_index in range(args.repeats):
            for run, label, clients, _ in runs[:: 1 if round_index % 2 == 0 else -1]:
                before = servers[label].counters()
                records, _ = drive(servers[label].url, items, work.max_tokens, clients)
                after = servers[label].counters()
                ttfts[run].extend(r.ttft for r in records)
                for name, value in after.items():
                    counts[run][name] = counts[run].get(name, 0.0) + value - before.get(name, 0.0)
    finally:
        for server in servers.values():
            server.stop()
    total = work.requests * args.repeats
    rows = []
    for run, _, _, base_run in runs:
        values = ttfts[run]
        activations = int(counts[run].get("loraplex:lora_activations_total", 0))
        loads = int(counts[run].get("loraplex:lora_loads_total", 0))
        load_ms = counts[run].get("loraplex:lora_load_seconds_total", 0.0) / max(loads, 1) * 1e3
        load = f"{load_ms:.1f} ms" if loads else "-"
        ratio = percentile(values, 50) / percentile(ttfts[base_run], 50)
        target = "" if run == base_run else f" (target <= 10x) {verdict(ratio <= 10)}"
        print(f"{run:<28} TTFT {ms(values)}; x{ratio:.2f} of {base_run} (p50){target}; "
              f"{activations} activations, {loads} disk loads ({load} each) for {total} requests")
        rows.append(f"| {run} | {percentile(values, 50) * 1e3:.1f} ms | {percentile(values, 99) * 1e3:.1f} ms "
                    f"| {ratio:.2f}x | {activations} / {loads} of {total} | {load} |")
    return rows


def long_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` token ids each, different from their first token on."""
    import random

    generator = random.Random(seed)
    return [[generator.randrange(1000, 40000) for _ in range(length)] for _ in range(count)]


async def _stall_round(url: str, steady: list[tuple[str, str]], longs: list[list[int]], steady_tokens: int,
                       model: str) -> tuple[list[Record], list[Record]]:
    """The steady streams, and the long prompts sent one after another once every stream decodes."""
    limits = httpx.Limits(max_connections=len(steady) + 1, max_keepalive_connections=len(steady) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:
        steady_records = [Record(sent=0.0) for _ in steady]
        streams = [asyncio.create_task(_complete(client, prompt, name, steady_tokens, record))
                   for (prompt, name), record in zip(steady, steady_records)]
        while not all(len(record.chunks) >= 2 for record in steady_records):  # every stream decoding
            if any(task.done() for task in streams):
                await asyncio.gather(*streams)  # raises what went wrong
                raise RuntimeError("a steady stream ended before the others started; raise --stall-tokens")
            await asyncio.sleep(0.02)
        long_records = [await _complete(client, prompt, model, 4) for prompt in longs]
        await asyncio.gather(*streams)
    return steady_records, long_records


def long_prompt_stall(args: argparse.Namespace, adapters: list[Path], log_dir: Path) -> list[str]:
    """p99 ITL of steady streams while long prompts arrive: chunked prefill against whole prompts."""
    clients = max(args.stall_streams + 1, args.adapters)  # max_loras = --adapters needs that many sequences
    options = engine_options(clients, args.adapters, args.adapters)
    budget = {"max_num_batched_tokens": args.stall_budget} if args.stall_budget else {}
    setups = {"chunked prefill": ({**options, **budget}, ()),
              "whole prompts": (options, ("--no-enable-chunked-prefill",))}
    steady = [(prompt, adapter_name(i % args.adapters)) for i, prompt in enumerate(benchmark_prompts(args.stall_streams))]
    print(f"\n== Long prompts during steady decoding: {args.stall_streams} streams x {args.stall_tokens} tokens over "
          f"{args.adapters} adapters; {args.long_prompts} prompts of {args.long_prompt_tokens} tokens arrive one after "
          f"another; chunk budget {args.stall_budget or 'the engine default'}")
    env = subprocess_env(args.omp_wait_policy)
    servers = {label: Server(label, adapters, opts, log_dir, env, flags) for label, (opts, flags) in setups.items()}
    gaps: dict[str, list[float]] = {label: [] for label in servers}
    long_ttft: dict[str, list[float]] = {label: [] for label in servers}
    try:
        for server in servers.values():
            server.wait_ready()
            drive(server.url, steady, 4, len(steady))  # untimed: adapters loaded
        for round_index in range(args.repeats):
            labels = list(servers)[:: 1 if round_index % 2 == 0 else -1]
            for label in labels:
                longs = long_prompts(args.long_prompts, args.long_prompt_tokens, seed=round_index * 2 + labels.index(label))
                steady_records, long_records = asyncio.run(
                    _stall_round(servers[label].url, steady, longs, args.stall_tokens, adapter_name(0)))
                start, end = long_records[0].sent, long_records[-1].chunks[0]
                if max(r.chunks[-1] for r in steady_records) < end:
                    print(f"  warning: the steady streams ended before the last long prompt's first token ({label}); "
                          "raise --stall-tokens")
                for record in steady_records:
                    gaps[label] += [b - a for a, b in zip(record.chunks, record.chunks[1:]) if b > start and a < end]
                long_ttft[label] += [r.ttft for r in long_records]
    finally:
        for server in servers.values():
            server.stop()
    chunked, whole = gaps["chunked prefill"], gaps["whole prompts"]
    ratio = percentile(whole, 99) / percentile(chunked, 99)
    for label in servers:
        values = gaps[label]
        print(f"{label:<16} steady ITL while prefilling {ms(values)}, max {max(values) * 1e3:.0f} ms ({len(values)} gaps); "
              f"long prompt TTFT p50 {percentile(long_ttft[label], 50) * 1e3:.0f} ms")
    print(f"p99 ITL, whole prompts / chunked prefill: {ratio:.1f}x (target >= 3x) {verdict(ratio >= 3)}")
    return [f"| {label} | {percentile(gaps[label], 50) * 1e3:.0f} ms | {percentile(gaps[label], 99) * 1e3:.0f} ms "
            f"| {max(gaps[label]) * 1e3:.0f} ms | {percentile(long_ttft[label], 50) * 1e3:.0f} ms |" for label in servers] + [
        f"| whole / chunked (p99) | | {ratio:.1f}x ({verdict(ratio >= 3)}, target >= 3x) | | |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (throughput)")
    parser.add_argument("--requests", type=int, default=48, help="requests per throughput round")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per throughput request")
    parser.add_argument("--adapters", type=int, default=8,
                        help="adapters the requests cycle over; the churn servers have half as many slots")
    parser.add_argument("--churn-requests", type=int, default=24, help="requests per adapter-churn round")
    parser.add_argument("--churn-max-tokens", type=int, default=16, help="tokens per adapter-churn request")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of each measurement")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "default"), default="passive",
                        help="OMP_WAIT_POLICY of the server and the offline engine alike (default: passive; "
                             "default: libgomp's own, see subprocess_env)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loraplex-bench-adapters"))
    parser.add_argument("--quick", action="store_true", help="a small run, to check that everything works")
    parser.add_argument("--markdown", action="store_true", help="print the table rows for docs/benchmarks.md")
    parser.add_argument("--stall-streams", type=int, default=8, help="steady streams while long prompts arrive")
    parser.add_argument("--stall-tokens", type=int, default=256, help="tokens of each steady stream")
    parser.add_argument("--long-prompts", type=int, default=3, help="long prompts per round, one after another")
    parser.add_argument("--long-prompt-tokens", type=int, default=4096, help="tokens of each long prompt")
    parser.add_argument("--stall-budget", type=int, default=0,
                        help="max_num_batched_tokens of the chunked-prefill server (0: the engine's default)")
    parser.add_argument("--only", choices=("throughput", "churn", "stall"), action="append",
                        help="run only these measurements (repeatable; default: all three)")
    parser.add_argument("--skip-churn", action="store_true", help="measure throughput only (as --only throughput)")
    parser.add_argument("--offline-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_worker:
        offline_worker_main(args.offline_worker)
        return
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.adapters = 4, 8, 8, 4
        args.churn_requests, args.churn_max_tokens, args.repeats = 8, 4, 1
        args.stall_streams, args.stall_tokens, args.long_prompts, args.long_prompt_tokens = 2, 64, 1, 512
    if args.adapters < 2 or args.clients < 1 or args.requests < 1 or args.max_tokens < 1 or args.repeats < 1:
        parser.error("--adapters must be at least 2, and --clients, --requests, --max-tokens, --repeats at least 1")
    if args.adapters > args.clients:
        parser.error(f"--adapters ({args.adapters}) must not exceed --clients ({args.clients}): max_loras = --adapters "
                     "and max_num_seqs = --clients, and a step never runs more adapters than sequences")

    import torch

    from loraplex.model_loader import embedded_model_dir
    from make_adapters import make_adapters

    adapters = make_adapters(str(embedded_model_dir()), args.workdir, args.adapters, rank=LORA_RANK)
    log_dir = args.workdir / "logs"
    log_dir.mkdir(exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; rank-{LORA_RANK} "
          f"all-linear adapters; {args.repeats} rounds; OMP_WAIT_POLICY {args.omp_wait_policy}; server logs in {log_dir}")
    only = set(args.only or (["throughput"] if args.skip_churn else ["throughput", "churn", "stall"]))
    timings, rows, churn_rows, stall_rows = [], [], [], []
    for name, measure, into in (("throughput", throughput, rows), ("churn", churn, churn_rows),
                                ("stall", long_prompt_stall, stall_rows)):
        if name in only:
            start = time.perf_counter()
            into += measure(args, adapters, log_dir)
            timings.append(f"{name} {time.perf_counter() - start:.0f} s")
    print(f"\n({', '.join(timings)})")
    if args.markdown:
        if rows:
            print("\n| work | server tok/s | offline tok/s | server / offline (median, range) | TTFT p50 / p99 "
                  "| ITL p50 / p99 | same greedy text | target |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
            print("\n".join(rows))
        if churn_rows:
            print("\n| adapters | TTFT p50 | TTFT p99 | p50 / all resident (same clients) | activations / disk loads "
                  "| one disk load |\n| --- | --- | --- | --- | --- | --- |")
            print("\n".join(churn_rows))
        if stall_rows:
            print("\n| server | steady ITL p50 | p99 | max | long prompt TTFT p50 |\n| --- | --- | --- | --- | --- |")
            print("\n".join(stall_rows))

if __name__ == "__main__":
    main()
