"""Turning a prompt's `multi_modal_data` into pixel values and expanded placeholder tokens.

Prompts carry images as vLLM's do: `{"prompt": "USER: <image>\\nWhat is this? ASSISTANT:",
"multi_modal_data": {"image": PIL.Image or a list of them}}`. Each `<image>` token of the prompt
stands for one image, in order, and becomes as many placeholder tokens as the model makes
embeddings for an image (a prompt that already holds that many in a row is taken as it is).
Pixel values come from the model's own image processor, transformers' PIL backend (Pillow is
all it needs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidRequestError, ModelNotFoundError
from .inputs import MultiModalInputs

SUPPORTED_MODALITIES = ("image",)


def load_image_processor(model_path: Path) -> Any:
    """The model directory's image processor, with transformers' PIL backend."""
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(model_path), backend="pil")
    except ImportError as exc:
        raise ModelNotFoundError(f"the image processor of {str(model_path)!r} needs Pillow ({exc}); "
                                 "install it with `pip install loraplex[multimodal]`") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot load the image processor of {str(model_path)!r} ({exc}); a LLaVA model "
                                 "directory needs its preprocessor_config.json or processor_config.json") from exc


class ImageInputProcessor:
    """Checks and processes the images of prompts for one model."""

    def __init__(self, image_processor: Any, image_token_id: int, image_token: str, feature_size: int,
                 limit_per_prompt: int) -> None:
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_token = image_token  # its text, e.g. "<image>"
        self.feature_size = feature_size  # placeholder tokens (embeddings) per image
        self.limit_per_prompt = limit_per_prompt

    def process(self, token_ids: list[int], multi_modal_data: object) -> tuple[list[int], MultiModalInputs | None]:
        """The prompt's tokens with every image placeholder expanded, and its images' inputs
        (None when it has none). InvalidRequestError names what is wrong and how to fix it."""
        images = self._images(multi_modal_data)
        slots = self._image_slots(token_ids)
        if len(slots) != len(images):
            raise InvalidRequestError(
                f"the prompt has {len(slots)} image placeholder(s) ({self.image_token!r}) but {len(images)} image(s) "
                f"were given; put one {self.image_token!r} in the prompt for each image"
            )
        if not images:
            return token_ids, None
        expanded: list[int] = []
        placeholders = []
        previous = 0
        for start, length in slots:
            expanded.extend(token_ids[previous:start])
            placeholders.append((len(expanded), self.feature_size))
            expanded.extend([self.image_token_id] * self.feature_size)
            previous = start + length
        expanded.extend(token_ids[previous:])
        return expanded, MultiModalInputs.of(self._pixel_values(images), placeholders)

    def _image_slots(self, token_ids: list[int]) -> list[tuple[int, int]]:
        """(start, length) of each image's placeholder in the prompt: a run of k * feature_size
        placeholder tokens is k images already expanded; any other run is one image per token."""
        slots = []
        for start, length in _runs(token_ids, self.image_token_id):
            size = self.feature_size if length % self.feature_size == 0 else 1
            slots.extend((start + i, size) for i in range(0, length, size))
        return slots

    def _images(self, multi_modal_data: object) -> list[Any]:
        from PIL import Image

        if not isinstance(multi_modal_data, dict):
            raise InvalidRequestError(f"multi_modal_data must be a dict such as {{'image': image}}; "
                                      f"got {type(multi_modal_data).__name__}")
        unsupported = sorted(set(multi_modal_data) - set(SUPPORTED_MODALITIES))
        if unsupported:
            raise InvalidRequestError(f"multi_modal_data has {', '.join(map(repr, unsupported))}; this model takes "
                                      f"{', '.join(SUPPORTED_MODALITIES)} only")
        value = multi_modal_data.get("image")
        images = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise InvalidRequestError(f"multi_modal_data['image'] item {index} is a {type(image).__name__}, not a "
                                          "PIL image; open the image with PIL.Image.open")
        self.check_count(len(images))
        return images

    def check_count(self, count: int) -> None:
        """Refuse a prompt of more images than `limit_mm_per_prompt` allows."""
        if count > self.limit_per_prompt:
            raise InvalidRequestError(
                f"the prompt has {count} images, more than the {self.limit_per_prompt} allowed per prompt; send "
                f"fewer, or start the engine with a larger limit_mm_per_prompt={{'image': {count}}}"
            )

    def _pixel_values(self, images: list[Any]) -> torch.Tensor:
        try:
            pixels = self.image_processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        except Exception as exc:  # Pillow raises many types for a truncated or corrupt image
            raise InvalidRequestError(f"an image of the prompt cannot be decoded ({type(exc).__name__}: {exc}); "
                                      "send a valid PNG, JPEG, GIF, BMP or WebP image") from exc
        return pixels.float()  # [N, 3, H, W]


def _runs(token_ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of `token` in `token_ids`."""
    runs: list[tuple[int, int]] = []
    for position, value in enumerate(token_ids):
        if value != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == position:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((position, 1))
    return runs
