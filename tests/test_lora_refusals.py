"""Every adapter loraplex refuses, refused with a message that names the adapter and the reason.

One LLM (tiny Llama, max_loras=2, max_lora_rank=8) serves the whole module. Each bad adapter is
offered twice: through `LLM.generate` (in a batch after a base-model prompt and a good-adapter
prompt, so the refusal must leave nothing half-queued) and through `LLMEngine.add_lora`. After
every refusal the same LLM still serves base-model and good-adapter prompts exactly as PEFT does,
and the bad adapter is neither registered nor in a slot.

Most bad adapters are real PEFT outputs (`save_pretrained` with use_dora, bias, lora_bias,
modules_to_save, embed_tokens / lm_head targets, an IA3 adapter, an aLoRA adapter, an adapter
for a model of another hidden size); the rest are a good adapter with one file damaged: non-finite
weights or a scaling that overflows (the message names the tensor), config fields of the wrong
type or range, invalid or catastrophically backtracking regular expressions, JSON nested too deep
or too big, paths too long for the filesystem (the message names the field).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers import LOGPROB_ATOL, PeftOracle, assert_matches_oracle, edit_config, greedy, lora_llm, make_adapter, quiet_peft
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex import LoRARequest
from loraplex.errors import ConfigError, InvalidLoRAAdapterError, InvalidRequestError, LoRAAdapterNotFoundError
from tiny_models import PROMPTS, load_hf, make_config, tiny  # noqa: F401

MAX_LORA_RANK = 8
GOOD = "good-adapter"
GOOD_ID = 1
_ids = itertools.count(100)


class Served:
    def __init__(self, tiny, root: Path) -> None:
        self.path = tiny.path("llama")
        self.root = root
        self.maker = load_hf(self.path)  # adapters are made on this copy; the oracle wraps another
        self.good_dir = make_adapter(self.maker, root / "good", seed=1, r=8, lora_alpha=16, target_modules="all-linear")
        self.good = LoRARequest(GOOD, GOOD_ID, str(self.good_dir))
        self.oracle = PeftOracle(load_hf(self.path), {GOOD: self.good_dir})
        self.llm = lora_llm(self.path, max_loras=2, max_cpu_loras=2, max_lora_rank=MAX_LORA_RANK)
        self.engine = self.llm.llm_engine

    def assert_still_serves(self) -> None:
        """Base and good-adapter prompts, mixed, exactly as PEFT; nothing else left behind."""
        names = [None, GOOD, GOOD, None]
        loras = [self.good if n else None for n in names]
        outputs = self.llm.generate(PROMPTS, greedy(4), use_tqdm=False, lora_request=loras)
        assert_matches_oracle(outputs, names, self.oracle, LOGPROB_ATOL["tiny"])
        manager = self.engine.lora_manager
        assert set(self.engine.list_adapters()) == {GOOD}
        assert self.engine.list_loras() == {GOOD_ID}
        assert set(manager.slots) <= {GOOD, None}
        assert not any(manager.in_use.values())
        assert not self.engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory) -> Served:
    served = Served(tiny, tmp_path_factory.mktemp("refusals"))
    served.assert_still_serves()  # registers the good adapter first
    return served


# ---- the bad adapters: each builder writes one into `out` and returns its LoRARequest ------------

def _peft(**config) -> Callable[[Served, Path, str], LoRARequest]:
    def build(served: Served, out: Path, name: str) -> LoRARequest:
        make_adapter(served.maker, out, seed=7, **config)
        return LoRARequest(name, next(_ids), str(out))
    return build


def _damaged(damage: Callable[[Path], None]) -> Callable[[Served, Path, str], LoRARequest]:
    def build(served: Served, out: Path, name: str) -> LoRARequest:
        shutil.copytree(served.good_dir, out)
        damage(out)
        return LoRARequest(name, next(_ids), str(out))
    return build


def _rename_layer(out: Path) -> None:
    """Move layer 1's weights to layer 5 of a 2-layer model."""
    file = out / "adapter_model.safetensors"
    tensors = load_file(str(file))
    save_file({key.replace("layers.1.", "layers.5."): t for key, t in tensors.items()}, str(file))


