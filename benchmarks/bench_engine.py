"""Throughput of loraplex against transformers' batched `generate` on the embedded model (CPU, fp32).

Both generate exactly `--new-tokens` greedy tokens for the same prompts; tokens per second count
generated tokens over wall time (prefill included). Then the single stream against its floor: a
batch-1 decode step's time beside one plain read (`sum`) of every weight of the model where the
engine keeps it (the tied embedding once), alternating, so both see the memory bandwidth of the
moment, and beside a read of a plain copy of them (ordinary pages); then batch-1 steps with a
LoRA adapter (the demo `sql` adapter by default) and without, each as one native call and layer
by layer, alternating. Run: `python benchmarks/bench_engine.py`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from prompts import benchmark_prompts

DEMO_ADAPTER = Path(__file__).resolve().parents[1] / "examples" / "adapters" / "SmolLM2-135M-Instruct" / "sql"


def bench_transformers(model_dir: str, prompts: list[str], new_tokens: int) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        elapsed = time.perf_counter() - start
    tokens = out[:, enc.input_ids.shape[1]:].tolist()
    return len(prompts) * new_tokens / elapsed, tokens


def bench_loraplex(llm, prompts: list[str], new_tokens: int) -> tuple[float, list[list[int]]]:
    from loraplex import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)  # as min_new_tokens
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return len(prompts) * new_tokens / elapsed, [o.outputs[0].token_ids for o in outs]


def decode_floor(llm, rounds: int, steps: int = 16) -> tuple[float, float, float, int]:
    """(median ms of a batch-1 decode step, of one read of all weights where the engine keeps them,
    of one read of a plain copy of them (4 KiB pages unless THP is "always"), weight bytes)."""
    from loraplex import SamplingParams

    engine = llm.llm_engine
    # the weights where they live (one huge-page mapping on a CPU), each storage read once as one
    # stream: the read, with no per-operation cost; tied tensors share a storage
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage() for p in engine.model.parameters()}
    views = [torch.empty(0, dtype=torch.float32).set_(s, 0, (s.nbytes() // 4,)) for s in storages.values()]
    nbytes = sum(v.numel() * 4 for v in views)
    plain = torch.cat(views)  # [all weights] ordinary memory
    engine.add_request("floor", "Explain why the sky is blue.",
                       SamplingParams(temperature=0.0, max_tokens=(rounds + 1) * steps + 2, ignore_eos=True))
    for _ in range(steps):  # the prefill, then warm decode steps
        engine.step()
    step_ms, read_ms, plain_ms = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_ms.append((time.perf_counter() - start) / steps * 1e3)
        start = time.perf_counter()
        for view in views:
            view.sum()
        read_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        plain.sum()
        plain_ms.append((time.perf_counter() - start) * 1e3)
    engine.abort_request("floor")
    return statistics.median(step_ms), statistics.median(read_ms), statistics.median(plain_ms), nbytes


def single_stream(model_dir: str, adapter: str, rounds: int, steps: int = 30) -> dict[tuple[str, str], float]:
    """Median ms of a batch-1 decode step, (base or with `adapter`, one-call step or layer by
    layer) -> ms, the four alternating in each round."""
    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.models.decode_step import NativeDecodeStep

    engine = LLM(model_dir, device="cpu", dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=64).llm_engine
    lora = LoRARequest("adapter", 1, adapter)
    serves = NativeDecodeStep.serves
    cases = [(kind, path) for kind in ("base", "adapter") for path in ("one call", "layers")]
    times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    try:
        for r in range(rounds):
            for kind, path in cases if r % 2 == 0 else cases[::-1]:
                NativeDecodeStep.serves = serves if path == "one call" else lambda *args: False
                engine.add_request(f"{kind}-{path}-{r}", "Explain why the sky is blue.",
                                   SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True),
                                   lora_request=lora if kind == "adapter" else None)
                for _ in range(4):  # the prefill, then warm decode steps
                    engine.step()
                start = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                times[kind, path].append((time.perf_counter() - start) / steps * 1e3)
                while engine.has_unfinished_requests():
                    engine.step()
    finally:
        NativeDecodeStep.serves = serves
    return {case: statistics.median(ms) for case, ms in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--floor-rounds", type=int, default=10, help="rounds of the single-stream floor (0: skip)")
    parser.add_argument("--adapter", default=str(DEMO_ADAPTER),
                        help="a PEFT adapter for the single stream with an adapter ('' to skip)")
    args = parser.parse_args()

    from loraplex import LLM
    from loraplex.model_loader import embedded_model_dir

    model_dir = str(embedded_model_dir())
    llm = LLM(model_dir, device="cpu", dtype="float32")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'prompts':>8} {'transformers tok/s':>19} {'loraplex tok/s':>15} {'ratio':>6} {'same greedy tokens':>19}")
    for n in args.batches:
        prompts = benchmark_prompts(n)
        hf_tps, hf_tokens = bench_transformers(model_dir, prompts, args.new_tokens)
        lp_tps, lp_tokens = bench_loraplex(llm, prompts, args.new_tokens)
        same = sum(a == b for a, b in zip(hf_tokens, lp_tokens))
        print(f"{n:>8} {hf_tps:>19.1f} {lp_tps:>15.1f} {lp_tps / hf_tps:>5.2f}x {same:>12}/{n}")
    if args.floor_rounds:
        step_ms, read_ms, plain_ms, nbytes = decode_floor(llm, args.floor_rounds)
        print(f"batch-1 decode step {step_ms:.2f} ms; one read of all weights ({nbytes / 1e6:.0f} MB) {read_ms:.2f} ms "
              f"({nbytes / read_ms / 1e6:.1f} GB/s; a plain copy of them: {plain_ms:.2f} ms); step / read "
              f"{step_ms / read_ms:.2f}; load {os.getloadavg()[0]:.1f}")
    if args.adapter and args.floor_rounds:
        ms = single_stream(model_dir, args.adapter, args.floor_rounds)
        for kind in ("base", "adapter"):
            print(f"batch-1 decode step, {'with the adapter' if kind == 'adapter' else 'base model'}: one call "
                  f"{ms[kind, 'one call']:.2f} ms, layer by layer {ms[kind, 'layers']:.2f} ms (alternating)")
        print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
