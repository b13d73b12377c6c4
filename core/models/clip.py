"""The CLIP vision transformer, as LLaVA models use it: patches in, one layer's hidden states out.

Images run as one flattened batch of tokens ([N * S, H], S = patches + 1 class token per image),
so every linear sees the `[T, in]` activations the LoRA layers expect: LoRA applies per image,
each image's tokens carrying its request's slot. Attention is bidirectional within an image.
Only the layers up to the one LLaVA reads (`vision_feature_layer`, usually the second to last)
run; the later ones, and the post-layernorm, never influence LLaVA's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .layers import Linear


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.layer_norm1 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.qkv_proj = Linear(hidden, [hidden] * 3, bias=True)
        self.out_proj = Linear(hidden, [hidden], bias=True)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.fc1 = Linear(hidden, [config.intermediate_size], bias=True)
        self.fc2 = Linear(config.intermediate_size, [hidden], bias=True)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor, num_images: int) -> torch.Tensor:  # [N * S, H]
        t, width = hidden.shape
        seq = t // num_images
        qkv = self.qkv_proj(self.layer_norm1(hidden))  # [N * S, 3H]
        q, k, v = qkv.view(num_images, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [N, h, S, d]
        attn = F.scaled_dot_product_attention(q, k, v)  # [N, h, S, d], every token sees its whole image
        hidden = hidden + self.out_proj(attn.transpose(1, 2).reshape(t, width))
        return hidden + self.fc2(self.act(self.fc1(self.layer_norm2(hidden))))  # [N * S, H]


class CLIPVisionTower(nn.Module):
    """CLIP's vision transformer (weights named as transformers' CLIPVisionTransformer)."""

    def __init__(self, config: PretrainedConfig, feature_layers: list[int]) -> None:
        super().__init__()
        if config.model_type != "clip_vision_model":
            raise ValueError(f"vision tower {config.model_type!r} is not supported; loraplex runs CLIP vision towers")
        hidden = config.hidden_size
        self.patch_size = config.patch_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.tokens_per_image = self.num_patches + 1  # the class token first
        self.patch_embedding = nn.Conv2d(config.num_channels, hidden, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.position_embedding = nn.Embedding(self.tokens_per_image, hidden)
        self.pre_layrnorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        # hidden_states[i] (transformers' numbering): 0 = the embeddings, i = after layer i - 1
        count = len(self.layers) + 1
        for given in feature_layers:
            if not -count <= given < count:
                raise ValueError(f"vision_feature_layer {given} is outside the {count} hidden states of the vision tower")
        self.feature_layers = [i % count for i in feature_layers]
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N * S, F * hidden]
        n = pixel_values.shape[0]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # [N, P, H]
        cls = self.class_embedding.expand(n, 1, -1)  # [N, 1, H]
        hidden = torch.cat((cls, patches), dim=1) + self.position_embedding.weight  # [N, S, H]
        hidden = self.pre_layrnorm(hidden).reshape(n * self.tokens_per_image, -1)  # [N * S, H]
        states = {0: hidden}
        for index, layer in enumerate(self.layers[: max(self.feature_layers)], start=1):
            hidden = layer(hidden, n)
            states[index] = hidden
        return torch.cat([states[i] for i in self.feature_layers], dim=-1)  # [N * S, F * H]