def _other_hidden_size(served: Served, out: Path, name: str) -> LoRARequest:
    """A Llama adapter made for hidden size 32 (its config names no base model)."""
    from transformers import AutoModelForCausalLM

    with quiet_peft():
        other = AutoModelForCausalLM.from_config(make_config("llama", hidden_size=32, intermediate_size=64, vocab_size=512))
    make_adapter(other, out, seed=3, r=4, target_modules=["q_proj", "v_proj"])
    assert json.loads((out / "adapter_config.json").read_text()).get("base_model_name_or_path") is None
    return LoRARequest(name, next(_ids), str(out))


def _ia3(served: Served, out: Path, name: str) -> LoRARequest:
    from peft import IA3Config, get_peft_model

    with quiet_peft():
        model = get_peft_model(served.maker, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"]))
        model.save_pretrained(str(out))
        model.unload()
    return LoRARequest(name, next(_ids), str(out))


def _write(relative: str, data: bytes | str) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        file = out / relative
        file.write_bytes(data) if isinstance(data, bytes) else file.write_text(data)
    return damage


def _truncate(out: Path) -> None:
    file = out / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


# keys as PEFT's save_pretrained writes them
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
DOWN_B = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
FIRST_B = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"  # the first pair loaded (sorted)


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        file = out / "adapter_model.safetensors"
        tensors = load_file(str(file))
        edit(tensors)
        save_file(tensors, str(file))
    return damage


def _set(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][1, 1] = value
    return edit


def _as_bin(payload: object) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        (out / "adapter_model.safetensors").unlink()
        torch.save(payload, str(out / "adapter_model.bin"))
    return damage


def _config_text(text: str) -> Callable[[Path], None]:
    """Replace adapter_config.json by `text` with `GOOD_FIELDS` standing for the good adapter's fields."""
    def damage(out: Path) -> None:
        file = out / "adapter_config.json"
        fields = file.read_text().strip()[1:-1]
        file.write_text(text.replace("GOOD_FIELDS", fields))
    return damage


def _config(**changes) -> Callable[[Path], None]:
    return lambda out: edit_config(out, **changes)


def _as_base(base_model_name: str) -> Callable[[Served, Path, str], LoRARequest]:
    def build(served: Served, out: Path, name: str) -> LoRARequest:
        return LoRARequest(name, next(_ids), str(served.good_dir), base_model_name=base_model_name)
    return build


# case -> (builder, error class, reason pattern)
CASES: dict[str, tuple[Callable, type[Exception], str]] = {
    "rank_above_max_lora_rank": (_peft(r=16, target_modules=["q_proj", "v_proj"]), InvalidLoRAAdapterError,
                                 r"rank 16 .* exceeds max_lora_rank=8"),
    "rank_pattern_above_max_lora_rank": (_peft(r=4, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 12}),
                                         InvalidLoRAAdapterError, r"rank 12 .*o_proj.* exceeds max_lora_rank=8"),
    "dora": (_peft(r=4, target_modules=["q_proj"], use_dora=True), InvalidLoRAAdapterError, r"DoRA"),
    "bias_all": (_peft(r=4, target_modules=["q_proj"], bias="all"), InvalidLoRAAdapterError, r"trains biases \(bias='all'\)"),
    "bias_lora_only": (_peft(r=4, target_modules=["q_proj"], bias="lora_only"), InvalidLoRAAdapterError, r"trains biases"),
    "lora_bias": (_peft(r=4, target_modules=["q_proj"], lora_bias=True), InvalidLoRAAdapterError, r"LoRA biases"),
    "modules_to_save": (_peft(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), InvalidLoRAAdapterError,
                        r"modules_to_save"),
    "activated_lora": (_peft(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[11173, 42]),
                       InvalidLoRAAdapterError, r"activated LoRA"),
    "layer_beyond_the_model": (_damaged(_rename_layer), InvalidLoRAAdapterError,
                               r"model\.layers\.5\..*a module the served model does not have"),
    "embed_tokens_lora": (_peft(r=4, target_modules=["embed_tokens"]), InvalidLoRAAdapterError,
                          r"embed_tokens.*embedding or lm_head LoRA is not supported"),
    "lm_head_lora": (_peft(r=4, target_modules=["q_proj", "lm_head"]), InvalidLoRAAdapterError,
                     r"lm_head.*embedding or lm_head LoRA is not supported"),
    "shapes_of_another_model": (_other_hidden_size, InvalidLoRAAdapterError,
                                r"have shapes A \(4, 32\).*needs A \(4, 64\).*different base model"),
    "peft_type_ia3": (_ia3, InvalidLoRAAdapterError, r"peft_type is 'IA3', only LORA"),
    "missing_adapter_config": (_damaged(lambda out: (out / "adapter_config.json").unlink()), LoRAAdapterNotFoundError,
                               r"adapter_config\.json' does not exist"),
    "missing_weights": (_damaged(lambda out: (out / "adapter_model.safetensors").unlink()), LoRAAdapterNotFoundError,
                        r"has no adapter_model\.safetensors"),
    "corrupt_safetensors": (_damaged(_write("adapter_model.safetensors", b"\x07not a safetensors file" * 8)),
                            InvalidLoRAAdapterError, r"cannot read its weights"),
    "truncated_safetensors": (_damaged(_truncate), InvalidLoRAAdapterError, r"cannot read its weights"),
    "malformed_json": (_damaged(_write("adapter_config.json", '{"r": 8, "lora_alpha": ')), InvalidLoRAAdapterError,
                       r"is not valid JSON"),
    "config_not_an_object": (_damaged(_write("adapter_config.json", "[8, 16]")), InvalidLoRAAdapterError,
                             r"must hold a JSON object"),
    "config_names_another_base_model": (
        _damaged(lambda out: edit_config(out, base_model_name_or_path="HuggingFaceTB/SmolLM2-1.7B-Instruct")),
        InvalidLoRAAdapterError, r"trained for base model 'HuggingFaceTB/SmolLM2-1\.7B-Instruct'"),
    "request_names_another_base_model": (_as_base("meta-llama/Llama-3.1-8B"), InvalidLoRAAdapterError,
                                         r"names base model 'meta-llama/Llama-3\.1-8B'"),
    "path_is_not_a_directory": (lambda served, out, name: LoRARequest(name, next(_ids), str(out / "nowhere")),
                                LoRAAdapterNotFoundError, r"is not a directory"),
    "path_too_long": (lambda served, out, name: LoRARequest(name, next(_ids), str(out / ("x" * 5000))),
                      LoRAAdapterNotFoundError, r"path '.*\.\.\. \(\d+ characters\) cannot be used \(File name too long\)"),
    # non-finite weights, refused while they are copied, naming the tensor
    "nan_in_lora_A": (_damaged(_edit_tensors(_set(Q_A, float("nan")))), InvalidLoRAAdapterError,
                      rf"tensor '{re.escape(Q_A)}' holds NaN or Inf values"),
    "inf_in_lora_B": (_damaged(_edit_tensors(_set(DOWN_B, float("inf")))), InvalidLoRAAdapterError,
                      rf"tensor '{re.escape(DOWN_B)}' holds NaN or Inf values"),
    "alpha_overflows_the_scaling": (_damaged(_config(lora_alpha=1e300)), InvalidLoRAAdapterError,
                                    rf"tensor '{re.escape(FIRST_B)}' overflows to Inf once multiplied by its LoRA scaling "
                                    r"1\.25e\+299 \(lora_alpha=1e\+300, r=8\)"),
    "float64_values_beyond_float32": (_damaged(_edit_tensors(lambda t: t.update({Q_A: t[Q_A].double().fill_(1e300)}))),
                                      InvalidLoRAAdapterError,
                                      rf"tensor '{re.escape(Q_A)}' or .* holds values beyond the range of torch\.float32"),
    "weights_not_floating_point": (_damaged(_edit_tensors(lambda t: t.update({Q_A: t[Q_A].to(torch.int64)}))),
                                   InvalidLoRAAdapterError, rf"'{re.escape(Q_A)}' is a torch\.int64 tensor, not a dense floating-point"),
    "bin_holds_a_list": (_damaged(_as_bin([1, 2, 3])), InvalidLoRAAdapterError, r"adapter_model\.bin' holds a list, not a mapping"),
    # config fields of the wrong type or range, named
    "rank_zero": (_damaged(_config(r=0)), InvalidLoRAAdapterError, r"r must be a positive integer \(a LoRA rank\); got 0"),
    "rank_negative": (_damaged(_config(r=-8)), InvalidLoRAAdapterError, r"r must be a positive integer .*got -8"),
    "rank_a_string": (_damaged(_config(r="8")), InvalidLoRAAdapterError, r"r must be a positive integer .*got '8'"),
    "alpha_not_a_number": (_damaged(_config(lora_alpha="sixteen")), InvalidLoRAAdapterError,
                           r"lora_alpha must be a number; got 'sixteen'"),
    "alpha_infinite": (_damaged(_config(lora_alpha=float("inf"))), InvalidLoRAAdapterError,
                       r"lora_alpha must be a finite number; got inf"),
    "alpha_nan": (_damaged(_config(lora_alpha=float("nan"))), InvalidLoRAAdapterError, r"lora_alpha must be a finite number; got nan"),
    "use_rslora_a_string": (_damaged(_config(use_rslora="false")), InvalidLoRAAdapterError,
                            r"use_rslora must be true or false; got 'false'"),
    "base_model_name_not_a_string": (_damaged(_config(base_model_name_or_path=["a", "b"])), InvalidLoRAAdapterError,
                                     r"base_model_name_or_path must be a string"),
    "rank_pattern_invalid_regex": (_damaged(_config(rank_pattern={"q_proj(": 8})), InvalidLoRAAdapterError,
                                   r"rank_pattern key 'q_proj\(' is not a valid regular expression"),
    "rank_pattern_rank_zero": (_damaged(_config(rank_pattern={"q_proj": 0})), InvalidLoRAAdapterError,
                               r"rank_pattern\['q_proj'\] must be a positive integer .*got 0"),
    "rank_pattern_not_an_object": (_damaged(_config(rank_pattern=["q_proj", 8])), InvalidLoRAAdapterError,
                                   r"rank_pattern must be an object mapping module-name patterns to values"),
    "alpha_pattern_invalid_regex": (_damaged(_config(alpha_pattern={"[v_proj": 4})), InvalidLoRAAdapterError,
                                    r"alpha_pattern key '\[v_proj' is not a valid regular expression"),
    "alpha_pattern_not_a_number": (_damaged(_config(alpha_pattern={"v_proj": [4]})), InvalidLoRAAdapterError,
                                   r"alpha_pattern\['v_proj'\] must be a number; got \[4\]"),
    "rank_pattern_too_many_keys": (_damaged(_config(rank_pattern={f"layers.{i}.q_proj": 8 for i in range(1025)})),
                                   InvalidLoRAAdapterError, r"rank_pattern has 1025 keys, more than the 1024 allowed"),
    # Python's re needs minutes to hours to reject a module name with this key
    "rank_pattern_backtracks": (_damaged(_config(rank_pattern={r"(.|\D|\w)*\d": 8})), InvalidLoRAAdapterError,
                                r"matching its rank_pattern keys \(key .* backtracks\) against the module names takes longer than 1\.0 s"),
    "target_modules_invalid_regex": (_damaged(_config(target_modules="(q|v_proj")), InvalidLoRAAdapterError,
                                     r"target_modules '\(q\|v_proj' is not a valid regular expression"),
    "target_modules_not_names": (_damaged(_config(target_modules=[1, 2])), InvalidLoRAAdapterError,
                                 r"target_modules must be a list of module names or a regular expression; got \[1, 2\]"),
    # hostile JSON
    "config_nested_too_deeply": (_damaged(_config_text('{GOOD_FIELDS, "extra": ' + "[" * 100_000 + "]" * 100_000 + "}")),
                                 InvalidLoRAAdapterError, r"is not valid JSON \(nested too deeply\)"),
    "config_too_big": (_damaged(_config_text('{GOOD_FIELDS, "extra": "' + "x" * (2 << 20) + '"}')), InvalidLoRAAdapterError,
                       r"it is \d+ bytes, more than the 1048576 bytes a LoRA config may have"),
    "config_integer_too_long": (_damaged(_config_text('{GOOD_FIELDS, "extra": ' + "9" * 5000 + "}")), InvalidLoRAAdapterError,
                                r"is not valid JSON \(Exceeds the limit"),
}


