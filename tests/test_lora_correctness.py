"""LoRA outputs against PEFT as the oracle.

PEFT (`PeftModel.from_pretrained` on the same `transformers` base model) runs each adapter alone;
loraplex runs one batch that mixes base-model prompts with prompts for several adapters. Every
prompt's greedy tokens must be PEFT's greedy tokens with its adapter, and with `logprobs=20` the
top-20 log-probabilities of every step must equal log_softmax of PEFT's logits for the same token
sequence within LOGPROB_ATOL (float32 on both sides: 1e-4 on the tiny models, 2e-4 on the
30-layer embedded model).

The adapters cover the PEFT config features loraplex serves: `target_modules` as a list, as
"all-linear" and as a regex string, `use_rslora`, `rank_pattern` + `alpha_pattern`,
`layers_to_transform`, and ranks from 2 to 16 (max_lora_rank 16) in one batch. Their A and B are
drawn at random (PEFT's zero B would make them no-ops), and every adapter is checked to move the
output. Also: fewer device slots (max_loras) and CPU cache entries (max_cpu_loras) than adapters in
use, so adapters are swapped in and out of slots and reloaded from disk mid-run; a `.bin` adapter;
a plain-string lora_request naming a local directory.
"""

from __future__ import annotations

import mmap
import shutil

import pytest
import torch

from lora_helpers import (
    LOGPROB_ATOL,
    PeftOracle,
    assert_adapters_matter,
    assert_matches_oracle,
    greedy,
    lora_llm,
    make_adapter,
)
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex import LLM, LoRARequest
from loraplex import huge_pages
from tiny_models import EMBEDDED_KV_BYTES, PROMPTS, load_hf, tiny  # noqa: F401

NUM_TOKENS = 8
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> PEFT LoraConfig options; ranks 2..16, every config feature loraplex serves
TINY_ADAPTERS: dict[str, dict] = {
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"]),
    "patterns": dict(r=8, lora_alpha=8, target_modules=ALL_MODULES,
                     rank_pattern={"o_proj": 2, "layers.1.self_attn.q_proj": 12},
                     alpha_pattern={"down_proj": 24, "v_proj": 2}),
    "regex": dict(r=6, lora_alpha=6, target_modules=r".*\.layers\.[01]\.(self_attn\.(q|v)_proj|mlp\.up_proj)"),
    "layers": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                   layers_to_transform=[1]),
}


class AdapterSet:
    """Adapters written for one base model, their LoRARequests, and the PEFT oracle over them."""

    def __init__(self, model_path, root, specs: dict[str, dict], b_std: float = 0.1) -> None:
        base = load_hf(model_path)
        self.paths = {}
        for seed, (name, options) in enumerate(specs.items()):
            self.paths[name] = make_adapter(base, root / name, seed=100 + seed, b_std=b_std, **options)
        self.requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(self.paths.items())}
        self.oracle = PeftOracle(base, self.paths)


def _mixed(prompts: list[str], names: list[str | None]) -> tuple[list[str], list[str | None]]:
    """Every prompt with every lane (None = base model), interleaved so adapters alternate."""
    pairs = [(prompt, name) for prompt in prompts for name in names]
    return [p for p, _ in pairs], [n for _, n in pairs]


@pytest.fixture(scope="module")
def llama_adapters(tiny, tmp_path_factory) -> AdapterSet:
    return AdapterSet(tiny.path("llama"), tmp_path_factory.mktemp("llama_adapters"), TINY_ADAPTERS)


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "qwen3"])
def test_mixed_batch_matches_peft(tiny, tmp_path_factory, variant: str) -> None:
    """Base prompts and six adapters (ranks 2-16, every config feature) in one batch."""
    adapters = AdapterSet(tiny.path(variant), tmp_path_factory.mktemp(f"{variant}_adapters"), TINY_ADAPTERS)
    llm = lora_llm(tiny.path(variant), max_loras=len(TINY_ADAPTERS), max_lora_rank=16)
    assert_adapters_matter(adapters.oracle, list(TINY_ADAPTERS), llm.get_tokenizer().encode(PROMPTS[1]))
    prompts, names = _mixed(PROMPTS, [None, *TINY_ADAPTERS])
    loras = [adapters.requests[n] if n else None for n in names]
    outputs = llm.generate(prompts, greedy(NUM_TOKENS), use_tqdm=False, lora_request=loras)
    assert_matches_oracle(outputs, names, adapters.oracle, LOGPROB_ATOL["tiny"])
    for out, name in zip(outputs, names):
        assert out.lora_request == (adapters.requests[name] if name else None)
    # the adapters are not no-ops on the engine's side either: each changes some prompt's tokens
    base_tokens = {o.prompt: o.outputs[0].token_ids for o, n in zip(outputs, names) if n is None}
    for name in TINY_ADAPTERS:
        changed = [o.outputs[0].token_ids != base_tokens[o.prompt] for o, n in zip(outputs, names) if n == name]
        assert any(changed), f"adapter {name!r} produced the base model's tokens for every prompt"


