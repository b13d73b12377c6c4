"""LoRA serving: adapter requests, PEFT loading, the slot/cache manager and wrapped linears.

    request      LoRARequest (vLLM's)
    catalog      the one owner of names, ids, checks, resolution and in-place reloads
    hub          adapters named by a Hugging Face Hub repo id (the Python API's last resort)
    peft_config  reading and vetting adapter_config.json
    adapter      loading and checking adapter weights, scaling folded into B
    fingerprint  size, mtime and digest of an adapter's files, to find changes on disk
    layers       LoRALinear: base output plus per-token deltas by slot
    manager      weights only: CPU LRU cache, device slots, pinning, per-adapter statistics
    slot_layout  where each wrapped linear's weights sit in a slot's flat buffer
    resolver     alias of loraplex.resolver (vLLM's import path)
    resolution   on-demand resolution of unknown names through the resolvers
    adapter_dir  checks resolvers share: safe names, adapter directories for the served model
"""

from .request import LoRARequest

__all__ = ["LoRARequest"]
