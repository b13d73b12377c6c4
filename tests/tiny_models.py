"""Tiny, randomly initialised Hugging Face checkpoints for the engine tests.

Each model is a real `transformers` model of a supported architecture (hidden 64, 2-3 layers,
4 heads, 2 KV heads, intermediate 128) with the embedded model's tokenizer (vocabulary 49152),
so prompts are real text and the chat template works. Weights are drawn from a seeded normal
distribution (see `randomize_`): the logits are peaky, so greedy decoding has no near-ties and
agreement with `transformers` is a sharp test rather than a coin toss.

`build_tiny_model(out_dir, "llama", ...)` writes config.json, model.safetensors,
generation_config.json and the tokenizer files into `out_dir` with `save_pretrained`.
VARIANTS names what the tests cover: Llama (plain, attention+MLP bias, tied embeddings, llama3
rope scaling), Mistral (sliding window 8 on every layer), Qwen2 (q/k/v bias; and a variant
whose later layers slide, chosen by `layer_types`), Qwen3 (q/k norm, head_dim != hidden/heads).

The session fixtures `tiny` (TinyModels) and `embedded` (EmbeddedModel) build each checkpoint,
engine and `transformers` oracle once per test session.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

VOCAB_SIZE = 49152  # the embedded SmolLM2 tokenizer's
BOS_ID, EOS_ID = 1, 2  # <|im_start|>, <|im_end|> in that tokenizer

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=EOS_ID,
    tie_word_embeddings=False,
)

# name -> (transformers config class name, architecture-specific options)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # every Mistral layer slides; a window of 8 matters in prompts of ~20 tokens
    "mistral": ("MistralConfig", dict(sliding_window=8, num_hidden_layers=3,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # head_dim 32 differs from hidden / heads = 16: q/k/v sizes come from head_dim, not hidden
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}

# Variants: (architecture, overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_rope_llama3": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    })),
    # Qwen2 with sliding-window layers chosen by layer_types (layer 0 full, layers 1-2 sliding)
    "qwen2_sliding": ("qwen2", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
}


def make_config(arch: str, **overrides: Any):
    import transformers

    class_name, specific = ARCHITECTURES[arch]
    options = {**_COMMON, **specific, **overrides}
    return getattr(transformers, class_name)(**options)


def build_tiny_model(
    out_dir: Path,
    variant: str,
    tokenizer_dir: Path,
    *,
    seed: int = 0,
    std: float = 0.2,
    head_std: float = 0.5,
    **overrides: Any,
) -> Path:
    """Write a tiny random checkpoint of `variant` (a key of VARIANTS) into `out_dir`."""
    from transformers import AutoModelForCausalLM

    arch, variant_overrides = VARIANTS[variant]
    config = make_config(arch, **{**variant_overrides, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    randomize_(model, seed=seed, std=std, head_std=head_std)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def randomize_(model: torch.nn.Module, *, seed: int, std: float, head_std: float) -> None:
    """Seeded weights: norms near 1 (so they are exercised too), N(0, std) layer weights and
    biases, N(0, head_std) embeddings and LM head.

    The defaults (0.2 / 0.5) give logits with a standard deviation of about 4, so the top two
    candidates of a step are typically ~0.5 apart and rarely closer than 1e-3, while the
    residual stream stays tame enough that float32 results agree with transformers to ~2e-5.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                param.copy_(head_std * noise)
            else:
                param.copy_(std * noise)


def copy_tokenizer(source: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(out_dir) / name)


def load_hf(path: Path):
    """The `transformers` oracle for a model directory: float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation of exactly `num_tokens` tokens (EOS suppressed, unpadded)."""
    input_ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        min_new_tokens=num_tokens,
        max_new_tokens=num_tokens,
        pad_token_id=EOS_ID,
    )
    return out[0, len(prompt_ids):].tolist()


