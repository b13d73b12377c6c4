"""An adapter's name keeps meaning the weights it was registered with; hostile files fail cleanly.

* Files changed on disk under a registered name: once the adapter is evicted from the CPU cache,
  reading it again finds the change (size, mtime, SHA-256 of adapter_config.json and of the
  weight file, recorded at registration) and refuses it, naming the adapter and the way to take
  the new files; other requests are served exactly as before. A rewrite that keeps the size and
  the modification time is found by the digest; a file merely touched is the same adapter.
* Values that fit float32 but not the adapters' storage dtype are refused like NaN / Inf (those
  are refused in test_lora_refusals).
* `adapter_problem`, the resolvers' check of a found directory, reads the config as the loader
  does: hostile JSON and over-long paths give a reason, never an exception.
* Generated configs and config files (hypothesis): a usable config or a loraplex error, never
  another exception.

The refusals of bad adapter files and configs at registration are in test_lora_refusals.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_helpers import LOGPROB_ATOL, PeftOracle, assert_matches_oracle, edit_config, greedy, lora_engine, make_adapter, step_until_done
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex import LoRARequest
from loraplex.errors import InvalidLoRAAdapterError, LoRAError
from loraplex.lora.adapter import load_adapter
from loraplex.lora.adapter_dir import adapter_problem
from loraplex.lora.peft_config import AdapterConfig, read_config_json
from tiny_models import PROMPTS, load_hf, tiny  # noqa: F401

SPEC = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
WEIGHTS = "adapter_model.safetensors"


class Adapters:
    """Adapter `A`, `A2` (A's config and shapes, other weights: what a retrained A looks like) and `B`."""

    def __init__(self, model_path: Path, root: Path) -> None:
        self.model_path = model_path
        maker = load_hf(model_path)
        self.sources = {
            "A": make_adapter(maker, root / "A", seed=51, **SPEC),
            "A2": make_adapter(maker, root / "A2", seed=52, **SPEC),
            "B": make_adapter(maker, root / "B", seed=53, r=8, lora_alpha=16, target_modules="all-linear"),
        }
        self.oracle = PeftOracle(load_hf(model_path), self.sources)


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> Adapters:
    return Adapters(tiny.path("llama"), tmp_path_factory.mktemp("hardening"))


class Served:
    """A fresh engine with one slot and one CPU cache entry; A (a copy we may damage) and B registered."""

    def __init__(self, adapters: Adapters, root: Path) -> None:
        self.adapters = adapters
        self.engine = lora_engine(adapters.model_path, max_loras=1, max_cpu_loras=1)
        self.a_dir = root / "served-A"
        shutil.copytree(adapters.sources["A"], self.a_dir)
        self.requests = {"A": LoRARequest("A", 1, str(self.a_dir)), "B": LoRARequest("B", 2, str(adapters.sources["B"]))}
        self._ids = iter(range(10**9))

    def run(self, names: list[str | None], oracle_names: list[str | None] | None = None) -> dict:
        """One request per name, to the end, checked against PEFT (with `oracle_names` if given)."""
        ids = []
        for i, name in enumerate(names):
            ids.append(f"r{next(self._ids)}")
            self.engine.add_request(ids[-1], PROMPTS[i % len(PROMPTS)], greedy(4),
                                    lora_request=self.requests[name] if name else None)
        finished = step_until_done(self.engine)
        assert_matches_oracle([finished[i] for i in ids], oracle_names or names, self.adapters.oracle, LOGPROB_ATOL["tiny"])
        return finished

    def evict_a(self) -> None:
        """Serve A, then B: with one CPU cache entry, A is evicted."""
        self.run(["A", None])
        self.run(["B"])
        assert "A" not in self.engine.lora_manager.cpu_cache

    def replace_a_weights_keeping_size_and_mtime(self) -> None:
        file = self.a_dir / WEIGHTS
        before = file.stat()
        shutil.copyfile(self.adapters.sources["A2"] / WEIGHTS, file)
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = file.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.fixture
def served(adapters, tmp_path) -> Served:
    return Served(adapters, tmp_path)


CHANGED = r"LoRA adapter 'A': its files in .* changed since it was registered \({}\).*load_inplace=true.*remove it and add it again"


def test_weights_rewritten_with_the_same_size_and_mtime_are_refused(served: Served) -> None:
    served.evict_a()
    served.replace_a_weights_keeping_size_and_mtime()
    with pytest.raises(LoRAError, match=CHANGED.format(r"adapter_model\.safetensors has other content "
                                                       r"\(same size \(\d+ bytes\), same modification time\)")):
        served.engine.add_request("changed", PROMPTS[0], greedy(4), lora_request=served.requests["A"])
    engine = served.engine
    assert "changed" not in engine.requests and not engine.has_unfinished_requests()
    assert "A" in engine.list_adapters() and "A" not in engine.lora_manager.cpu_cache
    served.run([None, "B"])  # everything else as before
    # the operator takes the new files: remove + add serves A2's weights under the name A
    assert engine.remove_lora("A") is True
    engine.add_lora(served.requests["A"])
    served.run(["A", None], oracle_names=["A2", None])


def test_a_changed_config_is_refused(served: Served) -> None:
    served.evict_a()
    edit_config(served.a_dir, lora_alpha=32)
    with pytest.raises(LoRAError, match=CHANGED.format(r"adapter_config\.json has other content \(\d+ -> \d+ bytes, modified\)")):
        served.engine.add_lora(served.requests["A"])  # known name: reloaded, and the change found
    served.run(["B", None])


def test_a_change_found_when_a_slot_is_assigned_aborts_only_that_request(served: Served) -> None:
    engine = served.engine
    served.run(["A", "B"])
    engine.add_request("a", PROMPTS[0], greedy(4), lora_request=served.requests["A"])
    engine.add_request("b", PROMPTS[1], greedy(4), lora_request=served.requests["B"])
    assert list(engine.lora_manager.cpu_cache) == ["B"]  # A evicted again before it got a slot
    served.replace_a_weights_keeping_size_and_mtime()
    finished = step_until_done(engine)
    assert finished["a"].outputs[0].finish_reason == "abort" and finished["a"].outputs[0].token_ids == []
    assert_matches_oracle([finished["b"]], ["B"], served.adapters.oracle, LOGPROB_ATOL["tiny"])
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_a_touched_adapter_is_the_same_adapter(served: Served) -> None:
    served.evict_a()
    for file in (served.a_dir / WEIGHTS, served.a_dir / "adapter_config.json"):
        os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    served.run(["A", "B", None])
    assert served.engine.lora_manager.stats["A"].loads >= 2  # registered, then read again


def test_values_beyond_the_storage_dtype_are_refused(served: Served, tmp_path: Path) -> None:
    """1e5 fits float32 but not float16 (largest 65504): stored as float16 it would be Inf.

    Values whose sum overflows, each of them finite, are served (the check sums first)."""
    big = tmp_path / "big"
    shutil.copytree(served.adapters.sources["A"], big)
    tensors = load_file(str(big / WEIGHTS))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][0, 0] = 1e5 / 2  # times the scaling 8 / 4
    save_file(tensors, str(big / WEIGHTS))
    layout = served.engine.lora_manager.layout
    assert load_adapter(big, "big", layout, torch.float32, set()).image.isfinite().all()
    # finite values whose sum overflows float32 are finite: they load
    huge = tmp_path / "huge"
    shutil.copytree(big, huge)
    tensors[key].fill_(1e37)
    save_file(tensors, str(huge / WEIGHTS))
    assert load_adapter(huge, "huge", layout, torch.float32, set()).image.isfinite().all()
    assert not torch.isfinite(tensors[key].sum() * 2)
    with pytest.raises(InvalidLoRAAdapterError, match=r"LoRA adapter 'big': tensor .*v_proj\.lora_A\.weight' or "
                                                      rf"'{key}' \(scaled by 2\) holds values beyond the range of torch\.float16"):
        load_adapter(big, "big", layout, torch.float16, set())


