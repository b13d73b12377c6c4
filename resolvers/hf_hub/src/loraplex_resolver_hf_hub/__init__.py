"""loraplex LoRA resolver for adapters on the Hugging Face Hub (opt-in).

Installed and named in `VLLM_PLUGINS`, it registers the resolver `lora_hf_hub_resolver` (entry
point of the same name in the group `loraplex.plugins`) for the repos listed in
`VLLM_LORA_RESOLVER_HF_REPO_LIST`. See README.md.
"""

from .resolver import RESOLVER_NAME, HfHubResolver, split_lora_name

__all__ = ["RESOLVER_NAME", "HfHubResolver", "split_lora_name"]
__version__ = "0.1.0"
