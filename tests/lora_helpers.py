"""Helpers for the LoRA tests: PEFT adapters with non-zero weights, and PEFT as the oracle.

* `make_adapter(base, out_dir, seed=..., **LoraConfig options)` wraps a `transformers` model with
  PEFT's `get_peft_model`, draws A and B from a seeded normal distribution (PEFT initialises B to
  zero, which would make every adapter a no-op), writes the adapter with `save_pretrained` and
  unwraps the model again, so one base model makes any number of adapters.
* `PeftOracle(base, {name: dir})` loads every adapter into one `PeftModel`
  (`PeftModel.from_pretrained` + `load_adapter`); `logprobs(name, ids)` is log_softmax of PEFT's
  logits with that adapter alone active (None: adapters disabled, the base model).
* `assert_matches_oracle(outputs, names, oracle)` checks loraplex's greedy tokens and its top-20
  log-probabilities of every step against the oracle run on the same token sequence.

PEFT itself warns about several things (deprecated transformers properties, LoRA bias on layers
without bias, ...); those warnings come from the oracle, not from loraplex, so they are silenced
around PEFT calls only.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from tiny_models import TINY_KV_BYTES, TINY_MAX_MODEL_LEN

# float32 on both sides; measured worst cases: tiny models ~2e-5, the 30-layer embedded model ~6e-5
LOGPROB_ATOL = {"tiny": 1e-4, "embedded": 2e-4}
# a step whose two best candidates are closer than this is a near-tie in the fixture, not a bug
MIN_MARGIN = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run the importing test module with one intra-op thread, then restore the setting.

    The test machine has 2 cores shared with other jobs; torch's 2-thread kernels then stall for a
    scheduler time slice whenever one of their threads is descheduled. Measured on these tests
    under such load: ~8x slower with 2 threads than with 1 (e.g. 36 s vs 1.6 s for one test).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@contextmanager
def quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def make_adapter(base: torch.nn.Module, out_dir: Path, *, seed: int, a_std: float | None = None,
                 b_std: float = 0.1, values_of: torch.dtype | None = None, **config: Any) -> Path:
    """Write a PEFT LoRA adapter for `base` into `out_dir` with seeded non-zero A and B.

    A ~ N(0, a_std) (default 1/sqrt(in_features), so x·Aᵀ is about as large as x) and
    B ~ N(0, b_std): the adapter visibly changes the output without swamping the base model.
    `values_of`: round the weights to values that dtype holds exactly (saved as float32), as
    an adapter trained in 16 bits has.
    """
    from peft import LoraConfig, get_peft_model

    from loraplex.testing.adapters import randomize_lora_weights

    with quiet_peft():
        model = get_peft_model(base, LoraConfig(**config))
        randomize_lora_weights(model, seed, a_std=a_std, b_std=b_std)
        if values_of is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_" in name:
                        param.copy_(param.to(values_of))
        model.save_pretrained(str(out_dir))
        model.unload()
    return Path(out_dir)


class PeftOracle:
    """Every adapter loaded into one PeftModel on `base` (which it wraps in place)."""

    def __init__(self, base: torch.nn.Module, adapters: dict[str, Path]) -> None:
        from peft import PeftModel

        names = list(adapters)
        with quiet_peft():
            self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()

    @torch.inference_mode()
    def logprobs(self, adapter: str | None, token_ids: list[int]) -> torch.Tensor:
        """log_softmax of PEFT's logits at every position of `token_ids` [L, V]."""
        ids = torch.tensor([token_ids])
        with quiet_peft():
            if adapter is None:
                with self.model.disable_adapter():
                    logits = self.model(input_ids=ids).logits[0]
            else:
                self.model.set_adapter(adapter)
                logits = self.model(input_ids=ids).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)


def lora_llm(path: Path, **options: Any):
    """An LLM on a tiny model with LoRA enabled, float32 (the oracle's dtype) on any device."""
    from loraplex import LLM

    options = {"kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": TINY_MAX_MODEL_LEN,
               "dtype": "float32", "enable_lora": True, **options}
    return LLM(str(path), **options)


def lora_engine(path: Path, **options: Any):
    """An LLMEngine on a tiny model with LoRA enabled, float32, to be stepped by hand."""
    from loraplex import EngineArgs, LLMEngine

    options = {"kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": TINY_MAX_MODEL_LEN,
               "dtype": "float32", "enable_lora": True, **options}
    return LLMEngine.from_engine_args(EngineArgs(model=str(path), **options))


