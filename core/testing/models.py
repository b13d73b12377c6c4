"""A tiny, random, deterministic Llama checkpoint with its own tokenizer, for resolver tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["tiny_base_model", "TINY_VOCAB_SIZE"]

_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
TINY_VOCAB_SIZE = 259  # 3 specials + 256 byte-level symbols


def tiny_base_model(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random Llama (hidden 64, 2 layers, 4 heads / 2 KV heads, vocabulary 259) with
    a byte-level tokenizer into `path` (created), with `save_pretrained`; returns `path`.

    Deterministic for a given `seed` and fast (well under a second once `transformers` is
    imported). Weights are drawn from a seeded normal distribution with a large spread, so the
    logits are peaky and greedy decoding has no near-ties: comparisons against PEFT are sharp.
    Every linear of the decoder layers can carry LoRA (q/k/v/o, gate/up/down projections).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    randomize_weights(model, seed)
    model.save_pretrained(str(path))
    _tokenizer().save_pretrained(str(path))
    return path


def randomize_weights(model, seed: int) -> None:
    """Seeded weights large enough that greedy tokens depend on every layer (a fresh model's are
    near zero): norms around 1, embeddings and the LM head at 0.5, every other weight at 0.2."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.2 * noise)


def _tokenizer():
    """A byte-level tokenizer without merges: every UTF-8 byte is one token; any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    assert len(vocab) == TINY_VOCAB_SIZE
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


# A minimal ChatML-like template, so LLM.chat works on the tiny model too.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
