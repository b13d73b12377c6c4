"""Prefix caching on against off: many requests sharing a long system prompt over several adapters.

The embedded model, `--adapters` rank-16 all-linear adapters (plus the base model as one more
lane), a system prompt of ~`--system-tokens` tokens shared by every request, a short distinct
question after it. Requests arrive in waves of `--wave` (spread over the lanes); a wave runs to
its end before the next arrives, as a steady trickle of chat turns would. Time to first token is
each request's first token time minus its arrival; throughput counts generated tokens over the
wall time of all waves, prefill included.

Two engines, identical but for `enable_prefix_caching`, run the same waves one after the other,
then again in the opposite order (`--rounds`); each figure is the best round, and the ratio is
the median over rounds of the ratio of the two runs made next to each other.
Run: `python benchmarks/bench_prefix.py` (adapters are written once under --workdir).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

from make_adapters import make_adapters
from prompts import benchmark_prompts

RULES = [
    "Answer the question that was asked, and only that question.",
    "Prefer short sentences and plain words over jargon.",
    "When a figure is uncertain, say so and give a range.",
    "Never invent a citation, a name or a date.",
    "If the request is ambiguous, state the reading you chose.",
    "Keep code samples minimal and runnable as shown.",
]


def system_prompt(tokenizer, target_tokens: int) -> str:
    """Numbered house rules, as long as needed to reach `target_tokens` tokens."""
    lines = ["You are the support assistant of a small engineering company. Follow these rules."]
    i = 0
    while len(tokenizer.encode("\n".join(lines))) < target_tokens:
        lines.append(f"Rule {i + 1}: {RULES[i % len(RULES)]}")
        i += 1
    return "\n".join(lines) + "\n\nQuestion: "


def run_waves(engine, waves: list[list[tuple[str, object]]], new_tokens: int) -> tuple[list[float], float]:
    """Each wave added at once and stepped to its end; (every request's TTFT in s, tokens/s)."""
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)
    ttfts, generated = [], 0
    start = time.perf_counter()
    for w, wave in enumerate(waves):
        for i, (prompt, lora) in enumerate(wave):
            engine.add_request(f"w{w}-{i}-{time.monotonic_ns()}", prompt, params, lora_request=lora)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    ttfts.append(out.metrics["first_token_time"] - out.metrics["arrival_time"])
                    generated += len(out.outputs[0].token_ids)
    return ttfts, generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--waves", type=int, default=6)
    parser.add_argument("--wave", type=int, default=10, help="requests per wave")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loraplex-bench-adapters"))
    args = parser.parse_args()

    from loraplex import EngineArgs, LLMEngine, LoRARequest
    from loraplex.model_loader import embedded_model_dir

    base_dir = str(embedded_model_dir())
    paths = make_adapters(base_dir, args.workdir, max(args.adapters, 1))[: args.adapters]
    loras = [None] + [LoRARequest(f"adapter-{i}", i + 1, str(p)) for i, p in enumerate(paths)]
    engines = {}
    for caching in (False, True):
        gc.collect()
        engines[caching] = LLMEngine.from_engine_args(EngineArgs(
            base_dir, device="cpu", enable_lora=True, max_loras=len(paths), max_cpu_loras=len(paths),
            max_lora_rank=16, max_model_len=1024, kv_cache_memory_bytes=384 << 20, enable_prefix_caching=caching))
    system = system_prompt(engines[True].tokenizer, args.system_tokens)
    questions = benchmark_prompts(args.waves * args.wave)
    waves = [[(system + questions[w * args.wave + i], loras[i % len(loras)]) for i in range(args.wave)]
             for w in range(args.waves)]
    prompt_tokens = len(engines[True].tokenizer.encode(waves[0][0][0]))
    # warm-up: every adapter loaded, kernels primed; a different system prompt, so nothing is cached for the runs
    warm = [[("Warm-up. " + q, lora) for q, lora in zip(questions, loras)]]
    for engine in engines.values():
        run_waves(engine, warm, 2)

    results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}  # (mean TTFT, median TTFT, tok/s)
    for r in range(args.rounds):
        for caching in ((False, True) if r % 2 == 0 else (True, False)):
            engines[caching].reset_prefix_cache()  # each round starts cold
            ttfts, tps = run_waves(engines[caching], waves, args.new_tokens)
            results[caching].append((statistics.mean(ttfts), statistics.median(ttfts), tps))
            label = "on " if caching else "off"
            print(f"round {r + 1} prefix caching {label}: mean TTFT {statistics.mean(ttfts) * 1e3:7.1f} ms, "
                  f"median {statistics.median(ttfts) * 1e3:7.1f} ms, {tps:6.1f} tok/s", flush=True)
    stats = engines[True].scheduler.prefix_cache
    print(f"\n{args.waves} waves x {args.wave} requests over {len(paths)} adapters + base, "
          f"prompts of ~{prompt_tokens} tokens ({args.system_tokens}-token system prompt), "
          f"{args.new_tokens} new tokens each; prefix cache hit rate {stats.hits / max(stats.queries, 1):.1%}")
    print("| prefix caching | mean TTFT (ms) | median TTFT (ms) | tok/s |")
    print("| --- | --- | --- | --- |")
    for caching in (False, True):
        best = min(results[caching]), min(r[1] for r in results[caching]), max(r[2] for r in results[caching])
        print(f"| {'on' if caching else 'off'} | {best[0][0] * 1e3:.1f} | {best[1] * 1e3:.1f} | {best[2]:.1f} |")
    ttft_ratio = statistics.median(off[0] / on[0] for off, on in zip(results[False], results[True]))
    tps_ratio = statistics.median(on[2] / off[2] for off, on in zip(results[False], results[True]))
    print(f"mean TTFT {ttft_ratio:.2f}x lower with prefix caching (target >= 3x: {'met' if ttft_ratio >= 3 else 'missed'}); "
          f"throughput {tps_ratio:.2f}x")


if __name__ == "__main__":
    main()