@pytest.mark.parametrize(("max_loras", "max_cpu_loras"), [(1, 1), (2, 3)])
def test_fewer_slots_and_cpu_entries_than_adapters_stays_exact(llama_adapters, tiny, max_loras, max_cpu_loras) -> None:
    """Six adapters through max_loras slots and max_cpu_loras CPU entries: swapped, reloaded, exact."""
    llm = lora_llm(tiny.path("llama"), max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=16)
    manager = llm.llm_engine.lora_manager
    lanes = [None, *TINY_ADAPTERS]
    prompts, names = _mixed(PROMPTS[:2], lanes)
    loras = [llama_adapters.requests[n] if n else None for n in names]
    outputs = llm.generate(prompts, greedy(NUM_TOKENS), use_tqdm=False, lora_request=loras)
    assert_matches_oracle(outputs, names, llama_adapters.oracle, LOGPROB_ATOL["tiny"])
    # a second round in the opposite order: the adapters that ran first must come back into a slot
    prompts, names = _mixed(PROMPTS[2:], lanes[::-1])
    loras = [llama_adapters.requests[n] if n else None for n in names]
    outputs = llm.generate(prompts, greedy(NUM_TOKENS), use_tqdm=False, lora_request=loras)
    assert_matches_oracle(outputs, names, llama_adapters.oracle, LOGPROB_ATOL["tiny"])

    stats = manager.stats
    assert sum(s.activations for s in stats.values()) > len(TINY_ADAPTERS), "no adapter was swapped back into a slot"
    assert sum(s.evictions for s in stats.values()) > 0
    assert sum(s.loads for s in stats.values()) > len(TINY_ADAPTERS), "no adapter was reloaded from disk"
    assert len(manager.cpu_cache) <= max_cpu_loras
    assert len([s for s in manager.slots if s is not None]) <= max_loras
    assert not any(manager.in_use.values())


@pytest.mark.parametrize("lora_dtype", ["bfloat16", "float16"])
def test_lora_dtype_keeps_16_bit_adapters_exact(tiny, tmp_path, lora_dtype: str) -> None:
    """lora_dtype: adapters kept in 16 bits on a float32 model (half the bytes a LoRA step reads).
    For adapters whose weights are 16-bit values (trained in 16 bits) and whose scaling is a
    power of two, nothing is rounded: PEFT's float32 tokens and log-probabilities, to float32's
    tolerance. (Other weights are rounded to the nearest 16-bit value: see docs/operator-guide.md.)"""
    dtype = getattr(torch, lora_dtype)
    specs = {name: TINY_ADAPTERS[name] for name in ("plain", "all_linear", "rslora", "regex", "layers")}
    base = load_hf(tiny.path("llama"))
    paths = {
        name: make_adapter(base, tmp_path / name, seed=200 + i, values_of=dtype, **options)
        for i, (name, options) in enumerate(specs.items())
    }
    oracle = PeftOracle(base, paths)
    llm = lora_llm(tiny.path("llama"), max_loras=len(specs), max_lora_rank=16, lora_dtype=lora_dtype)
    manager = llm.llm_engine.lora_manager
    assert manager.storage.dtype == dtype
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(paths.items())}
    prompts, names = _mixed(PROMPTS, [None, *specs])
    loras = [requests[n] if n else None for n in names]
    outputs = llm.generate(prompts, greedy(NUM_TOKENS), use_tqdm=False, lora_request=loras)
    assert_matches_oracle(outputs, names, oracle, LOGPROB_ATOL["tiny"])
    assert all(adapter.image.dtype == dtype for adapter in manager.cpu_cache.values())


