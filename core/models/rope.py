"""Rotary inverse frequencies, computed by transformers' own functions for every rope type."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


def rope_inverse_frequencies(config: PretrainedConfig) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [D/2], attention_scaling) exactly as transformers computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        if rope_type not in ROPE_INIT_FUNCTIONS:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"rope type {rope_type!r} in the model config is not supported; "
                f"supported: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
            )
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        return inv_freq.float(), float(scaling)
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # [D/2]
    return inv_freq, 1.0
