"""Image and text requests over several adapters: loraplex against transformers + PEFT, in one run.

The model is a small LLaVA built offline (`loraplex.testing.llava.tiny_llava_model`, scaled up:
CLIP tower of `--vision-layers` x `--vision-hidden`, `--image-size` images in 8x8 patches, a
Llama decoder of `--layers` x `--hidden`), with `--adapters` PEFT adapters of rank 16 on every
linear of the tower, the projector and the language model. The work: `--requests` prompts, every
other one with an image (each its own), spread over the adapters and the base model, `--new-tokens`
greedy tokens each.

* PEFT: one left-padded `generate` per adapter (and one for the base model) over that adapter's
  requests, images and text mixed (PEFT's mixed-batch `adapter_names` cannot serve LLaVA: the
  tower sees one row per image, not per request);
* loraplex: `LLM.generate` over the same prompts, images and adapters.

Both run the same work `--repeats` times, alternating; the best run of each is kept and the
ratio of their throughputs (generated tokens per second) printed, with how many requests'
greedy tokens agree (the two compute in a different order, so a near-tie may differ).
Run: `python benchmarks/bench_multimodal.py` (CPU; `--device cuda` on a GPU).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

QUESTIONS = ["What is in the picture?", "Describe the colours.", "Is it day or night?", "Count the objects."]
TEXTS = ["Tell me about the sea.", "Write a short poem.", "What is a LoRA adapter?", "Name three rivers."]


def build(workdir: Path, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from loraplex.testing.adapters import randomize_lora_weights
    from loraplex.testing.llava import tiny_llava_model

    model_dir = tiny_llava_model(workdir / "llava", "llama", image_size=args.image_size, hidden_size=args.hidden,
                                 num_hidden_layers=args.layers, vision_hidden_size=args.vision_hidden,
                                 vision_layers=args.vision_layers)
    adapters = []
    targets = r".*\.(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2|linear_1|linear_2)"
    for i in range(args.adapters):
        base = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
            randomize_lora_weights(model, i + 1, b_std=0.05)
            model.save_pretrained(str(workdir / f"adapter{i}"))
        adapters.append(workdir / f"adapter{i}")
    return model_dir, adapters


def work(requests: int, adapters: int, image_size: int) -> list[tuple[str, object, int | None]]:
    """(prompt, image or None, adapter index or None) for each request."""
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i in range(requests):
        adapter = None if i % (adapters + 1) == adapters else i % (adapters + 1)
        if i % 2 == 0:
            pixels = rng.integers(0, 255, (image_size + 8, image_size + 16, 3), dtype=np.uint8)
            items.append((f"USER: <image>\n{QUESTIONS[i % 4]} ASSISTANT:", Image.fromarray(pixels), adapter))
        else:
            items.append((f"USER: {TEXTS[i % 4]} ASSISTANT:", None, adapter))
    return items


def run_peft(model_dir: Path, adapters: list[Path], items, new_tokens: int, device: str):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(model_dir), backend="pil")
    processor.tokenizer.padding_side = "left"
    base = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
        for i, path in enumerate(adapters[1:], start=1):
            model.load_adapter(str(path), adapter_name=f"a{i}")
    model = model.to(device).eval()
    groups: dict[int | None, list[int]] = {}
    for index, (_, _, adapter) in enumerate(items):
        groups.setdefault(adapter, []).append(index)
    batches = []
    for adapter, indices in groups.items():
        images = [items[i][1] for i in indices if items[i][1] is not None]
        inputs = processor(text=[items[i][0] for i in indices], images=images or None, return_tensors="pt",
                           padding=True).to(device)
        batches.append((adapter, indices, inputs))
    options = dict(do_sample=False, pad_token_id=2, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def once() -> tuple[float, list[list[int]]]:
        tokens: list[list[int]] = [[] for _ in items]
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            for adapter, indices, inputs in batches:
                if adapter is None:
                    with model.disable_adapter():
                        out = model.generate(**inputs, **options)
                else:
                    model.set_adapter(f"a{adapter}")
                    out = model.generate(**inputs, **options)
                for i, row in zip(indices, out[:, inputs["input_ids"].shape[1]:].tolist()):
                    tokens[i] = row
            elapsed = time.perf_counter() - start
        return elapsed, tokens

    once()  # warm-up
    return once


def run_loraplex(model_dir: Path, adapters: list[Path], items, new_tokens: int, device: str):
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(str(model_dir), device=device, dtype="float32", enable_lora=True, max_loras=len(adapters),
              max_lora_rank=16, kv_cache_memory_bytes=256 << 20, max_model_len=512)
    prompts = [{"prompt": p, "multi_modal_data": {"image": image}} if image is not None else p for p, image, _ in items]
    loras = [None if a is None else LoRARequest(f"a{a}", a + 1, str(adapters[a])) for _, _, a in items]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)

    def once() -> tuple[float, list[list[int]]]:
        llm.llm_engine.reset_prefix_cache()  # every run computes every prompt
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]

    once()  # warm-up: adapters into slots, kernels built
    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loraplex-bench-multimodal"))
    args = parser.parse_args()

    model_dir, adapters = build(args.workdir, args)
    items = work(args.requests, args.adapters, args.image_size)
    runners = {"transformers+PEFT": run_peft(model_dir, adapters, items, args.new_tokens, args.device),
               "loraplex": run_loraplex(model_dir, adapters, items, args.new_tokens, args.device)}
    best: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    for round_index in range(args.repeats):
        order = list(runners) if round_index % 2 == 0 else list(reversed(runners))
        for name in order:
            elapsed, tokens[name] = runners[name]()
            best[name] = min(best.get(name, float("inf")), elapsed)
    generated = args.requests * args.new_tokens
    images = sum(1 for _, image, _ in items if image is not None)
    print(f"{args.requests} requests ({images} with an image, {args.requests - images} text only) over "
          f"{args.adapters} adapters + base, {args.new_tokens} tokens each, device {args.device}, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:<18} {seconds:8.3f} s  {generated / seconds:9.1f} tokens/s")
    agree = sum(a == b for a, b in zip(tokens["loraplex"], tokens["transformers+PEFT"]))
    print(f"  loraplex / transformers+PEFT throughput: {best['transformers+PEFT'] / best['loraplex']:.2f}x; "
          f"greedy tokens agree on {agree}/{args.requests} requests")


if __name__ == "__main__":
    main()
