"""Compare the CPU implementations of LoRA shrink+expand at the embedded model's shapes.

SmolLM2-135M: hidden 576, packed q/k/v out 576/192/192, o 576, gate/up 1536/1536, down
1536 -> 576, rank 16. Each formulation in `loraplex.kernels.torch_ops.FORMULATIONS` runs shrink then expand
(what `lora_apply` does) for the four wrapped modules of one decoder layer, beside the native
CPU kernel (`cpu`, bound once as the model's layers bind it); the script prints the median time
per layer and per module, side by side, plus what `choose_formulation` picks and what the public
`lora_apply` (checks and the automatic backend included) costs. Every formulation's output
is checked against the reference before it is timed. A second table compares "batched" with
"grouped" as a step's order forms more slot groups (where the default switches).

    .venv/bin/python benchmarks/bench_lora_cpu_ops.py [--dtype fp32|bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from loraplex.kernels import lora_apply, native_cpu, reference, torch_ops
from loraplex.kernels.mapping import LoRABatchMapping

HIDDEN = 576
INTERMEDIATE = 1536
RANK = 16


@dataclass(frozen=True)
class Module:
    name: str
    in_features: int
    slice_offsets: tuple[int, ...]


MODULES = (
    Module("qkv", HIDDEN, (0, 576, 768, 960)),
    Module("o", HIDDEN, (0, HIDDEN)),
    Module("gate_up", HIDDEN, (0, INTERMEDIATE, 2 * INTERMEDIATE)),
    Module("down", INTERMEDIATE, (0, HIDDEN)),
)


@dataclass(frozen=True)
class Scenario:
    name: str
    token_slots: list[int]
    num_slots: int


def scenarios(seed: int = 0) -> list[Scenario]:
    rng = random.Random(seed)
    decode16 = sorted(i % 8 for i in range(16))  # the engine orders a step's tokens by slot
    decode64 = list(range(64))
    shuffled = list(decode16)
    rng.shuffle(shuffled)  # the worst order: every token its own run
    prefill = [r for r in range(4) for _ in range(128)]  # 4 prompts of 128 tokens, one adapter each
    mixed = [0] * 100 + [3] * 60 + sorted(i % 8 for i in range(14))  # 2 prefills, then 14 decodes
    return [
        Scenario("decode T=16, 8 adapters", decode16, 8),
        Scenario("decode T=64, 64 adapters", decode64, 64),
        Scenario("decode T=16, 8, unsorted", shuffled, 8),
        Scenario("prefill T=512, 4 adapters", prefill, 4),
        Scenario("prefill+decode T=174", mixed, 8),
    ]


def median_seconds(fn: Callable[[], object], min_time: float = 0.3, repeats: int = 7) -> float:
    fn()  # warm-up
    n = 1
    while True:  # pick a loop count that runs for about min_time / repeats
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start > min_time / repeats:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples)


def run(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    # then the native kernel (when it builds), and the public call, checks and choice included
    names = [*torch_ops.FORMULATIONS, *(["cpu"] if native_cpu.available() else []), "lora_apply"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {dtype}, rank {RANK}")
    header = f"{'scenario':28s} {'module':8s} " + " ".join(f"{n:>11s}" for n in names) + "   default"
    print(header)
    print("-" * len(header))
    for sc in scenarios():
        mapping = LoRABatchMapping.from_token_slots(torch.tensor(sc.token_slots), sc.num_slots)
        t = len(sc.token_slots)
        totals = dict.fromkeys(names, 0.0)
        for mod in MODULES:
            n_slices = len(mod.slice_offsets) - 1
            n_total = mod.slice_offsets[-1]
            x = torch.randn(t, mod.in_features, dtype=dtype)  # [T, in]
            lora_a = torch.randn(sc.num_slots, n_slices * RANK, mod.in_features, dtype=dtype) * 0.05
            lora_b = _b_as_stored(torch.randn(sc.num_slots, n_total, RANK, dtype=dtype) * 0.05)
            base = torch.randn(t, n_total, dtype=dtype)  # [T, N]
            expected = _reference_apply(x, lora_a, lora_b, mapping, base, mod.slice_offsets)
            cells = []
            for name in names:
                step = _apply_step(name, x, lora_a, lora_b, mapping, base.clone(), mod.slice_offsets)
                out = step()  # the first call's output is checked, the later ones timed
                tol = 1e-3 if dtype == torch.float32 else 5e-2
                torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
                seconds = median_seconds(step)
                totals[name] += seconds
                cells.append(f"{seconds * 1e6:9.1f}us")
            print(f"{sc.name:28s} {mod.name:8s} " + " ".join(cells))
        best = min([n for n in names if n != "lora_apply"], key=totals.__getitem__)
        cells = [f"{totals[n] * 1e6:9.1f}us" for n in names]
        chosen = torch_ops.choose_formulation(mapping)
        print(f"{sc.name:28s} {'layer':8s} " + " ".join(cells) + f"   torch: {chosen} (fastest: {best})")
        print()


def crossover(dtype: torch.dtype) -> None:
    """"batched" against "grouped" as a 16-token step over 8 adapters forms more slot groups."""
    print("batched vs grouped, one layer (qkv + o + gate_up + down), T=16 over 8 adapters, by slot groups")
    print(f"{'order':>28s} {'groups':>6s} {'batched':>11s} {'grouped':>11s}   default")
    names = [n for n in ("batched", "grouped") if n in torch_ops.FORMULATIONS]
    for blocks in (1, 2, 3, 4, 5, 8):
        # `blocks` interleaved slices of the tokens, each in slot order: about that many groups
        slots = [s for b in range(blocks) for s in sorted(i % 8 for i in range(16))[b::blocks]]
        mapping = LoRABatchMapping.from_token_slots(torch.tensor(slots), 8)
        totals = dict.fromkeys(names, 0.0)
        for name in names:
            for mod in MODULES:
                n_slices, n_total = len(mod.slice_offsets) - 1, mod.slice_offsets[-1]
                x = torch.randn(16, mod.in_features, dtype=dtype)  # [T, in]
                lora_a = torch.randn(8, n_slices * RANK, mod.in_features, dtype=dtype)
                lora_b = _b_as_stored(torch.randn(8, n_total, RANK, dtype=dtype))
                out = torch.zeros(16, n_total, dtype=dtype)  # [T, N]
                step = _apply_step(name, x, lora_a, lora_b, mapping, out, mod.slice_offsets)
                totals[name] += median_seconds(step, min_time=0.15, repeats=5)
        cells = " ".join(f"{totals[n] * 1e6:9.1f}us" for n in names)
        label = f"{blocks} sorted block(s)"
        print(f"{label:>28s} {len(mapping.slot_groups):6d} {cells}   {torch_ops.choose_formulation(mapping)}")
    print()


def _b_as_stored(b: torch.Tensor) -> torch.Tensor:
    """[S, N, R] laid out as the LoRA manager stores it: [S, R, N] in memory (see slot_layout)."""
    return b.transpose(1, 2).contiguous().transpose(1, 2)


def _apply_step(name, x, lora_a, lora_b, mapping, out, offsets) -> Callable[[], torch.Tensor]:
    """shrink + expand into `out` with one formulation (each call adds the delta again)."""
    if name == "lora_apply":
        return lambda: lora_apply(x, lora_a, lora_b, mapping, out, offsets)
    if name == "cpu":
        bound = native_cpu.bind_apply(lora_a, lora_b, offsets)
        return lambda: bound(x, mapping, out)
    shrink_fn, expand_fn = torch_ops.FORMULATIONS[name]
    y = torch.empty(x.shape[0], lora_a.shape[1], dtype=x.dtype)  # [T, nR]

    def step() -> torch.Tensor:
        shrink_fn(x, lora_a, mapping, len(offsets) - 1, y)
        return expand_fn(y, lora_b, mapping, out, offsets)

    return step


def _reference_apply(x, lora_a, lora_b, mapping, base, offsets) -> torch.Tensor:
    y = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32)  # [T, nR]
    reference.shrink(x, lora_a, mapping, len(offsets) - 1, y)
    return reference.expand(y, lora_b, mapping, base.clone(), offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    run(dtype)
    crossover(dtype)


if __name__ == "__main__":
    main()
