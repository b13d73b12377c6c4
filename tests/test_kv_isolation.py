"""Nothing left in the paged KV cache reaches another request, whatever it holds.

Decode attention gathers whole blocks: the padding entries of a batch's block table (block 0,
which another sequence may own), the tail of each sequence's last block, and the blocks an
earlier request freed all come along. These tests put NaN, ±Inf and huge finite values (1e30,
float32's largest) there and check that every request still gets exactly the tokens and
log-probabilities of an uncontaminated run and of transformers / PEFT:

* the whole cache filled with a poison value before a batch of base-model and adapter requests;
* a hostile request (an adapter whose B weights are 1e30: finite, so it loads, but its requests
  overflow to Inf and NaN) decoding next to base and adapter requests, aborted mid-run, its
  adapter removed, and its freed blocks reused by the next batch.

Each runs on a tiny Llama and on a tiny Mistral (every layer a sliding window of 8 tokens, so
decode also masks keys outside the window).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers import LOGPROB_ATOL, PeftOracle, assert_matches_oracle, greedy, lora_engine, make_adapter, step_until_done
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex import LoRARequest, SamplingParams
from tiny_models import PROMPTS, load_hf, tiny  # noqa: F401

NUM_TOKENS = 8
LANES = [None, "alpha", "beta"]  # None: the base model
HOSTILE_B = 1e30  # times the scaling 2: finite in float32, infinite once it meets an activation


class Served:
    """One LoRA engine on a tiny model, two good adapters, a hostile one, and the PEFT oracle."""

    def __init__(self, model_path: Path, root: Path) -> None:
        maker = load_hf(model_path)
        paths = {
            "alpha": make_adapter(maker, root / "alpha", seed=11, r=8, lora_alpha=16, target_modules="all-linear"),
            "beta": make_adapter(maker, root / "beta", seed=12, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        }
        self.requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(paths.items())}
        hostile = root / "hostile"
        shutil.copytree(paths["alpha"], hostile)
        weights = load_file(str(hostile / "adapter_model.safetensors"))
        save_file({key: t.fill_(HOSTILE_B) if ".lora_B." in key else t for key, t in weights.items()},
                  str(hostile / "adapter_model.safetensors"))
        self.hostile = LoRARequest("hostile", 9, str(hostile))
        self.oracle = PeftOracle(load_hf(model_path), paths)
        self.engine = lora_engine(model_path, max_loras=3, max_cpu_loras=3, max_lora_rank=8)
        self._ids = iter(range(10**9))
        self.fill(0.0)
        self.clean = self.run_lanes()  # the uncontaminated run
        assert_matches_oracle(self.clean, self.lane_names(), self.oracle, LOGPROB_ATOL["tiny"])

    def fill(self, value: float) -> None:
        for keys, values in self.engine.kv_cache.layers:
            keys.fill_(value)
            values.fill_(value)
        self.engine.reset_prefix_cache()  # the cached blocks' K/V were just overwritten

    def cache_holds(self, value: float) -> bool:
        found = (lambda t: t.isnan().any()) if value != value else (lambda t: (t == value).any())
        return any(bool(found(k) or found(v)) for k, v in self.engine.kv_cache.layers)

    def cache_is_finite(self) -> bool:
        return all(bool(torch.isfinite(k).all() and torch.isfinite(v).all()) for k, v in self.engine.kv_cache.layers)

    @staticmethod
    def lane_names() -> list[str | None]:
        return [name for _ in PROMPTS for name in LANES]

    def add(self, prompt: str, name: str | None, params: SamplingParams | None = None) -> str:
        request_id = f"req-{next(self._ids)}"
        lora = self.requests[name] if name else None
        self.engine.add_request(request_id, prompt, params or greedy(NUM_TOKENS), lora_request=lora)
        return request_id

    def run_lanes(self) -> list:
        """Every prompt in every lane (base, alpha, beta), in one batch of prompts of 4 to ~30 tokens."""
        ids = [self.add(prompt, name) for prompt in PROMPTS for name in LANES]
        finished = step_until_done(self.engine)
        return [finished[i] for i in ids]

    def assert_exact(self, outputs: list) -> None:
        """Tokens and logprobs of the uncontaminated run, and PEFT's / transformers'."""
        assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in self.clean]
        assert_matches_oracle(outputs, self.lane_names(), self.oracle, LOGPROB_ATOL["tiny"])
        assert not self.engine.has_unfinished_requests()


@pytest.fixture(scope="module", params=["llama", "mistral"])
def served(request, tiny, tmp_path_factory) -> Served:
    return Served(tiny.path(request.param), tmp_path_factory.mktemp(f"kv_isolation_{request.param}"))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf"), 1e30, torch.finfo(torch.float32).max],
                         ids=["nan", "inf", "-inf", "1e30", "float32_max"])
def test_a_poisoned_cache_never_reaches_a_request(served: Served, poison: float) -> None:
    served.fill(poison)
    served.assert_exact(served.run_lanes())
    assert served.cache_holds(poison)  # the poison is still there, in positions nobody may read
    # the same blocks again, now freed: each request's context overwritten, the rest still poisoned
    served.assert_exact(served.run_lanes())


def test_a_hostile_request_leaves_nothing_behind(served: Served) -> None:
    engine = served.engine
    served.fill(0.0)
    engine.add_lora(served.hostile)
    # first in, so its blocks start at block 0: the padding entry of every shorter sequence's block table
    hostile_id = f"hostile-{next(served._ids)}"
    engine.add_request(hostile_id, PROMPTS[2], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=64),
                       lora_request=served.hostile)
    neighbours = [served.add(PROMPTS[i], name) for i, name in ((0, None), (1, "alpha"), (3, "beta"), (0, "beta"))]
    finished: dict = {}
    for _ in range(4):  # prefill, then decodes side by side with the hostile request
        finished.update({out.request_id: out for out in engine.step() if out.finished})
    assert not served.cache_is_finite(), "the hostile adapter did not overflow; the test proves nothing"
    assert hostile_id not in finished
    engine.abort_request(hostile_id)  # mid-run: its blocks go back to the pool as they are
    finished.update(step_until_done(engine))
    assert_matches_oracle([finished[i] for i in neighbours], [None, "alpha", "beta", "beta"], served.oracle,
                          LOGPROB_ATOL["tiny"])
    assert engine.remove_lora("hostile") is True
    # the next batch reuses the freed blocks, NaN and Inf still in their unwritten positions
    served.assert_exact(served.run_lanes())
    assert not served.cache_is_finite()
