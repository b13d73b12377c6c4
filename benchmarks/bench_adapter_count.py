"""Throughput against the number of distinct adapters in a batch, loraplex and PEFT, with a plot.

The embedded model (CPU, float32), `--prompts` prompts (the benchmark prompts), `--new-tokens`
greedy tokens each; prompt i runs on adapter i mod k for k distinct rank-16 all-linear adapters
(k = 0: the base model alone). loraplex runs every k with its adapters stored in float32
(`lora_dtype="auto"`) and in bfloat16, one engine per storage dtype with every adapter in a device
slot (`max_loras = --prompts`), the points of one engine alternating over `--repeats` rounds
(best kept). PEFT, the peer, runs the same batches with `generate(adapter_names=...)` at
`--peft-points` (one run each: it is slow with many adapters).

Prints the table of docs/operator-guide.md and writes the plot (PNG) and the figures (JSON):

    .venv/bin/pip install -e ".[bench]"   # matplotlib, for the plot only
    cd benchmarks && ../.venv/bin/python bench_adapter_count.py --plot ../docs/images/throughput-vs-adapters.png
    ../.venv/bin/python bench_adapter_count.py --replot ../docs/images/throughput-vs-adapters.json --plot ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from bench_lora import loraplex_run, peft_mixed
from make_adapters import make_adapters
from prompts import benchmark_prompts

LORA_RANK = 16


def adapter_counts(prompts: int) -> list[int]:
    """0 (base only), 1, 2, 4, ... up to one adapter per prompt."""
    counts, k = [0], 1
    while k < prompts:
        counts.append(k)
        k *= 2
    return counts + [prompts]


def measure_loraplex(base_dir: str, adapters: list[Path], prompts: list[str], counts: list[int], lora_dtype: str,
                     new_tokens: int, repeats: int) -> dict[int, float]:
    """Best tok/s for each count of distinct adapters, on one engine."""
    from loraplex import LLM, LoRARequest

    gc.collect()
    llm = LLM(base_dir, device="cpu", enable_lora=True, max_loras=len(prompts), max_num_seqs=len(prompts),
              max_lora_rank=LORA_RANK, max_cpu_loras=len(prompts), lora_dtype=lora_dtype)
    requests = [LoRARequest(f"bench-{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
    batches = {k: [requests[i % k] if k else None for i in range(len(prompts))] for k in counts}
    for loras in batches.values():  # every adapter in its slot before any timed run
        loraplex_run(llm, prompts, loras, 1)
    best = dict.fromkeys(counts, 0.0)
    for round_index in range(repeats):
        for k in counts[:: 1 if round_index % 2 == 0 else -1]:
            best[k] = max(best[k], loraplex_run(llm, prompts, batches[k], new_tokens))
    return best


def measure_peft(base_dir: str, adapters: list[Path], prompts: list[str], points: list[int], new_tokens: int) -> dict[int, float]:
    return {k: peft_mixed(base_dir, adapters[:k], prompts, new_tokens) for k in points}


def plot(figures: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("the plot needs matplotlib: pip install -e '.[bench]' (or pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    styles = {"loraplex, float32 adapters": "o-", "loraplex, bfloat16 adapters": "s-", "PEFT, float32": "^--"}
    for label, series in figures["series"].items():
        points = sorted((int(k), v) for k, v in series.items() if int(k) > 0)
        axes.plot([k for k, _ in points], [v for _, v in points], styles.get(label, "o-"), label=label)
        if "0" in series:
            axes.axhline(series["0"], color=axes.lines[-1].get_color(), linestyle=":", linewidth=1)
    axes.set_xscale("log", base=2)
    ticks = sorted({int(k) for series in figures["series"].values() for k in series if int(k) > 0})
    axes.set_xticks(ticks, [str(k) for k in ticks])
    axes.minorticks_off()
    axes.set_xlabel(f"distinct adapters in a batch of {figures['prompts']} prompts (dotted: base model, no adapter)")
    axes.set_ylabel("generated tokens / s")
    axes.set_ylim(bottom=0)
    axes.set_title(f"SmolLM2-135M-Instruct, rank-{LORA_RANK} all-linear adapters, {figures['new_tokens']} tokens each "
                   f"({figures['machine']})", fontsize=8)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    print(f"plot: {path}")


def table(figures: dict) -> str:
    series = figures["series"]
    counts = sorted({int(k) for values in series.values() for k in values})
    lines = ["| distinct adapters | " + " | ".join(series) + " |", "| --- |" + " --- |" * len(series)]
    for k in counts:
        cells = [f"{values[str(k)]:.0f}" if str(k) in values else "-" for values in series.values()]
        lines.append(f"| {k if k else 'base model'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of the loraplex points")
    parser.add_argument("--peft-points", type=int, nargs="*", default=[1, 4, 16, 64],
                        help="adapter counts PEFT runs (none: skip PEFT)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loraplex-bench-adapters"))
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG), and the figures beside it (.json)")
    parser.add_argument("--replot", type=Path, help="plot figures written by an earlier run instead of measuring")
    args = parser.parse_args()

    if args.replot:
        figures = json.loads(args.replot.read_text())
    else:
        from loraplex.model_loader import embedded_model_dir

        base_dir = str(embedded_model_dir())
        adapters = make_adapters(base_dir, args.workdir, args.prompts, rank=LORA_RANK)
        prompts = benchmark_prompts(args.prompts)
        counts = adapter_counts(args.prompts)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {args.prompts} prompts, "
              f"{args.new_tokens} tokens each; adapter counts {counts}")
        start = time.perf_counter()
        series = {}
        for lora_dtype, label in (("auto", "loraplex, float32 adapters"), ("bfloat16", "loraplex, bfloat16 adapters")):
            series[label] = {str(k): v for k, v in measure_loraplex(base_dir, adapters, prompts, counts, lora_dtype,
                                                                    args.new_tokens, args.repeats).items()}
            print(f"{label}: {series[label]}")
        if args.peft_points:
            series["PEFT, float32"] = {str(k): v for k, v in measure_peft(base_dir, adapters, prompts, args.peft_points,
                                                                          args.new_tokens).items()}
        figures = {"series": series, "prompts": args.prompts, "new_tokens": args.new_tokens,
                   "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}",
                   "date": date.today().isoformat(), "seconds": round(time.perf_counter() - start)}
    print(table(figures))
    for label, values in figures["series"].items():
        if "PEFT" not in label and "1" in values:
            many = values[str(figures["prompts"])]
            print(f"{label}: {figures['prompts']} distinct adapters run at {many / values['1']:.2f}x of one adapter's speed")
    peft = figures["series"].get("PEFT, float32", {})
    for k, value in peft.items():
        ours = figures["series"]["loraplex, float32 adapters"].get(k)
        if ours:
            print(f"{k} adapters: loraplex (float32) / PEFT = {ours / value:.1f}x")
    if args.plot:
        if not args.replot:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            args.plot.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
        plot(figures, args.plot)


if __name__ == "__main__":
    main()