@pytest.mark.parametrize("via", ["generate", "add_lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_is_refused_and_the_engine_still_serves(served, tmp_path, case: str, via: str) -> None:
    build, error, reason = CASES[case]
    name = f"bad-{case}-{via}"
    request = build(served, tmp_path / case, name)
    with pytest.raises(error) as info:
        if via == "generate":
            served.llm.generate(PROMPTS[:3], greedy(4), use_tqdm=False, lora_request=[None, served.good, request])
        else:
            served.engine.add_lora(request)
    message = str(info.value)
    assert repr(name) in message, f"the message does not name the adapter: {message}"
    assert re.search(reason, message), f"the message does not give the reason {reason!r}: {message}"
    assert name not in served.engine.lora_manager.stats or served.engine.lora_manager.stats[name].activations == 0
    served.assert_still_serves()


def test_name_registered_again_with_another_path_is_refused(served) -> None:
    other = LoRARequest(GOOD, GOOD_ID, str(served.root / "elsewhere"))
    with pytest.raises(InvalidLoRAAdapterError, match=rf"name '{GOOD}' is already registered with path"):
        served.llm.generate(PROMPTS[0], greedy(4), use_tqdm=False, lora_request=other)
    with pytest.raises(InvalidLoRAAdapterError, match=rf"'{GOOD}' is already registered"):
        served.engine.add_lora(other)
    served.assert_still_serves()


def test_an_id_already_loaded_is_served_with_the_loaded_adapter(served, caplog) -> None:
    """vLLM's rule: ids name adapters, so another name with GOOD's id is GOOD (and add_lora adds nothing)."""
    twin = LoRARequest("twin-of-good", GOOD_ID, str(served.root / "elsewhere"))
    with caplog.at_level(logging.INFO, logger="loraplex.lora.catalog"):
        outputs = served.llm.generate(PROMPTS[:2], greedy(4), use_tqdm=False, lora_request=twin)
        assert served.engine.add_lora(twin) is False
    assert_matches_oracle(outputs, [GOOD, GOOD], served.oracle, LOGPROB_ATOL["tiny"])
    assert all(out.lora_request.lora_name == GOOD for out in outputs)
    told = [r.getMessage() for r in caplog.records if "twin-of-good" in r.getMessage()]
    assert len(told) == 1 and f"served with '{GOOD}'" in told[0]  # once
    assert set(served.engine.list_adapters()) == {GOOD}
    served.assert_still_serves()


def test_registering_the_same_adapter_again_is_not_an_error(served) -> None:
    assert served.engine.add_lora(LoRARequest(GOOD, GOOD_ID, str(served.good_dir))) is False
    served.assert_still_serves()


def test_lora_request_when_lora_is_not_enabled(served) -> None:
    llm = lora_llm(served.path, enable_lora=False)
    engine = llm.llm_engine
    with pytest.raises(InvalidRequestError, match=rf"LoRA adapter '{GOOD}' was requested but LoRA is not enabled.*enable_lora=True"):
        llm.generate(PROMPTS[:2], greedy(4), use_tqdm=False, lora_request=[None, served.good])
    with pytest.raises(InvalidRequestError, match=r"'my-adapter' was requested but LoRA is not enabled"):
        llm.generate(PROMPTS[0], greedy(4), use_tqdm=False, lora_request="my-adapter")
    with pytest.raises(ConfigError, match=r"LoRA is not enabled"):
        engine.add_lora(served.good)
    assert not engine.has_unfinished_requests()
    # the same LLM still serves the base model: its tokens are transformers' (PEFT with adapters disabled)
    outputs = llm.generate(PROMPTS[:2], greedy(4), use_tqdm=False)
    assert_matches_oracle(outputs, [None, None], served.oracle, LOGPROB_ATOL["tiny"])


def test_name_registered_again_with_another_base_model_is_refused(served) -> None:
    """A known name asked for with a base model this engine does not serve is refused as a new name would be."""
    other_base = LoRARequest(GOOD, GOOD_ID, str(served.good_dir), base_model_name="meta-llama/Llama-3.1-8B")
    for attempt in (lambda: served.llm.generate(PROMPTS[0], greedy(4), use_tqdm=False, lora_request=other_base),
                    lambda: served.engine.add_lora(other_base)):
        with pytest.raises(InvalidLoRAAdapterError, match=rf"LoRA adapter '{GOOD}' names base model 'meta-llama/Llama-3\.1-8B'"):
            attempt()
    assert served.engine.list_adapters()[GOOD].base_model_name is None
    # naming the served model is fine: the same adapter, already registered
    same_base = LoRARequest(GOOD, GOOD_ID, str(served.good_dir), base_model_name=served.path.name)
    assert served.engine.add_lora(same_base) is False
    served.assert_still_serves()