# ---- the resolvers' check -----------------------------------------------------------------------

def _config_dir(root: Path, text: str) -> Path:
    path = root / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(text)
    (path / WEIGHTS).write_bytes(b"weights")
    return path


@pytest.mark.parametrize("text, reason", [
    ('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", r"cannot be read \(it is not valid JSON \(nested too deeply\)\)"),
    ('{"peft_type": "LORA", "x": "' + "x" * (2 << 20) + '"}', r"cannot be read \(it is \d+ bytes, more than the 1048576 bytes"),
    ('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}", r"cannot be read \(it is not valid JSON \(Exceeds the limit"),
    ('{"peft_type": "LORA", "base_model_name_or_path": {"a": 1}}', r"its base_model_name_or_path is \{'a': 1\}, not a model name"),
], ids=["nested", "too_big", "long_integer", "base_model_an_object"])
def test_adapter_problem_gives_a_reason_for_hostile_configs(tmp_path: Path, text: str, reason: str) -> None:
    path = _config_dir(tmp_path, text)
    problem = adapter_problem(path, "tiny-llama", tmp_path.resolve())
    assert problem is not None and re.search(reason, problem), problem


def test_adapter_problem_with_a_path_too_long_for_the_filesystem(tmp_path: Path) -> None:
    problem = adapter_problem(tmp_path / ("x" * 5000), "tiny-llama", tmp_path.resolve())
    assert problem == "its files cannot be examined (File name too long)"



# ---- generated configs -------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
_regex_text = st.text(alphabet="qkvo_proj.*+?()[]{}|\\^$0123456789", max_size=12)
_configs = st.fixed_dictionaries({}, optional={
    "r": st.integers(-2, 16) | _json,
    "lora_alpha": st.integers(-2, 64) | st.floats() | _json,
    "use_rslora": st.booleans() | _json,
    "rank_pattern": st.dictionaries(_regex_text, st.integers(-1, 16) | _json, max_size=3) | _json,
    "alpha_pattern": st.dictionaries(_regex_text, st.floats() | _json, max_size=3) | _json,
    "target_modules": _regex_text | st.lists(st.text(max_size=8), max_size=3) | _json,
    "base_model_name_or_path": st.text(max_size=16) | _json,
    "peft_type": st.sampled_from(["LORA", "lora", "IA3"]) | _json,
    "bias": st.sampled_from(["none", "all"]) | _json,
    "use_dora": st.booleans() | _json,
})
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]


@settings(max_examples=300, deadline=None)
@given(_configs)
def test_any_config_gives_a_result_or_a_loraplex_error(raw: dict) -> None:
    """Never a raw Python error: a usable config (positive ranks, finite alphas) or a refusal naming the adapter."""
    try:
        config = AdapterConfig.from_json(raw, "generated")
        per_module = config.ranks_and_alphas(MODULES)
    except InvalidLoRAAdapterError as exc:
        assert str(exc).startswith("LoRA adapter 'generated': ")
        return
    for rank, alpha in per_module.values():
        assert isinstance(rank, int) and rank >= 1 and math.isfinite(alpha)
        assert math.isfinite(config.scaling(rank, alpha))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | _json.map(lambda value: json.dumps(value).encode()))
def test_any_config_file_gives_an_object_or_a_reason(tmp_path_factory, data: bytes) -> None:
    file = tmp_path_factory.mktemp("config") / "adapter_config.json"
    file.write_bytes(data)
    try:
        raw, stamp = read_config_json(file)
    except ValueError as exc:
        assert str(exc).startswith("it ")
        return
    assert isinstance(raw, dict) and stamp.size == len(data)


def test_a_config_without_rank_and_alpha_takes_peft_defaults(tiny, tmp_path: Path) -> None:
    """PEFT reads a missing `r` / `lora_alpha` as LoraConfig's defaults (8, 8); so must loraplex."""
    model_path = tiny.path("llama")
    source = make_adapter(load_hf(model_path), tmp_path / "defaults", seed=54, r=8, lora_alpha=8, target_modules="all-linear")
    edit_config(source, r=None, lora_alpha=None)
    oracle = PeftOracle(load_hf(model_path), {"defaults": source})
    engine = lora_engine(model_path, max_loras=1)
    engine.add_request("d", PROMPTS[0], greedy(4), lora_request=LoRARequest("defaults", 1, str(source)))
    assert_matches_oracle([step_until_done(engine)["d"]], ["defaults"], oracle, LOGPROB_ATOL["tiny"])
