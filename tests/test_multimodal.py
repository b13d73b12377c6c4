"""LLaVA end to end, offline: image prompts through LLM.generate against transformers and PEFT,
LoRA on the vision tower, the projector and the language model, mixed batches, the prefix cache
and chunked prefill with images, default_mm_loras, and the refusals.

Two tiny random LLaVA models (CLIP tower + projector + a Llama or a Qwen2 decoder), each with
three PEFT adapters (see multimodal_helpers).
"""

from __future__ import annotations

import io

import pytest

from lora_helpers import make_adapter, one_torch_thread  # noqa: F401
from multimodal_helpers import TinyLlava, greedy, png_bytes, random_image
from tiny_models import tiny  # noqa: F401

from loraplex import LoRARequest
from loraplex.errors import ConfigError, InvalidLoRAAdapterError, InvalidRequestError

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO_IMAGES = "USER: <image> and <image>: which is brighter? ASSISTANT:"
TEXT = "USER: Tell me about the sea. ASSISTANT:"
IMAGES = [random_image(seed) for seed in range(3)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llava(request, tmp_path_factory) -> TinyLlava:
    return TinyLlava(tmp_path_factory.mktemp(f"mm_{request.param}"), request.param)


@pytest.fixture(scope="module")
def llm(llava):
    return llava.llm()


def lora(llava: TinyLlava, name: str | None) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, list(llava.adapters).index(name) + 1, str(llava.adapters[name]))


def image_prompt(text: str, images: list) -> dict:
    return {"prompt": text, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}


def tokens(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


def test_greedy_tokens_equal_transformers_for_image_and_text_prompts(llava, llm) -> None:
    cases = [(PROMPT, [IMAGES[0]]), (PROMPT, [IMAGES[1]]), (TWO_IMAGES, IMAGES[:2]), (TEXT, [])]
    prompts = [image_prompt(text, images) if images else text for text, images in cases]
    got = tokens(llm.generate(prompts, greedy(), use_tqdm=False))
    assert got == [llava.oracle(None, text, images) for text, images in cases]
    assert got[0] != got[1]  # the image matters


@pytest.mark.parametrize("adapter", ["tower", "projector", "lm"])
def test_lora_on_each_part_equals_peft(llava, llm, adapter) -> None:
    out = llm.generate(image_prompt(PROMPT, [IMAGES[0]]), greedy(), use_tqdm=False, lora_request=lora(llava, adapter))
    assert tokens(out) == [llava.oracle(adapter, PROMPT, [IMAGES[0]])]
    assert tokens(out) != [llava.oracle(None, PROMPT, [IMAGES[0]])]


def test_mixed_batch_equals_each_request_alone(llava, llm) -> None:
    requests = [(TEXT, [], None), (TEXT, [], "lm"), (PROMPT, [IMAGES[0]], None), (PROMPT, [IMAGES[0]], "tower"),
                (PROMPT, [IMAGES[1]], "projector"), (TWO_IMAGES, IMAGES[1:], "lm"), (PROMPT, [IMAGES[2]], "tower")]
    prompts = [image_prompt(text, images) if images else text for text, images, _ in requests]
    loras = [lora(llava, name) for _, _, name in requests]
    batched = tokens(llm.generate(prompts, greedy(), use_tqdm=False, lora_request=loras))
    alone = [tokens(llm.generate(p, greedy(), use_tqdm=False, lora_request=r))[0] for p, r in zip(prompts, loras)]
    assert batched == alone
    assert batched == [llava.oracle(name, text, images) for text, images, name in requests]


def test_prefix_cache_never_shares_blocks_between_different_images(llava) -> None:
    """Same text, other image: the placeholder tokens are equal, the K/V are not."""
    llm = llava.llm(enable_prefix_caching=True, block_size=4)
    first = llm.generate(image_prompt(PROMPT, [IMAGES[0]]), greedy(), use_tqdm=False)
    second = llm.generate(image_prompt(PROMPT, [IMAGES[1]]), greedy(), use_tqdm=False)
    assert tokens(first) == [llava.oracle(None, PROMPT, [IMAGES[0]])]
    assert tokens(second) == [llava.oracle(None, PROMPT, [IMAGES[1]])]
    again = llm.generate(image_prompt(PROMPT, [IMAGES[0]]), greedy(), use_tqdm=False)  # same image: reused
    assert tokens(again) == tokens(first)
    assert llm.llm_engine.scheduler.prefix_cache.hits > 0


def test_chunked_prefill_splits_an_image_over_steps(llava) -> None:
    llm = llava.llm(max_num_batched_tokens=7, enable_chunked_prefill=True, enable_prefix_caching=False)
    prompts = [image_prompt(TWO_IMAGES, IMAGES[:2]), image_prompt(PROMPT, [IMAGES[2]])]
    loras = [lora(llava, "tower"), None]
    got = tokens(llm.generate(prompts, greedy(), use_tqdm=False, lora_request=loras))
    assert got == [llava.oracle("tower", TWO_IMAGES, IMAGES[:2]), llava.oracle(None, PROMPT, [IMAGES[2]])]


def test_prompt_token_ids_with_one_placeholder_per_image(llava, llm) -> None:
    ids = llm.get_tokenizer().encode(PROMPT)
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [IMAGES[0]]}}, greedy(), use_tqdm=False)
    assert tokens(out) == [llava.oracle(None, PROMPT, [IMAGES[0]])]
    assert len(out[0].prompt_token_ids) == len(ids) - 1 + llm.llm_engine.model.image_feature_size


