"""LoRA serving: adapter requests, PEFT loading, the slot/cache manager and wrapped linears.

    request      LoRARequest (vLLM's)
    resolve      a string lora_request -> LoRARequest (added name, local dir, Hub repo id)
    peft_config  reading and vetting adapter_config.json
    adapter      loading and checking adapter weights, scaling folded into B
    layers       LoRALinear: base output plus per-token deltas by slot
    manager      CPU LRU cache, device slots, pinning, per-adapter statistics
"""

from .request import LoRARequest

__all__ = ["LoRARequest"]
