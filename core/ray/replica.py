"""EngineReplica: one loraplex AsyncLLMEngine behind the server's own FastAPI app, as a Serve replica.

Adapter affinity. The ingress tags a request for an adapter with Ray Serve's multiplexed model
id (the adapter's name). Serve routes it to a replica that has loaded that id, when one has, and
calls the replica's multiplexed loader otherwise. The loader here puts the adapter into the
engine (its path from the AdapterRegistry; a name the registry lacks goes to the resolvers, as
on a single server), and Serve keeps at most `max_num_models_per_replica` ids per replica (by
default the engine's max_cpu_loras), dropping the least recently used. A dropped id is removed
from the engine too (its CPU and device memory freed, once no request runs with it), so what a
replica advertises to the router is what its CPU cache holds: traffic follows the weights.

With adapter affinity off (the round-robin baseline), requests carry no id and Serve's default
routing spreads them; each replica then adds what it is asked for and lets its engine's own CPU
LRU evict.

Everything else is the single server: the request runs through `build_app`'s routes in-process
(see loraplex.ray.asgi), so answers, errors and streaming are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from ray import serve

from ..engine.async_engine import AsyncLLMEngine
from ..entrypoints.cli_args import engine_args_from
from ..entrypoints.openai.api_server import build_app
from ..entrypoints.openai.errors import exception_body
from ..errors import LoRAError
from .asgi import ForwardedRequest, ResponseStart, call_app
from .faults import REPLICA_FAILURES
from .registry import HEARTBEAT_S, RegisteredAdapter, ReplicaReport, Snapshot

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-loraplex-replica"  # which replica answered (for operators and tests)


class EngineReplica:
    async def __init__(self, args: argparse.Namespace, registry: Any) -> None:
        self.engine = AsyncLLMEngine.from_engine_args(engine_args_from(args))
        self.app = build_app(self.engine, log_requests=not args.disable_log_requests)
        self.models = self.app.state.models
        self.registry = registry  # DeploymentHandle of the AdapterRegistry
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._snapshot: Snapshot = await registry.snapshot.remote()
        self._applied: dict[str, int] = {}  # registry adapters added here -> the generation added
        self._synced_version = 0
        self._evicting: set[str] = set()  # dropped by Serve's LRU, to remove once idle
        self._lock = asyncio.Lock()  # one add or remove at a time: checks and changes stay consistent
        cpu_loras = self.engine.engine.args.max_cpu_loras or self.engine.engine.args.max_loras
        self.max_models = args.max_num_models_per_replica or cpu_loras

        async def load_adapter(model_id: str) -> _HeldAdapter:
            await self._ensure(model_id)
            return _HeldAdapter(self, model_id)

        self._load_adapter = load_adapter
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=self.max_models)(load_adapter)
        await self._apply(self._snapshot)
        self._beats = asyncio.ensure_future(self._heartbeats())

    # ---- requests ---------------------------------------------------------------------------------

    async def forward(self, request: ForwardedRequest, adapter: str | None) -> AsyncIterator[ResponseStart | bytes]:
        """The app's answer to a request the ingress forwarded (`adapter`: the one its `model` names)."""
        model_id = serve.get_multiplexed_model_id()
        try:
            if adapter is not None:
                await self._ensure(adapter)
                # a name nobody serves is a 404 before it takes a place in Serve's LRU (and evicts one there)
                await self.models.lora_request_for(adapter)
            if model_id:
                await self._multiplexed(model_id)  # Serve's bookkeeping of what this replica holds
        except Exception as exc:  # noqa: BLE001 - the request's error, in the server's error shape
            status, body = exception_body(exc)
            yield ResponseStart(status, [(b"content-type", b"application/json"), self._header()])
            yield json.dumps(body).encode()
            return
        async for piece in call_app(self.app, request):
            if isinstance(piece, ResponseStart):
                piece = ResponseStart(piece.status, [*piece.headers, self._header()])
            yield piece

    def describe(self) -> dict[str, Any]:
        """What the ingress needs to route: the names of the base model."""
        return {"base_names": sorted(self.models.base_names), "served_model_name": self.models.served_model_name}

    async def load(self, name: str) -> tuple[int, dict[str, Any] | None]:
        """Load a registered adapter here (the check of /v1/load_lora_adapter): (200, None) or an error."""
        try:
            if serve.get_multiplexed_model_id():
                await self._multiplexed(name)
            await self._ensure(name)
        except Exception as exc:  # noqa: BLE001 - answered in the error shape
            return exception_body(exc)
        return 200, None

    def _header(self) -> tuple[bytes, bytes]:
        return REPLICA_HEADER.encode(), self.replica_id.encode()

    # ---- adapters ---------------------------------------------------------------------------------

    async def _ensure(self, name: str) -> None:
        """The adapter `name` in the engine, at the registry's generation; a name the registry lacks
        is left to the app (added here already, or the resolvers', or a 404)."""
        catalog = self.engine.engine.lora_catalog
        if catalog is None:
            return  # LoRA off: the app answers with its reason
        self._evicting.discard(name)
        entry = self._snapshot.adapters.get(name)
        if entry is None:  # perhaps loaded since the last heartbeat
            try:
                fresh = await self.registry.snapshot.remote()
            except REPLICA_FAILURES:  # the registry restarting: go on with what the heartbeats brought
                fresh = self._snapshot
            if fresh.version >= self._snapshot.version:  # older: a restarted registry, restored by the heartbeats
                self._snapshot = fresh
            entry = self._snapshot.adapters.get(name)
        if entry is None:
            return
        async with self._lock:
            if self._applied.get(name) != entry.generation or catalog.get(name) is None:
                await self._add(entry)

    async def _add(self, entry: RegisteredAdapter) -> None:
        catalog = self.engine.engine.lora_catalog
        known = catalog.get(entry.name)
        request = catalog.request_for(entry.name, entry.path, entry.base_model_name, load_inplace=known is not None)
        await self.engine.add_lora(request)  # read and checked before it replaces anything
        self._applied[entry.name] = entry.generation

    def evicted(self, name: str) -> None:
        """Serve's LRU dropped `name` (on this replica's event loop): remove it from the engine."""
        self._evicting.add(name)
        asyncio.ensure_future(self._remove_when_idle(name))

    async def _remove_when_idle(self, name: str) -> None:
        while name in self._evicting:
            async with self._lock:
                if name not in self._evicting:
                    return  # asked for again meanwhile
                try:
                    await self.engine.remove_lora(name)
                except LoRAError:  # requests still run with it: try again shortly
                    pass
                else:
                    self._evicting.discard(name)
                    self._applied.pop(name, None)
                    return
            await asyncio.sleep(0.05)

    async def _apply(self, snapshot: Snapshot) -> None:
        """Follow the registry: drop unloaded adapters (registered ones, and ones this replica's
        resolvers found), reload replaced ones; synced when all is done."""
        catalog = self.engine.engine.lora_catalog
        done = True
        if catalog is not None:
            async with self._lock:
                dropped = {name for name, version in snapshot.unloaded.items() if version > self._synced_version}
                dropped |= set(self._applied)
                for name in sorted(dropped - set(snapshot.adapters)):
                    done &= await self._try(self.engine.remove_lora(name), name)
                    if catalog.get(name) is None:
                        self._applied.pop(name, None)
                        self._evicting.discard(name)
                        self._forget(name)
                for name, generation in list(self._applied.items()):
                    entry = snapshot.adapters.get(name)
                    if entry is not None and entry.generation != generation and catalog.get(name) is not None:
                        done &= await self._try(self._add(entry), name)  # in place: new requests start on the new weights
        self._snapshot = snapshot
        if done:
            self._synced_version = snapshot.version

    def _forget(self, name: str) -> None:
        """Take an unloaded adapter off Serve's record of what this replica holds, so that it neither
        attracts requests nor keeps a place in Serve's LRU. Serve has no public call for this; where
        its multiplexing keeps other attributes (another Ray version) the LRU drops the name in time."""
        wrapper, models = self._serve_models()
        if name in models:
            held = models.pop(name)
            if isinstance(held, _HeldAdapter):
                held.dropped = True  # removed already: no eviction to run
            wrapper._push_multiplexed_replica_info = True  # the router learns it with the next push

    def _serve_models(self) -> tuple[Any, dict[str, Any]]:
        """Serve's multiplexing state here and the adapters it routes to this replica ({} unknown)."""
        wrapper = getattr(self._load_adapter, "__serve_multiplex_wrapper", None)
        models = getattr(wrapper, "models", None)
        return wrapper, models if isinstance(models, dict) else {}

    async def _try(self, change: Awaitable[Any], name: str) -> bool:
        """Whether an unload or reload went through; one refused now (in use, or a reload that fails
        here) is tried again at the next heartbeat."""
        try:
            await change
        except LoRAError as exc:
            logger.warning("replica %s: adapter %r not updated yet: %s", self.replica_id, name, exc)
            return False
        return True

    async def _heartbeats(self) -> None:
        while True:
            try:
                before = self._synced_version
                snapshot = await self.registry.heartbeat.remote(self._report())
                if snapshot.version != self._synced_version:
                    await self._apply(snapshot)
                if self._synced_version != before:
                    continue  # report the change at once: the ingress waits for it
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the registry restarting: keep serving, report later
                logger.warning("replica %s: no report to the adapter registry", self.replica_id, exc_info=True)
            await asyncio.sleep(HEARTBEAT_S)

    def _report(self) -> ReplicaReport:
        engine = self.engine.engine
        stats = self.engine.stats()
        adapters = {name: request.lora_path for name, request in self.models.adapters().items()}
        base = self.models.list_models()["data"][0]
        return ReplicaReport(
            replica=self.replica_id, pid=os.getpid(), synced_version=self._synced_version,
            held=engine.lora_manager.cached_names() if engine.lora_manager is not None else [],
            routed=list(self._serve_models()[1]),
            adapters=adapters, adapter_loads={name: s.loads for name, s in stats.lora_stats.items()},
            num_running=stats.num_running, num_waiting=stats.num_waiting, models=base,
            metrics=self.app.state.metrics.render()[0].decode(), following=self._snapshot,
        )

    def __del__(self) -> None:
        beats = getattr(self, "_beats", None)
        if beats is not None:
            beats.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class _HeldAdapter:
    """What the multiplexed loader returns: Serve calls `__del__` when its LRU drops the adapter."""

    def __init__(self, replica: EngineReplica, name: str) -> None:
        self.replica, self.name = replica, name
        self.loop = asyncio.get_running_loop()
        self.dropped = False

    def __del__(self) -> None:  # Serve runs it in a worker thread; the garbage collector may run it again
        if self.dropped:
            return
        self.dropped = True
        try:
            self.loop.call_soon_threadsafe(self.replica.evicted, self.name)
        except RuntimeError:  # the loop has closed: the replica is gone with its engine
            pass