# ---- default_mm_loras ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_llm(llava):
    return llava.llm(default_mm_loras={"image": str(llava.adapters["tower"])})


def test_default_mm_lora_applies_exactly_when_an_image_is_present(llava, default_llm) -> None:
    image, text = image_prompt(PROMPT, [IMAGES[0]]), TEXT
    got = tokens(default_llm.generate([image, text], greedy(), use_tqdm=False))
    assert got == [llava.oracle("tower", PROMPT, [IMAGES[0]]), llava.oracle(None, TEXT)]
    assert "image" in default_llm.llm_engine.list_adapters()  # registered under the modality's name, as vLLM


def test_a_request_naming_its_adapter_keeps_it(llava, default_llm) -> None:
    """vLLM's rule: the request's own LoRARequest wins over the modality's default."""
    out = default_llm.generate(image_prompt(PROMPT, [IMAGES[0]]), greedy(), use_tqdm=False, lora_request=lora(llava, "lm"))
    assert tokens(out) == [llava.oracle("lm", PROMPT, [IMAGES[0]])]


def test_default_mm_loras_refusals(llava, tiny) -> None:
    with pytest.raises(ConfigError, match=r"default_mm_loras needs LoRA: set enable_lora=True"):
        llava.llm(enable_lora=False, default_mm_loras={"image": str(llava.adapters["tower"])})
    with pytest.raises(ConfigError, match=r"default_mm_loras names modality 'audio'; .* take image"):
        llava.llm(default_mm_loras={"audio": str(llava.adapters["tower"])})
    with pytest.raises(ConfigError, match=r"default_mm_loras is set but the model .* takes text only"):
        from loraplex import LLM

        LLM(str(tiny.path("llama")), enable_lora=True, kv_cache_memory_bytes=1 << 20, max_model_len=256,
            default_mm_loras={"image": str(llava.adapters["tower"])})


# ---- refusals -----------------------------------------------------------------------------------------


def test_image_for_a_text_only_model_is_refused(tiny) -> None:
    llm = tiny.llm("llama")
    with pytest.raises(InvalidRequestError, match=r"carries multi_modal_data, but the model .* takes text only"):
        llm.generate(image_prompt("<image> hi", [IMAGES[0]]), greedy(), use_tqdm=False)
    assert llm.generate("hi", greedy(2), use_tqdm=False)[0].outputs[0].token_ids  # still serving


@pytest.mark.parametrize(("data", "pattern"), [
    ({"image": IMAGES[:2]}, r"the prompt has 1 image placeholder\(s\) \('<image>'\) but 2 image\(s\)"),
    ({"image": "a.png"}, r"item 0 is a str, not a PIL image"),
    ({"audio": IMAGES[0]}, r"multi_modal_data has 'audio'; this model takes image only"),
    ([IMAGES[0]], r"multi_modal_data must be a dict"),
])
def test_bad_multi_modal_data_is_refused(llava, llm, data, pattern) -> None:
    with pytest.raises(InvalidRequestError, match=pattern):
        llm.generate({"prompt": PROMPT, "multi_modal_data": data}, greedy(), use_tqdm=False)


def test_too_many_images_and_undecodable_images_are_refused(llava) -> None:
    from PIL import Image

    llm = llava.llm(limit_mm_per_prompt={"image": 1})
    with pytest.raises(InvalidRequestError, match=r"2 images, more than the 1 allowed per prompt; .*limit_mm_per_prompt"):
        llm.generate(image_prompt(TWO_IMAGES, IMAGES[:2]), greedy(), use_tqdm=False)
    truncated = Image.open(io.BytesIO(png_bytes(IMAGES[0])[:200]))  # the header reads; the pixels do not
    with pytest.raises(InvalidRequestError, match=r"an image of the prompt cannot be decoded"):
        llm.generate(image_prompt(PROMPT, [truncated]), greedy(), use_tqdm=False)
    assert tokens(llm.generate(image_prompt(PROMPT, [IMAGES[0]]), greedy(), use_tqdm=False)) == \
        [llava.oracle(None, PROMPT, [IMAGES[0]])]


def test_adapter_on_a_module_lora_cannot_serve_is_refused_by_name(llava, llm, tmp_path) -> None:
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(str(llava.path))
    bad = make_adapter(base, tmp_path / "conv", seed=9, r=4, target_modules=["patch_embedding", "linear_1"])
    with pytest.raises(InvalidLoRAAdapterError, match=r"'model\.vision_tower\.embeddings\.patch_embedding', a module the "
                                                      r"served model does not have or cannot serve with LoRA"):
        llm.generate(image_prompt(PROMPT, [IMAGES[0]]), greedy(), use_tqdm=False,
                     lora_request=LoRARequest("conv", 9, str(bad)))



def test_a_checkpoint_without_a_tower_tensor_is_refused(llava, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from loraplex import LLM
    from loraplex.errors import ModelNotFoundError

    broken = tmp_path / "broken"
    shutil.copytree(llava.path, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["vision_tower.encoder.layers.0.mlp.fc2.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelNotFoundError, match=r"lacks tensors the model needs: vision_tower\.encoder\.layers\.0\.mlp\.fc2"):
        LLM(str(broken), kv_cache_memory_bytes=1 << 22, max_model_len=256)
