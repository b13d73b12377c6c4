"""loraplex LoRA resolver for adapters in S3 or an S3-compatible store (opt-in).

Installed and named in `VLLM_PLUGINS`, it registers the resolver `lora_s3_resolver` (entry point
of the same name in the group `loraplex.plugins`), configured by `LORAPLEX_S3_LORA_URI` and
friends. See README.md.
"""

from .resolver import RESOLVER_NAME, S3Resolver
from .uri import S3Location, S3UriTemplate

__all__ = ["RESOLVER_NAME", "S3Location", "S3Resolver", "S3UriTemplate"]
__version__ = "0.1.0"
