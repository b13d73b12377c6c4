"""`quantization="gguf"`: the decoder's projections served from the model's GGUF file as it
stores them (Q4_1, Q8_0), on the CPU.

The model is loaded as usual first (float32, from the Hugging Face directory, which for the
embedded model is the GGUF file dequantized: the very same values). Each projection then also
gets its GGUF weight (`loraplex.kernels.quant_cpu`): decode steps of a few tokens, which only
stream weights, read the quantized bytes (~0.6 byte per weight for Q4_1 instead of 4) with
activations quantized per 32-value block as llama.cpp does; prefill and large batches, which are
compute-bound, keep the float GEMM over the same values. A tied LM head reads the Q8_0 token
embedding. LoRA adapters still add their float deltas on top.

GGUF keeps llama.cpp's row order for q and k (each head's rotary halves interleaved); the rows
are put back in Hugging Face order here, as transformers does when it reads a GGUF file.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import torch

from ..errors import ConfigError
from ..kernels import quant_cpu

__all__ = ["find_gguf_file", "attach_gguf_weights"]

logger = logging.getLogger(__name__)

# GGUF tensor name of each projection slice, in the order of our packed linears
_PROJECTIONS = {
    "qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "o_proj": ("attn_output",),
    "gate_up_proj": ("ffn_gate", "ffn_up"),
    "down_proj": ("ffn_down",),
}


def find_gguf_file(model_path: Path) -> Path:
    """The GGUF file whose weights `quantization="gguf"` serves for the model at `model_path`: the
    embedded model's own, or the one `*.gguf` file in the model directory."""
    from .embedded import embedded_model_cache_path, gguf_path

    if model_path.resolve() == embedded_model_cache_path().resolve():
        return gguf_path()
    files = sorted(model_path.glob("*.gguf"))
    if len(files) != 1:
        found = f"found {len(files)}: {', '.join(f.name for f in files)}" if files else "found none"
        raise ConfigError(
            f"quantization='gguf' serves the weights of the model's GGUF file, and the model directory "
            f"{str(model_path)!r} must hold exactly one *.gguf file ({found}); put the GGUF file of this model "
            "beside its config.json, or leave quantization unset to serve the float weights"
        )
    return files[0]


def attach_gguf_weights(model: torch.nn.Module, gguf_file: Path) -> None:
    """Give each projection of `model` (and a tied LM head) its weight from `gguf_file`.

    Raises ConfigError when the file does not match the model or holds a format the CPU kernels
    do not take (they take Q4_1 and Q8_0), and when the kernels cannot be built here."""
    import gguf

    if not quant_cpu.available():
        raise ConfigError("quantization='gguf' runs on the native CPU kernels, which are unavailable here (no C++ "
                          "compiler, or LORAPLEX_CPU_KERNEL=0); install g++ or leave quantization unset")
    reader = gguf.GGUFReader(str(gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    config = model.config

    def weight(name: str, heads: int | None = None) -> quant_cpu.QuantizedWeight:
        tensor = tensors.get(f"{name}.weight")
        if tensor is None:
            raise ConfigError(f"{gguf_file.name} has no tensor {name}.weight: it is not a GGUF file of this model "
                              f"({config.model_type}, {config.num_hidden_layers} layers)")
        n, k = (int(s) for s in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
        if tensor.tensor_type not in quant_cpu.GGUF_TYPES:
            raise ConfigError(
                f"{gguf_file.name}: {name}.weight is {tensor.tensor_type.name}, and the CPU kernels take "
                f"{', '.join(t.name for t in quant_cpu.GGUF_TYPES)}; re-quantize the file to one of those "
                "(llama-quantize) or leave quantization unset"
            )
        qw = quant_cpu.from_gguf(tensor.data, tensor.tensor_type, (n, k))
        return qw if heads is None else quant_cpu.permute_rows(qw, _unpermute_rows(n, heads))

    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for i, layer in enumerate(model.layers):
        for module, names in _PROJECTIONS.items():
            linear = getattr(layer, module)
            linear = getattr(linear, "base", linear)  # under a LoRA wrapper: its projection
            parts = [weight(f"blk.{i}.{name}", heads.get(name)) for name in names]
            linear.attach_quantized(quant_cpu.concat_rows(parts) if len(parts) > 1 else parts[0])
    head = "token_embd" if model.tie_word_embeddings else "output"
    model.lm_head.attach_quantized(weight(head))
    attached = [m.quantized for m in model.modules() if getattr(m, "quantized", None) is not None]
    kinds = collections.Counter(w.kind for w in attached)
    logger.info("quantization='gguf': %d projections read %s (%.0f MB) from %s in decode steps", len(attached),
                ", ".join(f"{n} {k.upper()}" for k, n in sorted(kinds.items())), sum(w.nbytes for w in attached) / 1e6,
                gguf_file)


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row i of the Hugging Face weight is row index[i] of llama.cpp's (q and k are stored with
    each head's two rotary halves interleaved)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)
