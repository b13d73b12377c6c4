"""The exception hierarchy, documented in one place.

Every error loraplex raises on purpose derives from `LoraplexError`. Messages name the thing,
the reason and the fix.

    LoraplexError
    ├── ConfigError            invalid engine / model configuration (bad option, budget too small)
    │   └── UnsupportedModelError   an architecture loraplex does not implement
    ├── ModelNotFoundError     a model path or name that leads nowhere
    ├── InvalidRequestError    a request that cannot be served (prompt too long, bad sampling params)
    │   └── InvalidSamplingParamsError
    ├── PluginError            a plugin failed to load, in strict mode (see loraplex.plugins)
    ├── EngineDeadError        the async engine's loop stopped (a failed step, or shut down)
    └── LoRAError              anything about an adapter (see loraplex.lora)
        ├── LoRAAdapterNotFoundError
        └── InvalidLoRAAdapterError

`InvalidRequestError`s are also `ValueError`s, so code written against vLLM's API that catches
`ValueError` keeps working.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class of every error raised on purpose by loraplex."""


class ConfigError(LoraplexError, ValueError):
    """An engine or model option is invalid."""


class UnsupportedModelError(ConfigError):
    """The model's architecture is not implemented."""


class ModelNotFoundError(LoraplexError, FileNotFoundError):
    """A model path or name does not lead to a usable model."""


class InvalidRequestError(LoraplexError, ValueError):
    """A request cannot be served as given."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of its allowed range."""


class PluginError(LoraplexError):
    """A plugin failed to import or to register its resolvers (raised only in strict mode)."""


class EngineDeadError(LoraplexError, RuntimeError):
    """The async engine's loop is no longer running: its requests end, new ones are refused."""


class LoRAError(LoraplexError):
    """Something is wrong with a LoRA adapter."""


class LoRAAdapterNotFoundError(LoRAError, FileNotFoundError):
    """An adapter name or path leads nowhere."""


class InvalidLoRAAdapterError(LoRAError, ValueError):
    """An adapter exists but cannot be served on this model."""
