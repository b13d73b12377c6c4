"""The resolver API: `LoRAResolver` and the process-wide `LoRAResolverRegistry` (vLLM's names).

A resolver finds an adapter the server has never seen, by name, in some source (a directory
tree, the Hugging Face Hub, S3, ...) and returns a `LoRARequest` whose `lora_path` is a local
PEFT adapter directory, or None when its source does not hold that name:

    from loraplex.lora.request import LoRARequest
    from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class MyResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            ...

    LoRAResolverRegistry.register_resolver("my_resolver", MyResolver())

Code written against vLLM (`vllm.lora.resolver`, `vllm.lora.request`) runs with `vllm` changed
to `loraplex` in its import lines. Resolvers are asked in registration order; the first that
returns a LoRARequest wins (see `loraplex.lora.resolution` for timeouts, single-flight and
negative caching, and `loraplex.plugins` for how installed packages register theirs).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

from .lora.request import LoRARequest

__all__ = ["LoRARequest", "LoRAResolver", "LoRAResolverRegistry"]

logger = logging.getLogger(__name__)


class LoRAResolver(ABC):
    """Base class of LoRA adapter resolvers.

    `resolve_lora` is a coroutine: do network and disk work without blocking the event loop
    (an async client, or `asyncio.to_thread` around blocking calls). Return None when the
    source does not hold `lora_name`; raise only for real failures (the core reports them and
    asks the next resolver). Refuse names that would leave your source (`..`, absolute paths).
    """

    @abstractmethod
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """Locate (and fetch, if remote) adapter `lora_name` for base model `base_model_name`.

        Returns a LoRARequest whose `lora_path` is a local directory holding
        `adapter_config.json` and the adapter weights, or None if the adapter is not found.
        """


class _LoRAResolverRegistry:
    """Resolvers by name, in registration order (which is the order they are asked).

    `resolvers` is the dict of name -> resolver, as in vLLM; prefer the methods, which check
    what is registered and are safe from several threads.
    """

    def __init__(self) -> None:
        self.resolvers: dict[str, LoRAResolver] = {}
        self._lock = threading.RLock()

    def register_resolver(self, resolver_name: str, resolver: LoRAResolver) -> None:
        """Register `resolver` under `resolver_name`; an existing one of that name is replaced
        (keeping its place in the order) with a logged warning."""
        if not isinstance(resolver_name, str) or not resolver_name:
            raise TypeError(f"resolver_name must be a non-empty string; got {resolver_name!r}")
        if not isinstance(resolver, LoRAResolver):
            if isinstance(resolver, type):
                what = f"the class {_qualname(resolver)}"
            else:
                what = f"{resolver!r} (a {_qualname(type(resolver))})"
            raise TypeError(
                f"cannot register {what} as LoRA resolver {resolver_name!r}: it is not a LoRAResolver instance; "
                "subclass loraplex.lora.resolver.LoRAResolver and pass an instance"
            )
        with self._lock:
            old = self.resolvers.get(resolver_name)
            if old is not None and old is not resolver:
                # vLLM's wording, then which resolver it was
                logger.warning(
                    "LoRA resolver %s is already registered, and will be overwritten by the new resolver instance "
                    "%r (it was %r; it keeps its place in the order)", resolver_name, resolver, old
                )
            self.resolvers[resolver_name] = resolver

    def unregister_resolver(self, resolver_name: str) -> None:
        """Remove a resolver; KeyError (as get_resolver's) if there is none by that name."""
        with self._lock:
            if resolver_name not in self.resolvers:
                raise KeyError(self._missing(resolver_name))
            del self.resolvers[resolver_name]

    def get_resolver(self, resolver_name: str) -> LoRAResolver:
        """The resolver registered as `resolver_name`; KeyError naming the registered ones if none."""
        with self._lock:
            try:
                return self.resolvers[resolver_name]
            except KeyError:
                raise KeyError(self._missing(resolver_name)) from None

    def get_supported_resolvers(self) -> Sequence[str]:
        """Registered names in registration order, the order in which they are asked."""
        with self._lock:
            return list(self.resolvers)

    def items(self) -> list[tuple[str, LoRAResolver]]:
        """(name, resolver) pairs in registration order: a snapshot, safe to iterate."""
        with self._lock:
            return list(self.resolvers.items())

    def clear(self) -> None:
        """Forget every resolver (for tests)."""
        with self._lock:
            self.resolvers.clear()

    def __contains__(self, resolver_name: object) -> bool:
        return resolver_name in self.resolvers

    def __repr__(self) -> str:
        return f"LoRAResolverRegistry({self.get_supported_resolvers()!r})"

    # Used by the plugin loader to undo what a plugin registered before it failed.
    def _snapshot(self) -> dict[str, LoRAResolver]:
        with self._lock:
            return dict(self.resolvers)

    def _restore(self, snapshot: dict[str, LoRAResolver]) -> None:
        with self._lock:  # in place: whoever holds `resolvers` sees the restored dict
            self.resolvers.clear()
            self.resolvers.update(snapshot)

    def _missing(self, resolver_name: str) -> str:
        # vLLM's message first (code may match on it), then the fix
        return (
            f"LoRA resolver {resolver_name!r} not found. Available resolvers: {list(self.resolvers)}. Install and "
            "enable the plugin that provides it (see `loraplex plugins` and VLLM_PLUGINS)"
        )


def _qualname(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


LoRAResolverRegistry = _LoRAResolverRegistry()