def test_bin_adapter_matches_safetensors_and_peft(llama_adapters, tiny, tmp_path) -> None:
    """An adapter_model.bin (torch.save of the state dict, read with weights_only) serves the same."""
    from safetensors.torch import load_file

    source = llama_adapters.paths["patterns"]
    bin_dir = tmp_path / "patterns_bin"
    bin_dir.mkdir()
    shutil.copy2(source / "adapter_config.json", bin_dir / "adapter_config.json")
    torch.save(load_file(str(source / "adapter_model.safetensors")), bin_dir / "adapter_model.bin")
    llm = lora_llm(tiny.path("llama"), max_loras=2, max_lora_rank=16)
    as_bin = LoRARequest("patterns_bin", 1, str(bin_dir))
    prompts = PROMPTS[:3]
    outputs = llm.generate(prompts, greedy(NUM_TOKENS), use_tqdm=False, lora_request=as_bin)
    assert_matches_oracle(outputs, ["patterns"] * 3, llama_adapters.oracle, LOGPROB_ATOL["tiny"])
    from_safetensors = llm.generate(prompts, greedy(NUM_TOKENS), use_tqdm=False,
                                    lora_request=LoRARequest("patterns", 2, str(source)))
    for a, b in zip(outputs, from_safetensors):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-5)


def test_string_lora_request_naming_a_local_directory(llama_adapters, tiny) -> None:
    llm = lora_llm(tiny.path("llama"), max_loras=2, max_lora_rank=16)
    path = str(llama_adapters.paths["rslora"])
    outputs = llm.generate(PROMPTS[:2], greedy(NUM_TOKENS), use_tqdm=False, lora_request=path)
    assert_matches_oracle(outputs, ["rslora"] * 2, llama_adapters.oracle, LOGPROB_ATOL["tiny"])
    engine = llm.llm_engine
    assert engine.list_loras() == {1}
    assert outputs[0].lora_request.lora_path == path
    # the same string again is the adapter now registered under that name, not a new one
    again = llm.generate(PROMPTS[2:3], greedy(NUM_TOKENS), use_tqdm=False, lora_request=path)
    assert_matches_oracle(again, ["rslora"], llama_adapters.oracle, LOGPROB_ATOL["tiny"])
    assert engine.list_loras() == {1}
    assert engine.lora_manager.stats[path].loads == 1
    # and mixed with a LoRARequest and the base model in one call
    plain = llama_adapters.requests["plain"]
    plain = LoRARequest(plain.lora_name, 2, plain.lora_path)
    outputs = llm.generate(PROMPTS[:3], greedy(NUM_TOKENS), use_tqdm=False, lora_request=[path, None, plain])
    assert_matches_oracle(outputs, ["rslora", None, "plain"], llama_adapters.oracle, LOGPROB_ATOL["tiny"])


# ---- the embedded SmolLM2-135M-Instruct ----------------------------------------------------------

EMBEDDED_ADAPTERS: dict[str, dict] = {
    "all_linear_r4": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora_r16": dict(r=16, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "patterns_r8": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 4},
                        layers_to_transform=list(range(0, 30, 3))),
    "regex_r6": dict(r=6, lora_alpha=12, target_modules=r".*\.layers\.(1?[0-9])\.(self_attn\.v_proj|mlp\.up_proj)"),
}
EMBEDDED_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def test_embedded_model_mixed_batch_matches_peft(embedded_model_path, tmp_path) -> None:
    adapters = AdapterSet(embedded_model_path, tmp_path, EMBEDDED_ADAPTERS, b_std=0.05)
    llm = LLM(str(embedded_model_path), enable_lora=True, max_loras=len(EMBEDDED_ADAPTERS), max_lora_rank=16,
              dtype="float32", kv_cache_memory_bytes=EMBEDDED_KV_BYTES, max_model_len=256)
    prompt_ids = llm.get_tokenizer().encode(EMBEDDED_PROMPTS[0])
    assert_adapters_matter(adapters.oracle, list(EMBEDDED_ADAPTERS), prompt_ids)
    prompts, names = _mixed(EMBEDDED_PROMPTS, [None, *EMBEDDED_ADAPTERS])
    loras = [adapters.requests[n] if n else None for n in names]
    outputs = llm.generate(prompts, greedy(6), use_tqdm=False, lora_request=loras)
    assert_matches_oracle(outputs, names, adapters.oracle, LOGPROB_ATOL["embedded"])
    if hasattr(mmap, "MADV_HUGEPAGE"):  # the slots the kernel read are the huge-page buffers (test_huge_pages)
        assert llm.llm_engine.lora_manager.storage.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