def greedy(num_tokens: int, logprobs: int | None = 20):
    from loraplex import SamplingParams

    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=num_tokens, logprobs=logprobs)


def assert_matches_oracle(outputs, names: list[str | None], oracle: PeftOracle, atol: float,
                          check_logprobs: bool = True) -> None:
    """Each output (greedy) equals PEFT with adapter `names[i]` alone: tokens, and top-20 logprobs."""
    assert len(outputs) == len(names)
    for out, name in zip(outputs, names):
        completion = out.outputs[0]
        prompt_len = len(out.prompt_token_ids)
        reference = oracle.logprobs(name, out.prompt_token_ids + completion.token_ids)  # [L, V]
        label = f"adapter {name!r}, prompt {out.prompt!r}"
        cumulative = 0.0
        for step, token in enumerate(completion.token_ids):
            row = reference[prompt_len - 1 + step]  # [V] the distribution this step sampled from
            top_values, top_ids = row.topk(21)
            margin = (top_values[0] - top_values[1]).item()
            assert margin > MIN_MARGIN, f"{label}: near-tie in the fixture at step {step} (margin {margin:.1e})"
            assert token == top_ids[0].item(), (
                f"{label}: step {step} token {token} is not PEFT's greedy token {top_ids[0].item()}; "
                f"loraplex {completion.token_ids}"
            )
            cumulative += row[token].item()
            if not check_logprobs:
                continue
            entry = completion.logprobs[step]
            assert len(entry) == 20, f"{label}: step {step} has {len(entry)} logprobs"
            ours = sorted(entry.items(), key=lambda item: item[1].rank)
            assert [lp.rank for _, lp in ours] == list(range(1, 21))
            if (top_values[19] - top_values[20]).item() > atol:
                assert {tid for tid, _ in ours} == set(top_ids[:20].tolist()), f"{label}: step {step} top-20 differs"
            for tid, lp in ours:
                assert lp.logprob == pytest.approx(row[tid].item(), abs=atol), (
                    f"{label}: step {step} token {tid}: logprob {lp.logprob:.6f}, PEFT's {row[tid].item():.6f}"
                )
        if check_logprobs:
            assert completion.cumulative_logprob == pytest.approx(cumulative, abs=atol * len(completion.token_ids))


def assert_adapters_matter(oracle: PeftOracle, names: list[str], prompt_ids: list[int], min_diff: float = 0.05) -> None:
    """Each adapter moves the next-token distribution (else matching PEFT would prove nothing)."""
    base = oracle.logprobs(None, prompt_ids)[-1]
    for name in names:
        diff = (oracle.logprobs(name, prompt_ids)[-1] - base).abs().max().item()
        assert diff > min_diff, f"adapter {name!r} barely changes the output (max |Δ logprob| = {diff:.2e})"


def edit_config(adapter_dir: Path, **changes: Any) -> None:
    """Rewrite fields of an adapter's adapter_config.json (a value of None deletes the field)."""
    file = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


class TinyAdapters:
    """`count` small adapters (ranks 2-8, different targets) for a tiny model, and their oracle."""

    SPECS = [
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"]),
        dict(r=6, lora_alpha=12, use_rslora=True, target_modules=["q_proj", "gate_proj"]),
        dict(r=8, lora_alpha=16, target_modules=["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        dict(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj"], layers_to_transform=[0]),
    ]

    def __init__(self, model_path: Path, root: Path, names: list[str]) -> None:
        from tiny_models import load_hf

        from loraplex import LoRARequest

        maker = load_hf(model_path)
        self.paths = {name: make_adapter(maker, Path(root) / name, seed=200 + i, **self.SPECS[i % len(self.SPECS)])
                      for i, name in enumerate(names)}
        self.requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(self.paths.items())}
        self.oracle = PeftOracle(load_hf(model_path), self.paths)


def step_until_done(engine, max_steps: int = 2000, on_step=None) -> dict[str, Any]:
    """Step the engine to the end, calling `on_step(step_index)` after every step; final outputs by id."""
    finished: dict[str, Any] = {}
    for index in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if on_step is not None:
            on_step(index)
    raise AssertionError(f"engine still has unfinished requests after {max_steps} steps")
