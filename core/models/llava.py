"""LLaVA: a CLIP vision tower, a two-layer projector, and a Llama-family language model.

At prefill the tower encodes each image once (`encode_images`); the projector maps its patch
features into the language model's embedding space, and they replace the image's placeholder
tokens in the prompt (`embed`). Everything after the embeddings is the text decoder as it is,
so image and text-only requests share batches, the KV cache and the LoRA slots.

LoRA can reach every linear: the decoder's (keys `(layer, "qkv_proj")` as in the text models),
the tower's (`(layer, "vision_tower.qkv_proj")`, ...) and the projector's
(`(0, "multi_modal_projector.linear_1")`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .clip import CLIPVisionTower
from .layers import Linear
from .llama import ArchitectureTraits, CausalLM, LoRATarget, ModuleKey

# the tower's LoRA-capable linears, as PEFT names them -> (our packed module, slice)
VISION_PACKED = {
    "self_attn.q_proj": ("qkv_proj", 0),
    "self_attn.k_proj": ("qkv_proj", 1),
    "self_attn.v_proj": ("qkv_proj", 2),
    "self_attn.out_proj": ("out_proj", 0),
    "mlp.fc1": ("fc1", 0),
    "mlp.fc2": ("fc2", 0),
}
PROJECTOR_LINEARS = ("linear_1", "linear_2")

# checkpoint and PEFT module names: transformers >= 5 nests everything under `model.`, older
# checkpoints put the decoder under `language_model.model.` and the tower under `vision_model.`
_LM = re.compile(r"^(?:model\.language_model\.|language_model\.model\.)(.+)$")
_TOWER = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$")
_PROJECTOR = re.compile(r"^(?:model\.)?multi_modal_projector\.(linear_[12])$")
_TOWER_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


class LlavaProjector(nn.Module):
    def __init__(self, config: PretrainedConfig, vision_width: int) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        bias = bool(getattr(config, "multimodal_projector_bias", True))
        self.linear_1 = Linear(vision_width, [hidden], bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = Linear(hidden, [hidden], bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [T, F * Hv] -> [T, H]
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, config: PretrainedConfig, traits: ArchitectureTraits, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.language_model = CausalLM(config.text_config, traits, max_positions)
        layers = config.vision_feature_layer
        feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.vision_tower = CLIPVisionTower(config.vision_config, feature_layers)
        self.multi_modal_projector = LlavaProjector(config, config.vision_config.hidden_size * len(feature_layers))
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported (only 'default' and 'full')")
        self.drop_class_token = strategy == "default"  # 'default' drops CLIP's class token, 'full' keeps it
        self.image_token_id: int = config.image_token_id
        self.image_feature_size = self.vision_tower.tokens_per_image - int(self.drop_class_token)
        # the text decoder's interface, for the engine and the LoRA manager
        self.layers = self.language_model.layers
        self.embed_tokens = self.language_model.embed_tokens
        self.sliding_window = self.language_model.sliding_window

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, F, H]
        """Each image's embeddings, one row per placeholder token. The LoRA mapping of the step
        must give each image's `vision_tower.tokens_per_image` rows its slot: the class token is
        projected too (the projector works row by row) and dropped afterwards."""
        n = pixel_values.shape[0]
        features = self.multi_modal_projector(self.vision_tower(pixel_values))  # [N * S, H]
        features = features.view(n, self.vision_tower.tokens_per_image, -1)  # [N, S, H]
        return features[:, 1:] if self.drop_class_token else features

    def embed(self, input_ids: torch.Tensor, rows: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, H] with the rows at `rows` [R] replaced by `image_embeds` [R, H]."""
        embeds = self.embed_tokens(input_ids)  # [T, H]
        return embeds.index_copy_(0, rows, image_embeds.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta, logits_indices: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:  # [B, V]
        return self.language_model(input_ids, positions, kv_caches, meta, logits_indices, inputs_embeds)

    # ---- LoRA -------------------------------------------------------------------------------------

    def lora_modules(self) -> dict[ModuleKey, tuple[nn.Module, str]]:
        modules = self.language_model.lora_modules()
        for i, layer in enumerate(self.vision_tower.layers):
            for name in dict.fromkeys(packed for packed, _ in VISION_PACKED.values()):
                modules[(i, f"vision_tower.{name}")] = (layer, name)
        for name in PROJECTOR_LINEARS:
            modules[(0, f"multi_modal_projector.{name}")] = (self.multi_modal_projector, name)
        return modules

    def lora_target(self, module: str) -> LoRATarget | None:
        if (match := _LM.match(module)) is not None:
            return self.language_model.lora_target(f"model.{match.group(1)}")
        if (match := _PROJECTOR.match(module)) is not None:
            return (0, f"multi_modal_projector.{match.group(1)}"), 0
        if (match := _TOWER.match(module)) is not None and (layer := _TOWER_LAYER.match(match.group(1))) is not None:
            packed = VISION_PACKED.get(layer.group(2))
            if packed is not None and int(layer.group(1)) < len(self.vision_tower.layers):
                return (int(layer.group(1)), f"vision_tower.{packed[0]}"), packed[1]
        return None

    def lora_capable(self) -> str:
        return (f"{self.language_model.lora_capable()} in the language model; "
                f"{', '.join(VISION_PACKED)} in the vision tower's {len(self.vision_tower.layers)} layers; "
                f"{', '.join(PROJECTOR_LINEARS)} in the projector")

    # ---- weights ----------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        other: dict[str, torch.Tensor] = {}
        self.language_model.load_weights(_split_language_model(weights, other))
        expected = {name for name, _ in self._vision_parameters()}
        for name, tensor in other.items():
            if (match := _TOWER.match(name)) is not None:
                self._load_tower(match.group(1), tensor, name)
            elif (match := _PROJECTOR.match(name.rsplit(".", 1)[0])) is not None:
                self._load_linear(getattr(self.multi_modal_projector, match.group(1)), name.rsplit(".", 1)[1], tensor, name)
            else:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the LLaVA model")
            expected.discard(_canonical(name))
        missing = sorted(expected)
        if missing:
            raise ValueError(f"checkpoint lacks tensors the model needs: {', '.join(missing[:5])}")
        for module in (self.vision_tower, self.multi_modal_projector):
            for linear in module.modules():
                if isinstance(linear, Linear):
                    linear.pack_for_inference()

    def _vision_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self.vision_tower.named_parameters():
            yield f"vision_tower.{_checkpoint_tower_name(name)}", param
        for name, param in self.multi_modal_projector.named_parameters():
            yield f"multi_modal_projector.{name}", param

    def _load_tower(self, rest: str, tensor: torch.Tensor, name: str) -> None:
        tower = self.vision_tower
        if rest.startswith(("post_layernorm.", "head.")):
            return  # after the layer LLaVA reads: never used
        if (layer := _TOWER_LAYER.match(rest)) is not None:
            index, inner = int(layer.group(1)), layer.group(2)
            if index >= len(tower.layers):
                raise ValueError(f"checkpoint tensor {name!r}: the vision tower has {len(tower.layers)} layers")
            module = tower.layers[index]
            for prefix, (attr, slice_index) in VISION_PACKED.items():
                if inner in (f"{prefix}.weight", f"{prefix}.bias"):
                    self._load_linear(getattr(module, attr), inner.rsplit(".", 1)[1], tensor, name, slice_index)
                    return
            target = _parameter(module, inner)
        else:
            target = _parameter(tower, rest.replace("embeddings.", "", 1))
        if target is None or target.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the vision tower"
                             if target is None else
                             f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
        target.data.copy_(tensor)

    @staticmethod
    def _load_linear(linear: Linear, kind: str, tensor: torch.Tensor, name: str, slice_index: int = 0) -> None:
        try:
            if kind == "weight":
                linear.load_slice(slice_index, tensor)
            else:
                start = sum(linear.output_sizes[:slice_index])
                linear.bias.data[start : start + linear.output_sizes[slice_index]].copy_(tensor)
        except (ValueError, RuntimeError, AttributeError) as exc:
            raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc


def _split_language_model(weights: Iterable[tuple[str, torch.Tensor]], other: dict[str, torch.Tensor]
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """The decoder's tensors under the text models' names; the rest is put into `other`."""
    for name, tensor in weights:
        if (match := _LM.match(name)) is not None:
            yield f"model.{match.group(1)}", tensor
        elif name in ("lm_head.weight", "language_model.lm_head.weight"):
            yield "lm_head.weight", tensor
        else:
            other[name] = tensor


def _parameter(module: nn.Module, dotted: str) -> torch.Tensor | None:
    try:
        return module.get_parameter(dotted)
    except AttributeError:
        return None


_PACKED_BACK = {"qkv_proj": "self_attn.qkv_proj", "out_proj": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _checkpoint_tower_name(name: str) -> str:
    """Our tower parameter name -> the checkpoint's (q/k/v reported as qkv, enough for 'missing')."""
    if name.startswith("layers."):
        _, index, module, kind = name.split(".")
        return f"encoder.layers.{index}.{_PACKED_BACK.get(module, module)}.{kind}"
    if name in ("pre_layrnorm.weight", "pre_layrnorm.bias"):
        return name
    return f"embeddings.{name}"


def _canonical(name: str) -> str:
    """A checkpoint name in the form `_vision_parameters` reports (q/k/v folded into qkv)."""
    if (match := _TOWER.match(name)) is not None:
        rest = re.sub(r"self_attn\.[qkv]_proj\.", "self_attn.qkv_proj.", match.group(1))
        return f"vision_tower.{rest}"
    if (match := _PROJECTOR.match(name.rsplit(".", 1)[0])) is not None:
        return f"multi_modal_projector.{match.group(1)}.{name.rsplit('.', 1)[1]}"
    return name
