"""GPU speed of the Triton LoRA kernels at 7B/8B decode shapes, as achieved memory bandwidth.

Decode-time LoRA is memory bound: each step must read every active adapter's A and B once. For
each configuration (module, rank, batch, distinct adapters) this prints:

- the Triton shrink+expand time (one CUDA graph replay, L2 flushed before each, so weights
  come from HBM as they do between layers), in the automatic form and in each form forced;
- the achieved GB/s, counting the distinct adapters' A and B actually read plus activations
  (x read, fp32 y written and read back, out read and written);
- that as a % of the device's copy bandwidth, measured first with a large device-to-device copy;
- the speed-up over the torch reference formulation (gather each token's A/B + bmm), timed the
  same way;
- the time of one eager `lora_apply` call (argument checks, allocation, launches), which is what
  a layer pays when the step is not captured in a CUDA graph.

    .venv/bin/python benchmarks/bench_kernels.py [--markdown docs/kernels_gpu.md]
    .venv/bin/python benchmarks/bench_kernels.py --cpu-smoke   # tiny shapes, Triton interpreted

Without CUDA (and without --cpu-smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Module:
    name: str
    in_features: int
    slice_widths: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        out = [0]
        for w in self.slice_widths:
            out.append(out[-1] + w)
        return tuple(out)


# Llama-3-8B / Mistral-7B: hidden 4096, 32 q heads and 8 kv heads of 128, intermediate 14336.
GPU_MODULES = (Module("qkv", 4096, (4096, 1024, 1024)), Module("gate_up", 4096, (14336, 14336)))
SMOKE_MODULES = (Module("qkv", 64, (64, 16, 16)), Module("gate_up", 64, (96, 96)))


@dataclass
class Row:
    module: str
    rank: int
    batch: int
    adapters: int
    form: str
    triton_us: float
    decode_us: float
    segment_us: float
    torch_us: float
    call_us: float
    gbytes: float
    copy_gbps: float

    @property
    def gbps(self) -> float:
        return self.gbytes / (self.triton_us * 1e-6)

    @property
    def pct_copy(self) -> float:
        return 100.0 * self.gbps / self.copy_gbps

    @property
    def speedup(self) -> float:
        return self.torch_us / self.triton_us


HEADER = (
    "module", "R", "batch", "adapters", "form", "triton us", "decode us", "segment us",
    "torch us", "call us", "GB/s", "% copy", "speed-up",
)


def _num(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def cells(r: Row) -> list[str]:
    times = (r.triton_us, r.decode_us, r.segment_us, r.torch_us, r.call_us)
    return [
        r.module, str(r.rank), str(r.batch), str(r.adapters), r.form, *map(_num, times),
        _num(r.gbps), f"{_num(r.pct_copy)}%", f"{_num(r.speedup)}x",
    ]


# --- timing ---------------------------------------------------------------------------------------


class GpuTimer:
    """Median GPU time of fn: one CUDA graph replay per sample, L2 flushed (untimed) before each."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.reps = reps
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # > any L2

    def graph_us(self, fn: Callable[[], object]) -> float:
        fn()  # compile and fill caches outside the capture
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except RuntimeError as exc:  # not capturable: fall back to eager launches
            print(f"  (CUDA graph capture failed, timing eagerly: {exc})", file=sys.stderr)
            return self.eager_us(fn)
        return self._median(graph.replay)

    def eager_us(self, fn: Callable[[], object]) -> float:
        fn()
        torch.cuda.synchronize()
        return self._median(fn)

    def _median(self, fn: Callable[[], object]) -> float:
        def event() -> torch.cuda.Event:
            return torch.cuda.Event(enable_timing=True)

        events = [(event(), event()) for _ in range(self.reps)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


class CpuTimer:
    """Wall-clock median for --cpu-smoke (no caches flushed, nothing captured)."""

    def __init__(self, reps: int) -> None:
        self.reps = reps

    def graph_us(self, fn: Callable[[], object]) -> float:
        return self.eager_us(fn)

    def eager_us(self, fn: Callable[[], object]) -> float:
        fn()
        samples = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e6


def copy_bandwidth_gbps(device: torch.device, timer: GpuTimer | CpuTimer, nbytes: int) -> float:
    """Device-to-device copy: bytes read + bytes written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = timer.eager_us(lambda: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6) / 1e9


# --- one configuration ----------------------------------------------------------------------------


def measure(
    mod: Module, rank: int, batch: int, adapters: int, dtype: torch.dtype, device: torch.device, timer, copy_gbps: float
) -> Row:
    from loraplex.kernels import LoRABatchMapping, lora_apply, torch_ops, triton_ops

    n_slices = len(mod.slice_widths)
    n_total = mod.offsets[-1]
    g = torch.Generator(device="cpu").manual_seed(rank * 1000 + batch + adapters)
    slots = [i % adapters for i in range(batch)]
    random.Random(batch).shuffle(slots)  # decode order follows requests, not adapters

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    x = rand(batch, mod.in_features, scale=1.0)  # [T, in]
    lora_a = rand(adapters, n_slices * rank, mod.in_features, scale=mod.in_features**-0.5)  # [S, nR, in]
    lora_b = rand(adapters, n_total, rank, scale=rank**-0.5)  # [S, N, R]
    out = torch.zeros(batch, n_total, dtype=dtype, device=device)  # [T, N]
    y = torch.empty(batch, n_slices * rank, dtype=torch.float32, device=device)  # [T, nR]
    mapping = LoRABatchMapping.from_token_slots(torch.tensor(slots), adapters, device=device)
    form = triton_ops.choose_form(mapping)

    def triton_step(form: str | None = None) -> Callable[[], object]:
        def step() -> None:
            triton_ops.shrink(x, lora_a, mapping, n_slices, y, form=form)
            triton_ops.expand(y, lora_b, mapping, out, mod.offsets, form=form)

        return step

    y_torch = torch.empty(batch, n_slices * rank, dtype=dtype, device=device)  # [T, nR]
    gather_shrink, gather_expand = torch_ops.FORMULATIONS["gather_bmm"]

    def torch_step() -> None:
        gather_shrink(x, lora_a, mapping, n_slices, y_torch)
        gather_expand(y_torch, lora_b, mapping, out, mod.offsets)

    _check_agreement(triton_step(), torch_step, out)
    elt = x.element_size()
    weights = adapters * (n_slices * rank * mod.in_features + n_total * rank) * elt  # distinct A + B
    activations = batch * (mod.in_features * elt + 2 * n_slices * rank * 4 + 2 * n_total * elt)
    return Row(
        module=mod.name, rank=rank, batch=batch, adapters=adapters, form=form,
        triton_us=timer.graph_us(triton_step()),
        decode_us=timer.graph_us(triton_step("decode")),
        segment_us=timer.graph_us(triton_step("segment")),
        torch_us=timer.graph_us(torch_step),
        call_us=timer.eager_us(lambda: lora_apply(x, lora_a, lora_b, mapping, out, mod.offsets, backend="triton")),
        gbytes=(weights + activations) / 1e9,
        copy_gbps=copy_gbps,
    )


def _check_agreement(triton_step: Callable[[], object], torch_step: Callable[[], object], out: torch.Tensor) -> None:
    out.zero_()
    triton_step()
    got = out.float().clone()
    out.zero_()
    torch_step()
    scale = out.float().abs().max().item() or 1.0
    err = (got - out.float()).abs().max().item() / scale
    out.zero_()
    if err > 3e-2:
        raise SystemExit(f"Triton and torch disagree (max relative error {err:.3g}): not timing a wrong kernel.")


# --- driver ---------------------------------------------------------------------------------------


def configs(ranks: list[int], batches: list[int], adapters: list[str]) -> list[tuple[int, int, int]]:
    seen: list[tuple[int, int, int]] = []
    for rank in ranks:
        for batch in batches:
            for a in adapters:
                n = batch if a == "all" else min(int(a), batch)
                if (rank, batch, n) not in seen:
                    seen.append((rank, batch, n))
    return seen


def render_text(rows: list[Row]) -> str:
    table = [list(HEADER)] + [cells(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def render_markdown(rows: list[Row], title: str, notes: list[str]) -> str:
    lines = [f"# {title}", "", *notes, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument(
        "--adapters", nargs="+", default=["1", "8", "64", "all"], help="distinct adapters; 'all' = one per token"
    )
    parser.add_argument("--modules", nargs="+", default=["qkv", "gate_up"])
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on CPU, Triton interpreted (checks the script)"
    )
    args = parser.parse_args()

    if args.cpu_smoke:
        # Must precede the first Triton import: the kernels are interpreted on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
        device, timer, modules = torch.device("cpu"), CpuTimer(reps=3), SMOKE_MODULES
        ranks, batches, adapters = [8], [1, 4], ["1", "all"]
        copy_gbps = copy_bandwidth_gbps(device, timer, 64 << 20)
    elif not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here, nothing to measure (use --cpu-smoke to check the script on CPU).")
        return 0
    else:
        device, timer = torch.device("cuda"), GpuTimer(torch.device("cuda"), args.reps)
        modules = tuple(m for m in GPU_MODULES if m.name in args.modules)
        ranks, batches, adapters = args.ranks, args.batches, args.adapters
        copy_gbps = copy_bandwidth_gbps(device, timer, 1 << 30)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}; copy bandwidth {copy_gbps:.0f} GB/s")
    rows = []
    for mod in modules:
        for rank, batch, n in configs(ranks, batches, adapters):
            rows.append(measure(mod, rank, batch, n, dtype, device, timer, copy_gbps))
            print(render_text(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(render_text(rows))
    if args.markdown:
        notes = [
            f"Device: {name}. Date: {datetime.date.today().isoformat()}. "
            f"torch {torch.__version__}, dtype {args.dtype}.",
            f"Copy bandwidth (device-to-device copy, read + write): {copy_gbps:.0f} GB/s.",
            f"Command: `{' '.join(['python', *sys.argv])}`.",
            "Times in microseconds; GB/s counts distinct adapters' A and B plus activations.",
        ]
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(render_markdown(rows, "LoRA kernel benchmark", notes))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
