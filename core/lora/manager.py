"""The LoRA manager: known adapters, a CPU LRU cache of their weights, and the device slots.

An adapter moves disk -> CPU cache (`max_cpu_loras`, least recently used evicted) -> device slot
(`max_loras`). A slot whose adapter serves a running sequence, or is pinned, is never taken;
otherwise the least recently used slot is reused. Every wrapped linear holds the slots' stacked
weights as views of one flat buffer per slot, and an adapter waits in the CPU cache as a flat
image of that buffer, so activating it is one copy (see slot_layout).

The manager holds weights only: which adapters it knows (a name, the directory it was read from
and the files' fingerprint), the CPU cache and the slots. Names, ids, checks and resolution are
the catalog's (loraplex.lora.catalog), which reads adapters from disk with `read` (pure, any
thread) and hands them over with `add` / `replace`. Every method that changes the manager runs
on the engine's thread, between steps.

A name keeps meaning the weights it was added with. The files' fingerprint (size, mtime and
SHA-256 of adapter_config.json and of the weight file, see fingerprint) is recorded by `add`;
when an adapter evicted from the CPU cache is read from disk again, files whose content changed
meanwhile are refused with a LoRAError (the requests that need the adapter fail, nothing else
does) rather than silently served, or silently adopted, under the old name. New files are taken
only when the operator says so: an in-place reload (`replace` records the new fingerprint), or
remove_lora + add_lora. A file merely touched (new mtime, same content) is the same adapter.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, LoRAAdapterNotFoundError, LoRAError
from ..kernels import LoRABatchMapping, native_cpu
from ..models import Model
from .. import huge_pages
from .adapter import LoRAAdapter, load_adapter
from .fingerprint import Fingerprint
from .layers import LoRALinear, LoRAStepState
from .slot_layout import ModuleKey, SlotLayout


@dataclass
class AdapterStats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    loads: int = 0  # disk -> CPU
    load_seconds: float = 0.0
    activations: int = 0  # CPU -> device slot
    cache_hits: int = 0  # found in a slot or the CPU cache when a request needed it
    cache_misses: int = 0
    evictions: int = 0


@dataclass
class LoRAManagerConfig:
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    served_names: set[str] = field(default_factory=set)
    dtype: torch.dtype | None = None  # the adapters' storage dtype; None: the model's

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError(f"max_loras must be >= 1; got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ConfigError(f"max_lora_rank must be >= 1; got {self.max_lora_rank}")
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


class LoRAManager:
    def __init__(self, model: Model, config: LoRAManagerConfig) -> None:
        self.config = config
        self.model = model
        weight = model.embed_tokens.weight
        self.dtype, self.device = config.dtype or weight.dtype, weight.device
        self.state = LoRAStepState()
        targets = model.lora_modules()  # every LoRA-capable linear: key -> (owner, attribute)
        self.layout = SlotLayout(
            {key: (getattr(owner, name).in_features, getattr(owner, name).output_sizes) for key, (owner, name) in targets.items()},
            config.max_lora_rank,
        )
        shape = (config.max_loras, self.layout.numel)
        if self.device.type == "cpu":
            # every step reads scattered pieces of many slots: huge pages spare the TLB
            self.storage = huge_pages.zeros(shape, self.dtype)  # [S, numel]
            native_cpu.available()  # builds the CPU kernel now (once per machine), not in the first request
        else:
            self.storage = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.layers: dict[ModuleKey, LoRALinear] = {}
        for key, (owner, name) in targets.items():
            wrapped = LoRALinear(getattr(owner, name), *self.layout.views(self.storage, key), self.state)
            setattr(owner, name, wrapped)
            self.layers[key] = wrapped
        # name -> (directory, fingerprint of its files when added), to read it again after an eviction
        self._sources: dict[str, tuple[str, Fingerprint]] = {}
        self.cpu_cache: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.slots: list[str | None] = [None] * config.max_loras
        self._slot_clock = [0] * config.max_loras  # last use, for LRU among idle slots
        self._clock = itertools.count(1)
        self.in_use: Counter[str] = Counter()
        self.pinned: set[str] = set()
        # evicted from the CPU cache, then loaded again because a request needs it (add_request
        # reloads it before the scheduler activates it): that activation is a cache miss
        self._reloaded: set[str] = set()
        self.stats: dict[str, AdapterStats] = {}

    # ---- adapters known (disk -> CPU) --------------------------------------------------------------

    def read(self, name: str, path: str, expected: Fingerprint | None = None) -> LoRAAdapter:
        """Read and check an adapter from disk (every weight check lives in load_adapter).

        Pure: it changes nothing here, so the catalog calls it from any thread.
        """
        return load_adapter(path, name, self.layout, self.dtype, self.config.served_names,
                            pin_memory=self.device.type == "cuda", expected=expected, model=self.model)

    def add(self, adapter: LoRAAdapter, load_seconds: float = 0.0) -> None:
        """Know `adapter` (read by `read`) under its name and cache its weights; the name must be new."""
        assert adapter.name not in self._sources, adapter.name
        self._sources[adapter.name] = (adapter.path, adapter.fingerprint)
        self._record_load(adapter.name, load_seconds)
        self._cache_put(adapter)

    def replace(self, adapter: LoRAAdapter, load_seconds: float = 0.0) -> None:
        """Serve `adapter`'s weights under its (known) name from now on: an in-place reload.

        The caller makes sure no sequence runs with the old weights; a slot holding them gets the
        new ones at once (a pinned adapter stays pinned), and the new files' fingerprint is the
        one later reads from disk are checked against.
        """
        name = adapter.name
        assert name in self._sources and not self.in_use[name], name
        self._sources[name] = (adapter.path, adapter.fingerprint)
        self._record_load(name, load_seconds)
        self._reloaded.discard(name)
        self.cpu_cache.pop(name, None)
        self._cache_put(adapter)
        if name in self.slots:
            self.storage[self.slots.index(name)].copy_(adapter.image, non_blocking=True)

    def remove(self, name: str) -> bool:
        """Forget an adapter and free its CPU and device memory; refused while sequences run with it."""
        if name not in self._sources:
            return False
        if self.in_use[name]:
            raise LoRAError(
                f"LoRA adapter {name!r} is in use by {self.in_use[name]} running sequence(s); "
                "abort them or wait for them to finish before removing it"
            )
        del self._sources[name]
        self.cpu_cache.pop(name, None)
        self.pinned.discard(name)
        self._reloaded.discard(name)
        if name in self.slots:
            slot = self.slots.index(name)
            self.storage[slot].zero_()
            self.slots[slot] = None
        return True

    def knows(self, name: str) -> bool:
        return name in self._sources

    def pin(self, name: str) -> bool:
        """Keep an adapter in a device slot (and the CPU cache) until it is removed."""
        if name not in self._sources:
            raise LoRAAdapterNotFoundError(f"cannot pin LoRA adapter {name!r}: it is not registered; add it first")
        if name in self.pinned:
            return True
        if len(self.pinned) + 1 >= self.config.max_loras:
            raise LoRAError(
                f"pinning LoRA adapter {name!r} would leave no device slot for other adapters "
                f"(max_loras={self.config.max_loras}, pinned: {sorted(self.pinned)}); raise max_loras"
            )
        if self._activate(name) is None:
            raise LoRAError(f"cannot pin LoRA adapter {name!r} now: every device slot is busy; retry when a request finishes")
        self.pinned.add(name)
        return True

    def record_request(self, name: str, prompt_tokens: int) -> None:
        stats = self.stats.setdefault(name, AdapterStats())
        stats.requests += 1
        stats.prompt_tokens += prompt_tokens

    def record_generated(self, name: str, tokens: int = 1) -> None:
        self.stats.setdefault(name, AdapterStats()).generated_tokens += tokens

    def cached_names(self) -> list[str]:
        """The adapters whose weights the CPU cache holds (a copy, safe to read from any thread)."""
        return list(self.cpu_cache)

    def _record_load(self, name: str, seconds: float) -> None:
        stats = self.stats.setdefault(name, AdapterStats())
        stats.loads += 1
        stats.load_seconds += seconds

    def ensure_cpu(self, name: str) -> LoRAAdapter:
        """The adapter's weights in the CPU cache, read from disk again if it was evicted."""
        return self._ensure_cpu(name)

    def _ensure_cpu(self, name: str) -> LoRAAdapter:
        adapter = self.cpu_cache.get(name)
        if adapter is None:
            path, fingerprint = self._sources[name]
            start = time.perf_counter()
            adapter = self.read(name, path, expected=fingerprint)
            self._record_load(name, time.perf_counter() - start)
            self._cache_put(adapter)
            self._reloaded.add(name)
        else:
            self.cpu_cache.move_to_end(name)
        return adapter

    def _cache_put(self, adapter: LoRAAdapter) -> None:
        self.cpu_cache[adapter.name] = adapter
        self.cpu_cache.move_to_end(adapter.name)
        while len(self.cpu_cache) > self.config.max_cpu_loras:
            victim = next((n for n in self.cpu_cache if n not in self.pinned and n != adapter.name), None)
            if victim is None:
                break
            self.cpu_cache.pop(victim)
            self.stats.setdefault(victim, AdapterStats()).evictions += 1

    # ---- device slots (CPU -> device) -------------------------------------------------------------

    def slot_of(self, name: str | None) -> int:
        """The device slot serving `name` (-1 for the base model)."""
        return -1 if name is None else self.slots.index(name)

    def acquire(self, name: str) -> bool:
        """Make `name` resident in a slot for a sequence about to run; False if no slot can be had."""
        stats = self.stats.setdefault(name, AdapterStats())
        resident = name in self.slots
        if self._activate(name) is None:
            return False
        if resident:
            stats.cache_hits += 1
        self.in_use[name] += 1
        return True

    def activate(self, name: str) -> int:
        """Copy a registered adapter into a device slot now (e.g. to warm it up); its slot."""
        if name not in self._sources:
            raise LoRAAdapterNotFoundError(f"LoRA adapter {name!r} is not registered; add it first")
        slot = self._activate(name)
        if slot is None:
            raise LoRAError(f"cannot activate LoRA adapter {name!r} now: every device slot is busy or pinned")
        return slot

    def release(self, name: str) -> None:
        if self.in_use[name] > 0:
            self.in_use[name] -= 1

    def _activate(self, name: str) -> int | None:
        if name in self.slots:
            slot = self.slots.index(name)
        else:
            slot = self._free_slot()
            if slot is None:
                return None
            stats = self.stats.setdefault(name, AdapterStats())
            if name in self.cpu_cache and name not in self._reloaded:
                stats.cache_hits += 1
            else:
                stats.cache_misses += 1
            adapter = self._ensure_cpu(name)
            previous = self.slots[slot]
            if previous is not None:
                self.stats.setdefault(previous, AdapterStats()).evictions += 1
            self.storage[slot].copy_(adapter.image, non_blocking=True)
            self.slots[slot] = name
            stats.activations += 1
        self._reloaded.discard(name)
        self._slot_clock[slot] = next(self._clock)
        return slot

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used slot nobody runs on and nobody pinned."""
        if None in self.slots:
            return self.slots.index(None)
        idle = [s for s, n in enumerate(self.slots) if not self.in_use[n] and n not in self.pinned]
        return min(idle, key=lambda s: self._slot_clock[s]) if idle else None

    # ---- per step ---------------------------------------------------------------------------------

    def set_step(self, token_slots: list[int], device: torch.device) -> None:
        """Publish the step's token -> slot mapping to every wrapped linear."""
        if any(slot >= 0 for slot in token_slots):
            self.state.mapping = LoRABatchMapping.from_token_slots(token_slots, self.config.max_loras, device=device)
        else:
            self.state.mapping = None
