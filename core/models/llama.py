"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

One implementation covers the family; the architectures differ only in switches read from the
Hugging Face config: q/k/v bias (Qwen2, Llama's `attention_bias`), per-head q/k RMSNorm (Qwen3),
MLP bias, sliding-window layers, tied embeddings and the rope type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from .attention import AttentionMetadata, PagedAttention
from .decode_step import NativeDecodeStep
from .layers import Linear, RMSNorm, RotaryEmbedding, apply_rotary, silu_and_mul
from .rope import rope_inverse_frequencies

ModuleKey = tuple[int, str]  # a LoRA-capable linear: (layer index, packed module name such as "qkv_proj")
LoRATarget = tuple[ModuleKey, int]  # a checkpoint module: its packed linear and its slice in it
LORA_WRAPPED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_DECODER_MODULE = re.compile(r"^model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)$")


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, arch: "ArchitectureTraits", layer_index: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        qkv_bias = arch.qkv_bias or bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        self.qkv_proj = Linear(hidden, [self.q_size, self.kv_size, self.kv_size], bias=qkv_bias)
        self.o_proj = Linear(self.q_size, [hidden], bias=arch.o_bias and qkv_bias)
        self.gate_up_proj = Linear(hidden, [config.intermediate_size] * 2, bias=mlp_bias)
        self.down_proj = Linear(config.intermediate_size, [hidden], bias=mlp_bias)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if arch.qk_norm else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, arch.is_sliding(config, layer_index))

    def forward(
        self,
        hidden: torch.Tensor,  # [T, H] the previous layer's MLP output (layer 0: the embeddings)
        residual: torch.Tensor | None,  # [T, H] the residual stream before it (layer 0: None)
        rotary: tuple[torch.Tensor, torch.Tensor],  # cos, sin [T, 1, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # this layer's MLP output and the residual before it [T, H]
        # residual adds folded into the norms (vLLM's layout): the stream is updated in place
        if residual is None:
            residual, x = hidden, self.input_layernorm(hidden)
        else:
            x = self.input_layernorm(hidden, residual)
        t, heads = x.shape[0], self.num_heads
        qkv = self.qkv_proj(x)  # [T, q + 2kv]
        qk = qkv[:, : self.q_size + self.kv_size].view(t, heads + self.num_kv_heads, self.head_dim)  # [T, Hq + Hkv, D]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        qk = apply_rotary(qk, *rotary)  # q and k rotated together: one set of ops, not two
        q, k = qk[:, :heads], qk[:, heads:]
        attn_out = self.attn(q, k, v, kv_cache[0], kv_cache[1], meta)  # [T, Hq * D]
        x = self.post_attention_layernorm(self.o_proj(attn_out), residual)
        return self.down_proj(silu_and_mul(self.gate_up_proj(x))), residual


class ArchitectureTraits:
    """What distinguishes one supported architecture from another."""

    def __init__(self, qkv_bias: bool = False, o_bias: bool = True, qk_norm: bool = False, sliding: str = "none"):
        self.qkv_bias = qkv_bias  # q/k/v always carry a bias (Qwen2)
        self.o_bias = o_bias  # o_proj carries a bias whenever q/k/v do (Llama's attention_bias)
        self.qk_norm = qk_norm
        self.sliding = sliding  # "none" | "all" (Mistral) | "layer_types" (Qwen2/Qwen3)

    def is_sliding(self, config: PretrainedConfig, layer_index: int) -> bool:
        if getattr(config, "sliding_window", None) is None:
            return False
        if self.sliding == "all":
            return True
        if self.sliding == "layer_types":
            layer_types = getattr(config, "layer_types", None) or []
            return layer_index < len(layer_types) and layer_types[layer_index] == "sliding_attention"
        return False


class CausalLM(nn.Module):
    """Decoder-only LM: embeddings, N decoder layers, final norm, LM head (maybe tied)."""

    def __init__(self, config: PretrainedConfig, arch: ArchitectureTraits, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, arch, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = Linear(config.hidden_size, [config.vocab_size], bias=False)
        inv_freq, attention_scaling = rope_inverse_frequencies(config)
        self.rotary = RotaryEmbedding(inv_freq, attention_scaling, max_positions)
        self.sliding_window = getattr(config, "sliding_window", None) if any(
            layer.attn.sliding for layer in self.layers
        ) else None
        self._native: tuple[tuple, NativeDecodeStep | None] | None = None  # see _native_step

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [B] the tokens whose next-token logits are wanted
        inputs_embeds: torch.Tensor | None = None,  # [T, H] instead of the tokens' embeddings (images)
    ) -> torch.Tensor:  # [B, V] float32
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [T, H]
        rotary = self.rotary(positions, hidden.dtype)
        if inputs_embeds is None and len(logits_indices) == len(input_ids):
            native = self._native_step(kv_caches)
            if native is not None and native.serves(len(input_ids), meta):
                return native(hidden, rotary, meta)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rotary, kv_cache, meta)
        # the last residual add and the norm, for the wanted rows only
        hidden = self.norm(hidden.index_select(0, logits_indices), residual.index_select(0, logits_indices))  # [B, H]
        return self.lm_head(hidden).float()  # [B, V]

    def _native_step(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> NativeDecodeStep | None:
        """The one-call decode step for these caches and the current (maybe LoRA-wrapped) layers;
        None where the model cannot take it. Built again when either changes."""
        key = (kv_caches, self.layers[0].qkv_proj)  # the LoRA manager wraps every layer or none
        if self._native is None or any(a is not b for a, b in zip(self._native[0], key)):
            self._native = (key, NativeDecodeStep(self, kv_caches) if NativeDecodeStep.supports(self, kv_caches) else None)
        return self._native[1]

    def lora_modules(self) -> dict[ModuleKey, tuple[nn.Module, str]]:
        """The linears LoRA can wrap: key -> (owner module, attribute name)."""
        return {(i, name): (layer, name) for i, layer in enumerate(self.layers) for name in LORA_WRAPPED}

    def lora_target(self, module: str) -> LoRATarget | None:
        return decoder_lora_target(module, len(self.layers))

    def lora_capable(self) -> str:
        """The LoRA-capable linears, for error messages."""
        return decoder_lora_capable(len(self.layers))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill parameters from Hugging Face checkpoint names, packing q/k/v and gate/up."""
        from .weight_map import assign_checkpoint_tensors

        assign_checkpoint_tensors(self, weights)
        if self.tie_word_embeddings:
            self.lm_head.weight.data = self.embed_tokens.weight.data
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_for_inference()


def decoder_lora_target(module: str, num_layers: int) -> LoRATarget | None:
    """The packed linear and slice of a PEFT module name (`model.layers.3.self_attn.q_proj`) in a
    decoder of `num_layers` layers; None for a module that is not one of its LoRA-capable linears."""
    from .weight_map import PACKED_MODULES

    match = _DECODER_MODULE.match(module)
    if match is None or match.group(2) not in PACKED_MODULES or int(match.group(1)) >= num_layers:
        return None
    packed, slice_index = PACKED_MODULES[match.group(2)]
    return (int(match.group(1)), packed), slice_index


def decoder_lora_capable(num_layers: int) -> str:
    from .weight_map import PACKED_MODULES

    return f"{', '.join(PACKED_MODULES)} of layers 0-{num_layers - 1}"
