"""Images in prompts: their processing into pixel values and placeholder tokens, their content
hashes (for the prefix cache), and reading them from the URLs of chat messages."""

from .inputs import MultiModalInputs
from .processor import ImageInputProcessor, load_image_processor

__all__ = ["ImageInputProcessor", "MultiModalInputs", "load_image_processor"]
