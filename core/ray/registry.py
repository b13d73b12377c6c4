"""AdapterRegistry: the adapters added to the whole deployment, and what each replica reports.

Ray Serve cannot broadcast to every replica, so the adapters added by name (--lora-modules and
/v1/load_lora_adapter) live here, one small Serve deployment, with a version bumped by every
change. Each engine replica reports to it twice a second and gets the current set back: a
replica started later learns every adapter added before it, an unloaded adapter leaves every
replica, an in-place reload reaches every replica holding the adapter. The ingress waits here
until every live replica has applied a change before it answers the admin request.

The reports (pid, adapters held, loads, the replica's Prometheus page) are what /metrics and
/replicas show; a replica not heard from for STALE_S is taken for gone.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

HEARTBEAT_S = 0.5  # how often a replica reports
STALE_S = 4 * HEARTBEAT_S  # a replica silent this long is gone (dead, or being replaced)


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    path: str
    base_model_name: str | None = None
    generation: int = 0  # the registry version that last set it: a replica holding an older one reloads


@dataclass(frozen=True)
class Snapshot:
    version: int
    adapters: dict[str, RegisteredAdapter]


@dataclass(frozen=True)
class ReplicaReport:
    replica: str  # Ray Serve's replica id
    pid: int
    synced_version: int  # the registry version this replica has fully applied
    held: list[str]  # adapters whose weights its CPU cache holds
    adapters: dict[str, str]  # every adapter its engine knows: name -> path (registered, resolved)
    adapter_loads: dict[str, int]  # disk -> CPU reads per adapter, since the replica started
    num_running: int
    num_waiting: int
    models: dict[str, Any] = field(default_factory=dict)  # the base model's /v1/models card
    metrics: str = ""  # the replica's Prometheus page
    seen: float = 0.0  # when the registry last heard from it (monotonic, the registry's clock)


class AdapterRegistry:
    def __init__(self, modules: list[dict[str, str]] | None = None) -> None:
        self._version = 0
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._reports: dict[str, ReplicaReport] = {}
        self._changed = asyncio.Condition()
        for module in modules or []:
            self.put(module["name"], module["path"], module.get("base_model_name"))

    def put(self, name: str, path: str, base_model_name: str | None = None) -> int:
        """Add (or replace, an in-place reload) an adapter; the new version."""
        self._version += 1
        self._adapters[name] = RegisteredAdapter(name, path, base_model_name, self._version)
        return self._version

    def remove(self, name: str) -> int | None:
        """Drop an adapter; the new version, None if it was not registered."""
        if self._adapters.pop(name, None) is None:
            return None
        self._version += 1
        return self._version

    def snapshot(self) -> Snapshot:
        return Snapshot(self._version, dict(self._adapters))

    async def heartbeat(self, report: ReplicaReport) -> Snapshot:
        """A replica's report; the registry's current adapters in return."""
        self._reports[report.replica] = replace(report, seen=time.monotonic())
        async with self._changed:
            self._changed.notify_all()
        return self.snapshot()

    def replicas(self, with_metrics: bool = False) -> list[ReplicaReport]:
        """The live replicas' latest reports (oldest replica id first)."""
        now = time.monotonic()
        for replica in [r for r, report in self._reports.items() if now - report.seen > STALE_S]:
            del self._reports[replica]
        reports = sorted(self._reports.values(), key=lambda report: report.replica)
        return reports if with_metrics else [replace(report, metrics="") for report in reports]

    async def wait_synced(self, version: int, timeout_s: float) -> list[str]:
        """Wait until every live replica has applied `version`; the ones that have not, at the timeout."""
        deadline = time.monotonic() + timeout_s

        def behind() -> list[str]:
            return [report.replica for report in self.replicas() if report.synced_version < version]

        async with self._changed:
            while behind() and time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(HEARTBEAT_S, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
        return behind()
