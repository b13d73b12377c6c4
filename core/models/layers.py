"""Building blocks of Llama-family decoders: norms, rotary embeddings, linears, activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import decoder_cpu, quant_cpu


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The norm of `x`; with `residual` (vLLM's fused add), of `residual += x`, added in place."""
        if x.dim() == 2 and decoder_cpu.usable(x):  # one kernel call, not ~8 torch operations
            return decoder_cpu.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = residual.add_(x)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate-half) with a cos/sin table indexed by position.

    The inverse frequencies come from `transformers`' own rope functions, so every rope type
    transformers knows (default, linear, llama3, yarn, ...) matches the oracle exactly.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int) -> None:
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32)  # [P]
        freqs = torch.outer(positions, inv_freq.float())  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)  # [P, D]
        self.register_buffer("sin", emb.sin() * attention_scaling, persistent=False)  # [P, D]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] for the step's positions [T]; computed once, used by every layer."""
        cos = self.cos.index_select(0, positions).unsqueeze(1).to(dtype)  # [T, 1, D]
        sin = self.sin.index_select(0, positions).unsqueeze(1).to(dtype)  # [T, 1, D]
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos, sin [T, 1, D]; in place (the native kernel) or a new tensor
    if decoder_cpu.usable(x):
        return decoder_cpu.rotary_(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# Up to this many tokens a CPU fp32 linear streams its plain weight once (decoder_cpu.linear):
# measured 1.3-1.6x faster than oneDNN's packed GEMM at 1-2 tokens, slower from 4 on.
GEMV_MAX_TOKENS = 2
# Up to this many tokens a linear with a GGUF weight reads it quantized (quant_cpu.linear)
QUANTIZED_MAX_TOKENS = 4


class Linear(nn.Module):
    """`y = x W^T + b`, with W possibly packed from several checkpoint tensors (q/k/v, gate/up).

    `output_sizes` names the row blocks ("slices") of W; the weight loader fills each slice from
    its own checkpoint tensor, and LoRA layers add one delta per slice. On CPU in float32 the
    weight is reordered once into oneDNN's blocked layout after loading (`pack_for_inference`):
    for the small batches of decoding that is about 1.5-2x faster than a plain GEMM. A step of
    one or two tokens instead streams the plain weight through the native GEMV, which reads it
    front to back at memory speed (a tied LM head then reads the embedding itself).
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self._packed: torch.Tensor | None = None
        self.quantized: quant_cpu.QuantizedWeight | None = None  # see attach_quantized

    def load_slice(self, index: int, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        start = sum(self.output_sizes[:index])
        rows = self.output_sizes[index]
        if weight.shape != (rows, self.in_features):
            raise ValueError(
                f"checkpoint tensor for slice {index} has shape {tuple(weight.shape)}, "
                f"expected {(rows, self.in_features)}"
            )
        self.weight.data[start : start + rows].copy_(weight)
        if bias is not None:
            if self.bias is None:
                raise ValueError("checkpoint has a bias for a linear layer configured without one")
            self.bias.data[start : start + rows].copy_(bias)

    def pack_for_inference(self) -> None:
        w = self.weight.data
        if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return
        try:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        except (RuntimeError, AttributeError):  # no oneDNN kernel for this CPU: plain GEMM it is
            self._packed = None

    def attach_quantized(self, weight: quant_cpu.QuantizedWeight) -> None:
        """Serve steps of up to QUANTIZED_MAX_TOKENS tokens from `weight` (GGUF blocks; the same
        values as the float weight, which larger steps keep using: see gguf_weights)."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"a quantized weight {list(weight.shape)} does not fit a linear "
                             f"[{self.out_features}, {self.in_features}]")
        self.quantized = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None and x.dim() == 2 and x.shape[0] <= QUANTIZED_MAX_TOKENS and decoder_cpu.usable(x):
            return quant_cpu.linear(x, self.quantized, self.bias)  # [T, N]
        if x.dim() == 2 and x.shape[0] <= GEMV_MAX_TOKENS and decoder_cpu.usable(x):
            return decoder_cpu.linear(x, self.weight, self.bias)  # [T, N]
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up [T, 2I] -> [T, I]
    if gate_up.dim() == 2 and decoder_cpu.usable(gate_up):
        return decoder_cpu.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
