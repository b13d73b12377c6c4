"""A decoder's whole decode step as one native call, for steps of a few single-token decodes.

At batch 1 on a CPU the step of a small model is a stream of ~120 weight reads with ~150 small
operations between them; run one by one from Python, the calls, allocations and the threads'
fork/join around each cost a quarter of the step. `NativeDecodeStep` describes the model once
(pointers to every weight, norm and KV cache) to `decoder_cpu.decode_step`, which runs all layers,
the final norm and the LM head inside one parallel region.

It serves a step when all of these hold, else the model runs layer by layer as usual:
- float32 on the CPU with the native kernels built (the model runner then gives the decode
  context lengths: `meta.decode_context_lens`), and no per-head q/k norm (Qwen3);
- the step is decodes only, without image embeddings, and few enough that streaming each weight
  once per 4 tokens beats the packed GEMM (layers.GEMV_MAX_TOKENS; QUANTIZED_MAX_TOKENS for GGUF
  weights).

Tokens with LoRA adapters get their deltas inside the step, from the LoRA manager's slots, as
the LoRA-wrapped layers would add them (core/lora/layers.py); float32 and bfloat16 slots (a
float16 `lora_dtype` sends steps with adapters layer by layer).
"""

from __future__ import annotations

import torch

from ..kernels import decoder_cpu
from .attention import AttentionMetadata
from .layers import GEMV_MAX_TOKENS, QUANTIZED_MAX_TOKENS, Linear

__all__ = ["NativeDecodeStep"]



class NativeDecodeStep:
    """The native step of one model over one set of KV caches (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # the step state of each LoRA-wrapped linear (one object shared by all of them)
        self._lora_states = {id(s): s for layer in model.layers for name in _PROJECTIONS
                             if (s := getattr(getattr(layer, name), "state", None)) is not None}
        first = model.layers[0]
        quantized = _plain_linear(first.qkv_proj).quantized is not None
        self.max_tokens = QUANTIZED_MAX_TOKENS if quantized else GEMV_MAX_TOKENS
        self._offsets: list[torch.Tensor] = []  # each LoRA-wrapped projection's slice offsets, kept alive
        self.adapters_native = True  # whether steps with adapters can run natively (see _lora)
        self._layers = (decoder_cpu.LayerDesc * len(model.layers))(*(
            decoder_cpu.LayerDesc(
                layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                *(_linear(getattr(layer, name)) for name in _PROJECTIONS),
                *(self._lora(getattr(layer, name)) for name in _PROJECTIONS),
                k_cache.data_ptr(), v_cache.data_ptr(), (model.sliding_window or 0) if layer.attn.sliding else 0,
            )
            for layer, (k_cache, v_cache) in zip(model.layers, kv_caches)
        ))
        self.desc = decoder_cpu.ModelDesc(
            self._layers, len(model.layers), model.config.hidden_size, first.num_heads, first.num_kv_heads,
            first.head_dim, model.config.intermediate_size, first.input_layernorm.eps, first.attn.scale,
            model.norm.weight.data_ptr(), _linear(model.lm_head),
        )

    @staticmethod
    def supports(model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        weight = model.embed_tokens.weight
        return (
            weight.dtype is torch.float32 and weight.device.type == "cpu" and decoder_cpu.available()
            and all(layer.q_norm is None for layer in model.layers)
            and all(k.is_contiguous() and v.is_contiguous() for k, v in kv_caches)
            and all(_plain_linear(getattr(layer, name)).weight.is_contiguous() for layer in model.layers
                    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
        )

    def _lora(self, module: torch.nn.Module) -> decoder_cpu.LoRADesc:
        """Where a LoRA-wrapped projection's adapters sit (see core/lora/slot_layout.py); zeros for
        a projection without."""
        lora_a, lora_b = getattr(module, "lora_a", None), getattr(module, "lora_b", None)
        if lora_a is None:
            return decoder_cpu.LoRADesc()
        if lora_a.dtype not in _LORA_DTYPES:  # float16 slots: steps with adapters go layer by layer
            self.adapters_native = False
            return decoder_cpu.LoRADesc()
        offsets = torch.tensor(module.slice_offsets, dtype=torch.int64)
        self._offsets.append(offsets)
        return decoder_cpu.LoRADesc(lora_a.data_ptr(), lora_b.data_ptr(), lora_a.stride(0), len(module.output_sizes),
                                    lora_b.shape[2], _LORA_DTYPES[lora_a.dtype], offsets.data_ptr())

    def serves(self, tokens: int, meta: AttentionMetadata) -> bool:
        """Whether this step (`tokens` tokens laid out by `meta`) can run natively."""
        return (
            0 < tokens <= self.max_tokens and meta.num_prefill_tokens == 0 and meta.decode_context_lens is not None
            and (self.adapters_native or self._lora_slots(tokens) is None)
        )

    def _lora_slots(self, tokens: int) -> torch.Tensor | None:
        """[T] int64 each token's LoRA slot (-1: none), or None when no token of the step has one."""
        mapping = next(iter(self._lora_states.values())).mapping if self._lora_states else None
        if mapping is None or not mapping.any_active:
            return None
        slots = torch.full((tokens,), -1, dtype=torch.int64)
        for slot, start, end in mapping.runs_host:
            slots[start:end] = slot
        return slots

    def __call__(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:  # [T, V] float32
        cos, sin = rotary  # [T, 1, D] each
        t = hidden.shape[0]
        logits = torch.empty(t, self.desc.lm_head.n, dtype=torch.float32)  # [T, V]
        return decoder_cpu.decode_step(self.desc, hidden.contiguous(), cos.reshape(t, -1), sin.reshape(t, -1),
                                       meta.slot_mapping, meta.decode_blocks, meta.decode_context_lens,
                                       meta.block_size, self._lora_slots(t), logits)


_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_LORA_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _plain_linear(module: torch.nn.Module) -> Linear:
    return getattr(module, "base", module)  # a LoRA-wrapped linear's own projection


def _linear(module: torch.nn.Module) -> decoder_cpu.LinearDesc:
    linear = _plain_linear(module)
    bias = linear.bias.data_ptr() if linear.bias is not None else None
    quantized = linear.quantized
    kind, weight = ("float32", linear.weight) if quantized is None else (quantized.kind, quantized.data)
    return decoder_cpu.LinearDesc(decoder_cpu.LINEAR_KINDS[kind], weight.data_ptr(), bias, linear.out_features,
                                  linear.in_features)