@torch.inference_mode()
def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits for every position of `token_ids`: [len, V]."""
    logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


# ---- session-wide fixtures ---------------------------------------------------------------------
# Test modules import these fixtures (`from tiny_models import tiny, embedded`, with a noqa for F401).
# pytest then makes one fixture definition per importing module, so the objects are cached here,
# at module level: every model is built, and every engine / oracle loaded, once per session.

TINY_KV_BYTES = 1 << 20  # 2048 tokens of a 2-layer tiny model: roomy
TINY_MAX_MODEL_LEN = 256  # the tiny models' max_position_embeddings
EMBEDDED_KV_BYTES = 48 << 20  # ~1000 tokens of SmolLM2-135M in float32
EMBEDDED_MAX_MODEL_LEN = 512

_PATHS: dict[str, Path] = {}
_LLMS: dict[str, Any] = {}
_HF: dict[str, Any] = {}
_ROOT: list[Path] = []


class TinyModels:
    """Builds tiny checkpoints on demand into one session directory; caches engines and oracles."""

    def __init__(self, root_factory, tokenizer_dir: Path) -> None:
        self._root_factory = root_factory
        self.tokenizer_dir = tokenizer_dir

    def path(self, variant: str) -> Path:
        if variant not in _PATHS:
            if not _ROOT:
                _ROOT.append(self._root_factory())
            _PATHS[variant] = build_tiny_model(_ROOT[0] / variant, variant, self.tokenizer_dir, seed=1)
        return _PATHS[variant]

    def llm(self, variant: str):
        """A shared `LLM` on the variant (leave it idle: no request may outlive a test)."""
        if variant not in _LLMS:
            from loraplex import LLM

            _LLMS[variant] = LLM(str(self.path(variant)), kv_cache_memory_bytes=TINY_KV_BYTES,
                                 max_model_len=TINY_MAX_MODEL_LEN)
        return _LLMS[variant]

    def engine(self, variant: str = "llama", **options: Any):
        """A fresh `LLMEngine` (for tests that step it or that need their own options)."""
        from loraplex import EngineArgs, LLMEngine

        options = {"kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": TINY_MAX_MODEL_LEN, **options}
        return LLMEngine.from_engine_args(EngineArgs(model=str(self.path(variant)), **options))

    def hf(self, variant: str):
        if variant not in _HF:
            _HF[variant] = load_hf(self.path(variant))
        return _HF[variant]


class EmbeddedModel:
    """The embedded SmolLM2-135M-Instruct: a shared `LLM` and the transformers oracle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def llm(self):
        if "embedded" not in _LLMS:
            from loraplex import LLM

            _LLMS["embedded"] = LLM(str(self.path), kv_cache_memory_bytes=EMBEDDED_KV_BYTES,
                                    max_model_len=EMBEDDED_MAX_MODEL_LEN)
        return _LLMS["embedded"]

    @property
    def hf(self):
        if "embedded" not in _HF:
            _HF["embedded"] = load_hf(self.path)
        return _HF["embedded"]

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, embedded_model_path) -> TinyModels:
    return TinyModels(lambda: tmp_path_factory.mktemp("tiny_models"), embedded_model_path)


@pytest.fixture(scope="session")
def embedded(embedded_model_path) -> EmbeddedModel:
    return EmbeddedModel(embedded_model_path)


def run_engine(engine, requests: dict[str, tuple[Any, Any]], max_steps: int = 10_000) -> dict[str, Any]:
    """Add every (prompt, params) under its id, step to the end; the final RequestOutput of each."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    return drain(engine, max_steps)


def drain(engine, max_steps: int = 10_000) -> dict[str, Any]:
    finished: dict[str, Any] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError(f"engine still has unfinished requests after {max_steps} steps")


# Prompts of different lengths (4 to ~30 tokens): the longer ones exceed the sliding windows.
PROMPTS = [
    "Hello, my name is",
    "The quick brown fox jumps over the lazy dog.",
    "In 1889 the tower was finished in Paris; today millions of visitors climb it every year, "
    "and on clear days they can see for miles across the river.",
    "def add(a, b):\n    return a + b\n",
]
