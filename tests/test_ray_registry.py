"""The AdapterRegistry's bookkeeping, without Ray: versions, unloads that reach adapters the
replicas' resolvers found, and what a restarted registry takes back from the replicas' reports."""

from __future__ import annotations

import asyncio

from loraplex.ray.registry import AdapterRegistry, ReplicaReport, Snapshot

MODULES = [{"name": "sql", "path": "/adapters/sql"}]


def report(replica: str, following: Snapshot | None = None, adapters: dict[str, str] | None = None) -> ReplicaReport:
    return ReplicaReport(replica=replica, pid=1, synced_version=following.version if following else 0, held=[], routed=[],
                         adapters=adapters or {}, adapter_loads={}, num_running=0, num_waiting=0, following=following)


def beat(registry: AdapterRegistry, sent: ReplicaReport) -> Snapshot:
    return asyncio.run(registry.heartbeat(sent))


def test_an_unload_reaches_what_only_a_replica_knows():
    registry = AdapterRegistry(MODULES)
    assert registry.remove("found") is None  # no replica knows it: 404
    beat(registry, report("r1", adapters={"sql": "/adapters/sql", "found": "/resolved/found"}))
    version = registry.remove("found")
    assert version is not None and registry.snapshot().unloaded == {"found": version}
    registry.put("found", "/adapters/found")  # loaded again by name: no longer unloaded
    assert registry.snapshot().unloaded == {}


def test_a_restarted_registry_takes_back_what_the_replicas_follow():
    before = AdapterRegistry(MODULES)
    before.put("late", "/adapters/late")
    before.remove("sql")
    followed = before.snapshot()

    restarted = AdapterRegistry(MODULES)  # what Serve starts in its place: --lora-modules only
    assert set(restarted.snapshot().adapters) == {"sql"}
    assert beat(restarted, report("r1", followed)) == followed
    assert set(restarted.snapshot().adapters) == {"late"} and "sql" in restarted.snapshot().unloaded
    # an older replica's view does not take it back
    assert beat(restarted, report("r2", Snapshot(1, {}, {}, followed.lineage))).version == followed.version


def test_what_a_restarted_registry_does_not_take_back():
    before = AdapterRegistry(MODULES)
    before.put("late", "/adapters/late")
    followed = before.snapshot()

    changed = AdapterRegistry(MODULES)
    changed.put("new", "/adapters/new")  # loaded through the new registry before any report: it wins
    beat(changed, report("r1", followed))
    assert set(changed.snapshot().adapters) == {"sql", "new"}

    redeployed = AdapterRegistry([{"name": "chat", "path": "/adapters/chat"}])  # other --lora-modules
    beat(redeployed, report("r1", followed))
    assert set(redeployed.snapshot().adapters) == {"chat"}
