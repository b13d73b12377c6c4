"""Multi-LoRA throughput and adapter activation on the embedded model (CPU, fp32), in one run.

Measures, with the same prompts and `--new-tokens` greedy tokens each:
  PEFT mixed batch (`generate(adapter_names=...)`), 16 prompts over 8 rank-16 all-linear adapters
  loraplex, the same 16 prompts over the same 8 adapters
  loraplex base-only and with 1 adapter (16 prompts)
  loraplex 64 prompts over 64 distinct adapters, and 64 prompts on 1 adapter
and the time to make an adapter ready: disk -> device slot, and CPU cache -> device slot.
The loraplex runs are made once per `--lora-dtypes` entry: the adapters stored in the model's
float32 ("auto"), then in bfloat16 (half the bytes each LoRA step reads).
Each engine's runs alternate `--repeats` times, every other round in reverse order; the table
keeps each configuration's best. A ratio of two loraplex configurations is the median over rounds
of the ratio of their two runs in that round, which ran one after the other: on a shared machine
whose speed drifts from minute to minute, each ratio compares runs made under the same conditions.
Run: `python benchmarks/bench_lora.py` (adapters are written once under --workdir).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from make_adapters import make_adapters
from prompts import benchmark_prompts


def peft_mixed(base_dir: str, adapters: list[Path], prompts: list[str], new_tokens: int) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    model.eval()
    names = [f"a{i % len(adapters)}" for i in range(len(prompts))]
    enc = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id, adapter_names=names)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2, **kwargs)
        start = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        elapsed = time.perf_counter() - start
    return len(prompts) * new_tokens / elapsed


def loraplex_run(llm, prompts: list[str], loras: list, new_tokens: int) -> float:
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2), lora_request=loras[:2], use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def slot_read_ms(llm, repeats: int = 3) -> float:
    """ms of one plain read (`sum`) of every device slot's weights, best of `repeats`: the least a
    step that reads each slot once can add over a step that reads one adapter, at the memory
    bandwidth of the moment (on a shared machine it moves from minute to minute)."""
    storage = llm.llm_engine.lora_manager.storage  # [S, numel]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        storage.sum()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def activation_times(llm, adapters: list[Path], repeats: int) -> tuple[float, float]:
    """Median ms for disk -> slot (fresh adapter) and CPU cache -> slot."""
    from loraplex import LoRARequest

    manager = llm.llm_engine.lora_manager
    disk, cpu = [], []
    for i in range(repeats):
        name = f"activation-{i}"
        request = LoRARequest(name, 10_000 + i, str(adapters[i % len(adapters)]))
        start = time.perf_counter()
        manager.add_lora(request)
        manager.activate(name)
        disk.append(time.perf_counter() - start)
        slot = manager.slot_of(name)
        manager.storage[slot].zero_()  # empty the slot so the next activation copies again
        manager.slots[slot] = None
        start = time.perf_counter()
        manager.activate(name)
        cpu.append(time.perf_counter() - start)
        manager.remove_lora(name)
    return statistics.median(disk) * 1e3, statistics.median(cpu) * 1e3


def measure_engine(llm, runs: dict[str, tuple[list[str], list]], repeats: int, new_tokens: int,
                   ) -> tuple[dict[str, list[float]], list[float]]:
    """tok/s of each run in each round, and the ms of one read of all slots after each round."""
    for prompts, loras in runs.values():  # every adapter loaded once, before any timed run
        loraplex_run(llm, prompts, loras, 1)
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    read_ms = []
    for round_index in range(repeats):
        # a ratio's two runs are neighbours in either order, so drift within a round favours neither
        for name, (prompts, loras) in list(runs.items())[:: 1 if round_index % 2 == 0 else -1]:
            rounds[name].append(loraplex_run(llm, prompts, loras, new_tokens))
        read_ms.append(slot_read_ms(llm))
    return rounds, read_ms


def ratio(rounds: dict[str, list[float]], a: str, b: str, target: float) -> None:
    """a / b: against a single run (PEFT's), loraplex's best; else the median of the rounds' ratios."""
    if a not in rounds or b not in rounds:
        return
    if len(rounds[b]) == 1:
        r, spread = max(rounds[a]) / rounds[b][0], ""
    else:
        paired = sorted(x / y for x, y in zip(rounds[a], rounds[b]))
        r = statistics.median(paired)
        spread = f", median of {len(paired)} rounds: {paired[0]:.3f} to {paired[-1]:.3f}"
    print(f"{a}  /  {b}: {r:.3f}x{spread} (target >= {target}x) {'ok' if r >= target else 'MISSED'}")


def many_adapter_cost(label: str, rounds: dict[str, list[float]], read_ms: list[float], slots: int,
                      slot_gb: float, batch: int) -> None:
    """What a 64-adapter step adds over a 1-adapter one, next to what reading the slots once takes.

    A run of `batch` prompts and N new tokens is N steps (the prefill spread over them), so a
    step takes batch / (tok/s) seconds.
    """
    many, one = rounds[f"{label} 64 prompts / 64 adapters"], rounds[f"{label} 64 prompts / 1 adapter"]
    extra_ms = statistics.median(batch * (1 / x - 1 / y) for x, y in zip(many, one)) * 1e3
    ms = statistics.median(read_ms)
    print(f"{label}: a 64-adapter step takes {extra_ms:.1f} ms more than a 1-adapter step (prefill included); "
          f"one read of the {slot_gb:.2f} GB in the {slots} slots takes {ms:.1f} ms ({slot_gb / ms * 1e3:.1f} GB/s; "
          f"medians of {len(many)} rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loraplex-bench-adapters"))
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of the loraplex runs")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument(
        "--lora-dtypes", nargs="+", default=["auto", "bfloat16"],
        help="lora_dtype of each loraplex engine measured (auto: the model's float32)",
    )
    args = parser.parse_args()

    from loraplex import LLM, LoRARequest
    from loraplex.model_loader import embedded_model_dir

    base_dir = str(embedded_model_dir())
    adapters = make_adapters(base_dir, args.workdir, 64)
    requests = [LoRARequest(f"bench-{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    p16, p64 = benchmark_prompts(16), benchmark_prompts(64)
    n = args.new_tokens

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} new tokens per prompt; "
          f"rank-16 all-linear adapters; loraplex runs: {args.repeats} rounds")
    rounds: dict[str, list[float]] = {}  # configuration -> tok/s of each round
    if not args.skip_peft:
        rounds["peft mixed 16 prompts / 8 adapters"] = [peft_mixed(base_dir, adapters[:8], p16, n)]
    runs = {
        "mixed 16 prompts / 8 adapters": (p16, [requests[i % 8] for i in range(16)]),
        "base only, 16 prompts": (p16, [None] * 16),
        "1 adapter, 16 prompts": (p16, [requests[0]] * 16),
        "64 prompts / 64 adapters": (p64, requests),
        "64 prompts / 1 adapter": (p64, [requests[0]] * 64),
    }
    engines: dict[str, tuple[list[float], int, float]] = {}  # label -> slot reads (ms), slots, their GB
    for lora_dtype in args.lora_dtypes:
        # one engine at a time: a second one resident slows the first one's adapter reads
        gc.collect()
        llm = LLM(base_dir, device="cpu", enable_lora=True, max_loras=64, max_lora_rank=16, max_cpu_loras=64,
                  lora_dtype=lora_dtype)
        label = "loraplex" if lora_dtype == "auto" else f"loraplex lora_dtype={lora_dtype}"
        engine_rounds, read_ms = measure_engine(llm, runs, args.repeats, n)
        rounds.update({f"{label} {name}": tps for name, tps in engine_rounds.items()})
        storage = llm.llm_engine.lora_manager.storage
        engines[label] = (read_ms, storage.shape[0], storage.numel() * storage.element_size() / 1e9)
        if lora_dtype != args.lora_dtypes[-1]:
            del llm, storage
    for name, tps in rounds.items():
        print(f"{name:<60} {max(tps):8.1f} tok/s (best of {len(tps)})")
    for label, (read_ms, slots, slot_gb) in engines.items():  # each engine against its own base-only runs
        ratio(rounds, f"{label} mixed 16 prompts / 8 adapters", "peft mixed 16 prompts / 8 adapters", 3.0)
        ratio(rounds, f"{label} mixed 16 prompts / 8 adapters", f"{label} base only, 16 prompts", 0.85)
        ratio(rounds, f"{label} 64 prompts / 64 adapters", f"{label} 64 prompts / 1 adapter", 0.8)
        many_adapter_cost(label, rounds, read_ms, slots, slot_gb, len(p64))
    disk_ms, cpu_ms = activation_times(llm, adapters, repeats=8)
    print(f"activation, disk -> slot: {disk_ms:.1f} ms (target < 50); CPU cache -> slot: {cpu_ms:.2f} ms (target < 5)")


if __name__ == "__main__":
    main()
