"""A prompt's images once processed: pixel values, where their placeholder tokens sit, and hashes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class MultiModalInputs:
    """The images of one sequence's prompt.

    `placeholders[i]` is (offset, length) of image i's placeholder tokens in the prompt: the
    model puts the image's embeddings there. The placeholder tokens are the same for every
    image, so the prefix cache keys each KV block that overlaps an image with the image's
    content hash too (`block_keys`): two prompts share such a block only for the same pixels.
    `features` keeps an image's embeddings [F, H] from the step that encoded it until its
    prompt is prefilled (a prompt prefilled in chunks may need them over several steps).
    """

    pixel_values: torch.Tensor  # [N, 3, H, W]
    placeholders: list[tuple[int, int]]
    hashes: list[bytes]
    features: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, pixel_values: torch.Tensor, placeholders: list[tuple[int, int]]) -> "MultiModalInputs":
        return cls(pixel_values, placeholders, [image_hash(image) for image in pixel_values])

    @property
    def modalities(self) -> set[str]:
        return {"image"} if self.placeholders else set()

    def block_keys(self, start: int, end: int) -> tuple[bytes, ...]:
        """The hashes of the images whose placeholders overlap token positions [start, end)."""
        return tuple(h for h, (offset, length) in zip(self.hashes, self.placeholders)
                     if offset < end and offset + length > start)

    def for_sequence(self) -> "MultiModalInputs":
        """A copy for one more sample of the request, with its own feature cache."""
        return MultiModalInputs(self.pixel_values, self.placeholders, self.hashes)


def image_hash(pixel_values: torch.Tensor) -> bytes:
    """SHA-256 of an image's pixel values [3, H, W] and shape: what the vision tower sees."""
    data = pixel_values.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.digest()
