"""AdapterRegistry: the adapters added to the whole deployment, and what each replica reports.

Ray Serve cannot broadcast to every replica, so the adapters added by name (--lora-modules and
/v1/load_lora_adapter) live here, one small Serve deployment, with a version bumped by every
change. Each engine replica reports to it twice a second and gets the current set back: a
replica started later learns every adapter added before it, an unloaded adapter leaves every
replica, an in-place reload reaches every replica holding the adapter. The ingress waits here
until every live replica has applied a change before it answers the admin request.

An unload reaches adapters a replica found through its resolvers too (they are not registered):
the snapshot names every unloaded adapter with the version that unloaded it, and a replica drops
an adapter of that name when it applies that version.

The reports (pid, adapters held, loads, the replica's Prometheus page) are what /metrics and
/replicas show; a replica not heard from for STALE_S is taken for gone.

If the registry itself dies, Serve starts a new one, which knows only --lora-modules; each
replica's report carries the snapshot it follows, and the new registry takes the newest one it
hears of (unless an adapter was loaded or unloaded through it meanwhile), so adapters loaded at
run time survive the restart. Only a snapshot that started from the same --lora-modules is taken:
a redeployment with other ones starts from them, whatever the old replicas still report.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

HEARTBEAT_S = 0.5  # how often a replica reports
STALE_S = 10 * HEARTBEAT_S  # a replica silent this long is gone (dead, or being replaced); a busy one is late at times


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
    unloaded: dict[str, int] = field(default_factory=dict)  # name -> the version that unloaded it
    lineage: str = ""  # the --lora-modules the registry started from (a fingerprint)


@dataclass(frozen=True)
class ReplicaReport:
    replica: str  # Ray Serve's replica id
    pid: int
    synced_version: int  # the registry version this replica has fully applied
    held: list[str]  # adapters whose weights its CPU cache holds
    routed: list[str]  # adapters Serve routes to it (its multiplexed model ids)
    adapters: dict[str, str]  # every adapter its engine knows: name -> path (registered, resolved)
    adapter_loads: dict[str, int]  # disk -> CPU reads per adapter, since the replica started
    num_running: int
    num_waiting: int
    models: dict[str, Any] = field(default_factory=dict)  # the base model's /v1/models card
    metrics: str = ""  # the replica's Prometheus page
    following: Snapshot | None = None  # the registry snapshot the replica follows (to restore a restarted registry)
    seen: float = 0.0  # when the registry last heard from it (monotonic, the registry's clock)


class AdapterRegistry:
    def __init__(self, modules: list[dict[str, str]] | None = None) -> None:
        self._version = 0
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._unloaded: dict[str, int] = {}
        self._reports: dict[str, ReplicaReport] = {}
        self._changed = asyncio.Condition()
        self._admin_changes = 0
        self._lineage = hashlib.sha256(json.dumps(modules or [], sort_keys=True).encode()).hexdigest()[:16]
        for module in modules or []:
            self.put(module["name"], module["path"], module.get("base_model_name"))
        self._admin_changes = 0  # loads and unloads since this registry started

    def put(self, name: str, path: str, base_model_name: str | None = None) -> int:
        """Add (or replace, an in-place reload) an adapter; the new version."""
        self._version += 1
        self._admin_changes += 1
        self._adapters[name] = RegisteredAdapter(name, path, base_model_name, self._version)
        self._unloaded.pop(name, None)
        return self._version

    def remove(self, name: str) -> int | None:
        """Unload an adapter from the deployment: registered, or found by a live replica's resolvers.
        The new version; None if no replica knows the name."""
        found = any(name in report.adapters for report in self.replicas())
        if self._adapters.pop(name, None) is None and not found:
            return None
        self._version += 1
        self._admin_changes += 1
        self._unloaded[name] = self._version
        return self._version

    def snapshot(self) -> Snapshot:
        return Snapshot(self._version, dict(self._adapters), dict(self._unloaded), self._lineage)

    async def heartbeat(self, report: ReplicaReport) -> Snapshot:
        """A replica's report; the registry's current adapters in return."""
        known = report.following
        if (known is not None and known.lineage == self._lineage and known.version > self._version
                and not self._admin_changes):
            # this registry was restarted: the replicas hold what the one before it knew
            self._version, self._adapters, self._unloaded = known.version, dict(known.adapters), dict(known.unloaded)
        self._reports[report.replica] = replace(report, following=None, seen=time.monotonic())
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
