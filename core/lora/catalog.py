"""AdapterCatalog: the one owner of adapter names, ids, checks, resolution and in-place reloads.

Everything that turns what a caller named into an adapter goes through here; the LoRA manager
below it only holds weights (CPU cache, device slots, fingerprints).

Ids, one rule everywhere:

* a LoRARequest's `lora_int_id` (a caller's or a resolver's) is kept when no other adapter holds it;
* a caller's LoRARequest whose id another adapter already holds is served with that adapter,
  whatever name it carries, as vLLM does (logged once per name and id at INFO; `add_lora` of
  such a request returns False, adding nothing);
* a resolver's id that another adapter holds is replaced by the next free id (resolvers derive
  ids from names; a collision must not serve another adapter);
* an adapter named by a string (a directory, a Hub id, `--lora-modules`, `/v1/load_lora_adapter`)
  gets the next free id, from `request_for`. Ids are never computed elsewhere.

Finding an adapter:

* `lookup(value)`, the Python API (`LLM.generate`, `LLMEngine.add_request`): a LoRARequest, an
  added adapter's name, a local adapter directory written as a path (absolute, `./`, `../`, `~`),
  a name the resolvers find (when runtime updating is allowed), or a Hugging Face Hub repo id,
  in that order (a plain name is never a folder of the current directory);
* `await resolve(name)`, HTTP: added names and enabled resolvers only, never a path or a Hub id.

Threads. Two phases keep the manager on the engine's thread: `prepare` (any thread, may block on
disk, network and resolvers) reads and checks an unknown adapter into a LoRAAdapter kept here
as read ahead; `register` / `add` (the engine's thread, between steps) hand it to the manager
without reading the disk again. The catalog's own state is guarded by one lock, so names, ids
and versions can be read from any thread.

In-place reload (`add` of a LoRARequest with `load_inplace=True` for an added name): the new
files are read and checked first (a bad reload leaves the old adapter serving, untouched); the
reload is then pending, with the next version number, until no sequence started on the old
weights remains; sequences not started yet wait (the engine holds them) and start on the new
weights. Every name has a version, bumped by each add and reload and kept across removal, that
sequences carry (`Sequence.adapter_version`), so nothing computed with old weights is reused.

Unloading an adapter that a sequence runs with or waits for is refused (the server answers 409):
wait for the requests to end or abort them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

from ..errors import InvalidLoRAAdapterError, LoRAAdapterNotFoundError, LoRAError
from ..resolver import _LoRAResolverRegistry
from .adapter import LoRAAdapter
from .hub import download_adapter, hub_id_problem
from .manager import LoRAManager
from .request import LoRARequest
from .resolution import LoRAResolution

__all__ = ["AdapterCatalog"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Read:
    """An adapter read and checked off the engine thread, waiting to be handed to the manager."""

    request: LoRARequest
    adapter: LoRAAdapter
    seconds: float
    from_resolver: bool = False


@dataclasses.dataclass
class _Reload:
    request: LoRARequest  # the adapter as it will be registered after the swap
    read: _Read
    version: int
    waiters: list[concurrent.futures.Future] = dataclasses.field(default_factory=list)


class AdapterCatalog:
    """Names -> adapters for the engine whose LoRA manager is `manager`."""

    def __init__(self, manager: LoRAManager, registry: _LoRAResolverRegistry | None, base_model_name: str) -> None:
        self.manager = manager
        self.resolution = LoRAResolution(registry, base_model_name, self._check_found)
        self._lock = threading.RLock()
        self._adapters: dict[str, LoRARequest] = {}
        self._versions: dict[str, int] = {}  # kept after removal: a name re-added gets a new version
        self._read_ahead: dict[str, _Read] = {}
        self._reloads: dict[str, _Reload] = {}
        self._next_id = 1
        self._unclaimed: set[int] = set()  # ids this catalog handed out that no added adapter holds yet
        self._told: set[tuple[str, int]] = set()  # (name, id) already logged as served with another adapter

    # ---- reading (any thread) ---------------------------------------------------------------------

    def get(self, name: str) -> LoRARequest | None:
        with self._lock:
            return self._adapters.get(name)

    def list_adapters(self) -> dict[str, LoRARequest]:
        """Every added adapter, by name (a snapshot)."""
        with self._lock:
            return dict(self._adapters)

    def list_loras(self) -> set[int]:
        """The ids of the adapters the CPU cache holds (vLLM's list_loras: an evicted adapter drops out)."""
        cached = self.manager.cached_names()
        with self._lock:
            return {self._adapters[name].lora_int_id for name in cached if name in self._adapters}

    def version(self, name: str) -> int:
        """The version a sequence of `name` admitted now runs with (a pending reload's, if any)."""
        with self._lock:
            reload = self._reloads.get(name)
            return reload.version if reload is not None else self._versions.get(name, 0)

    def pending_reloads(self) -> dict[str, int]:
        """Adapter name -> the version of its pending in-place reload."""
        with self._lock:
            return {name: reload.version for name, reload in self._reloads.items()}

    def name_of(self, name_or_id: str | int) -> str | None:
        with self._lock:
            if isinstance(name_or_id, str):
                return name_or_id if name_or_id in self._adapters else None
            return self._holder(name_or_id)

    def request_for(self, name: str, path: str, base_model_name: str | None = None,
                    load_inplace: bool = False) -> LoRARequest:
        """A LoRARequest for an adapter named with a path: an added name keeps its id, a new one gets
        the next free id."""
        with self._lock:
            known = self._adapters.get(name)
            lora_id = known.lora_int_id if known is not None else self._give_id()
        return LoRARequest(name, lora_id, str(path), base_model_name=base_model_name, load_inplace=load_inplace)

    # ---- finding (any thread; blocking) -----------------------------------------------------------

    def prepare(self, value: LoRARequest | str) -> LoRARequest:
        """The LoRARequest `value` names under the Python API's rule; an adapter not added yet is read
        and checked now (kept for `register`). May block on disk, network and resolvers."""
        if isinstance(value, LoRARequest):
            if self._needs_read(value):
                self._keep(self.read(value))
            return value
        if not isinstance(value, str) or not value:
            raise LoRAAdapterNotFoundError(f"lora_request must be a LoRARequest or a non-empty string; got {value!r}")
        known = self.get(value)
        if known is not None:
            return known
        path = _local_dir(value)
        if path is not None:
            return self._prepare_path(value, str(path))
        if self.resolution.enabled:
            try:
                return self.resolution.resolve_sync(value)
            except LoRAAdapterNotFoundError as miss:
                if hub_id_problem(value) is not None:
                    raise
                try:
                    return self._prepare_path(value, download_adapter(value))
                except LoRAAdapterNotFoundError as exc:
                    raise LoRAAdapterNotFoundError(f"{miss}. Nor from the Hub: {exc}") from exc
        try:
            return self._prepare_path(value, download_adapter(value))
        except LoRAAdapterNotFoundError as exc:
            hints = [h for h in (self.resolution.disabled_hint(), _shadowed_folder_hint(value)) if h]
            if not hints:
                raise
            raise LoRAAdapterNotFoundError(" ".join([str(exc), *hints])) from exc

    async def resolve(self, name: str) -> LoRARequest:
        """HTTP's rule: an added adapter's name, else what the enabled resolvers find (read and
        checked, waiting for `register`). Never a path or a Hub id."""
        known = self.get(name) if isinstance(name, str) else None
        if known is not None:
            return known
        return await self.resolution.resolve(name)

    def read(self, request: LoRARequest, from_resolver: bool = False) -> _Read:
        """Every adapter check, in one place: the base model it names, then its files (the manager's
        loader). Changes nothing; safe from any thread."""
        self._check_base_model_name(request)
        start = time.perf_counter()
        adapter = self.manager.read(request.lora_name, request.lora_path)
        return _Read(request, adapter, time.perf_counter() - start, from_resolver)

    # ---- changing (the engine's thread) ---------------------------------------------------------------

    def lookup(self, value: LoRARequest | str) -> LoRARequest:
        """`prepare` then `register`: the adapter `value` names, added to the manager if new."""
        return self.register(self.prepare(value))

    def register(self, request: LoRARequest) -> LoRARequest:
        """The adapter `request` is served with, handed to the manager now if it is new (from what
        `prepare` read, else read now). Engine thread only."""
        self._check_base_model_name(request)
        name = request.lora_name
        with self._lock:
            known = self._adapters.get(name)
            holder = self._holder(request.lora_int_id)
            ahead = self._read_ahead.pop(name, None)
        if known is not None:
            if known.lora_path != request.lora_path and not request.load_inplace:
                raise InvalidLoRAAdapterError(
                    f"LoRA adapter name {name!r} is already registered with path {known.lora_path!r} and id "
                    f"{known.lora_int_id}; give the new adapter another name, remove the old one first, or reload it "
                    "in place (load_inplace=True)"
                )
            self.manager.ensure_cpu(name)  # evicted: read again (the request fails if its files changed)
            return known
        if holder is not None:
            from_resolver = ahead is not None and ahead.from_resolver
            if request.lora_int_id not in self._unclaimed and not from_resolver:
                return self._served_by(request, holder)
            with self._lock:
                request = dataclasses.replace(request, lora_int_id=self._give_id())
        if ahead is None or ahead.request.lora_path != request.lora_path:
            ahead = self.read(request)
        self.manager.add(ahead.adapter, ahead.seconds)
        with self._lock:
            self._unclaimed.discard(request.lora_int_id)
            self._adapters[name] = dataclasses.replace(request, load_inplace=False)
            self._versions[name] = self._versions.get(name, 0) + 1
            return self._adapters[name]

    def register_found(self, request: LoRARequest) -> LoRARequest:
        """`register` for what `resolve` found: if the name was added meanwhile, that adapter is
        served. Engine thread only."""
        return self.get(request.lora_name) or self.register(request)

    def add(self, request: LoRARequest) -> concurrent.futures.Future[bool]:
        """vLLM's add_lora: True once added (or reloaded in place), False if nothing had to change.

        A reload in place is checked now and its future ends when the swap happened (see
        `apply_reloads`). Engine thread only.
        """
        name = request.lora_name
        known = self.get(name)
        done: concurrent.futures.Future[bool] = concurrent.futures.Future()
        if known is not None and request.load_inplace:
            self._check_base_model_name(request)
            with self._lock:
                ahead = self._read_ahead.pop(name, None)
            if ahead is None or ahead.request.lora_path != request.lora_path:
                ahead = self.read(request)  # raises for a bad adapter: the old one keeps serving
            updated = LoRARequest(name, known.lora_int_id, request.lora_path, base_model_name=request.base_model_name)
            with self._lock:
                reload = self._reloads.get(name)
                if reload is None:
                    reload = self._reloads[name] = _Reload(updated, ahead, self._versions.get(name, 0) + 1)
                else:  # reloaded again before the last one applied: the newest files win
                    reload.request, reload.read = updated, ahead
                reload.waiters.append(done)
            logger.info("LoRA adapter %r: reloading in place from %s (version %d)", name, request.lora_path,
                        reload.version)
            return done
        if known is None:
            with self._lock:
                holder = self._holder(request.lora_int_id)
            if holder is not None and request.lora_int_id not in self._unclaimed:
                self._served_by(request, holder)
                done.set_result(False)
                return done
        served = self.register(request)
        done.set_result(known is None and served.lora_name == name)
        return done

    def apply_reloads(self, blocked: set[tuple[str, int]]) -> list[str]:
        """Swap in every pending reload that no unfinished sequence of (name, older version) in
        `blocked` waits on; the names swapped. Engine thread only, between steps."""
        applied = []
        with self._lock:
            ready = [(name, reload) for name, reload in self._reloads.items()
                     if not any(n == name and v < reload.version for n, v in blocked)]
        for name, reload in ready:
            self.manager.replace(reload.read.adapter, reload.read.seconds)
            with self._lock:
                self._adapters[name] = reload.request
                self._versions[name] = reload.version
                del self._reloads[name]
            logger.info("LoRA adapter %r: now serving %s (version %d)", name, reload.request.lora_path, reload.version)
            for waiter in reload.waiters:
                if not waiter.done():
                    waiter.set_result(True)
            applied.append(name)
        return applied

    def fail_reloads(self, error: BaseException) -> None:
        """End every pending reload's waiters with `error` (the engine stopped)."""
        with self._lock:
            reloads, self._reloads = list(self._reloads.values()), {}
        for reload in reloads:
            for waiter in reload.waiters:
                if not waiter.done():
                    waiter.set_exception(error)

    def remove(self, name: str) -> bool:
        """Forget an added adapter (the caller checked nobody waits for it). Engine thread only."""
        with self._lock:
            if name not in self._adapters:
                return False
            if name in self._reloads:
                raise LoRAError(f"LoRA adapter {name!r} has an in-place reload pending; wait for it before removing it")
        removed = self.manager.remove(name)  # refused while sequences run with it
        with self._lock:
            del self._adapters[name]
            self._read_ahead.pop(name, None)
        return removed

    def pin(self, name_or_id: str | int) -> bool:
        name = self.name_of(name_or_id)
        if name is None:
            raise LoRAAdapterNotFoundError(f"cannot pin LoRA adapter {name_or_id!r}: it is not registered; add it first")
        return self.manager.pin(name)

    # ---- internals ------------------------------------------------------------------------------------

    def _prepare_path(self, name: str, path: str) -> LoRARequest:
        request = self.request_for(name, path)
        self._keep(self.read(request))
        return request

    def _needs_read(self, request: LoRARequest) -> bool:
        with self._lock:
            known = self._adapters.get(request.lora_name)
            if known is not None:
                return request.load_inplace
            holder = self._holder(request.lora_int_id)
            return holder is None or request.lora_int_id in self._unclaimed

    def _keep(self, read: _Read) -> None:
        with self._lock:
            self._read_ahead[read.request.lora_name] = read

    async def _check_found(self, request: LoRARequest) -> None:
        """The resolution's validation: read the found adapter off the event loop and keep it."""
        if self.get(request.lora_name) is not None:
            return  # added meanwhile: that one is served
        self._keep(await asyncio.to_thread(self.read, request, True))

    def _served_by(self, request: LoRARequest, holder: str) -> LoRARequest:
        key = (request.lora_name, request.lora_int_id)
        with self._lock:
            served = self._adapters[holder]
            first = key not in self._told
            self._told.add(key)
        if first:
            logger.info("LoRA request %r carries id %d, which adapter %r holds: served with %r (ids name adapters, "
                        "as in vLLM)", request.lora_name, request.lora_int_id, holder, holder)
        self.manager.ensure_cpu(holder)
        return served

    def _holder(self, lora_id: int) -> str | None:
        return next((n for n, r in self._adapters.items() if r.lora_int_id == lora_id), None)

    def _give_id(self) -> int:
        """The next free id (callers hold the lock); never handed out twice. While no adapter holds
        it, an id handed out is the catalog's, not a caller's: if a caller's adapter takes it
        meanwhile, the one it was meant for gets another."""
        held = {r.lora_int_id for r in self._adapters.values()}
        while self._next_id in held:
            self._next_id += 1
        lora_id = self._next_id
        self._next_id += 1
        self._unclaimed.add(lora_id)
        return lora_id

    def _check_base_model_name(self, request: LoRARequest) -> None:
        names = self.manager.config.served_names
        if request.base_model_name and names and request.base_model_name not in names:
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {request.lora_name!r} names base model {request.base_model_name!r}, but this engine "
                f"serves {sorted(names)}; use an adapter for the served model"
            )


def _looks_like_path(value: str) -> bool:
    """Whether `value` is written as a local path: absolute, starting with `.` or `~`, or holding a
    `/` without being a Hub id. A plain name (`sql-lora`) is a name and `org/repo` a Hub id even when
    a folder of that name sits in the current directory (`./org/repo` reaches that folder)."""
    if value.startswith((".", "~")) or os.path.isabs(value):
        return True
    return "/" in value and hub_id_problem(value) is not None


def _shadowed_folder_hint(value: str) -> str | None:
    """For a name that is also a folder in the current directory: how to name the folder."""
    if _looks_like_path(value) or _local_dir("./" + value) is None:
        return None
    return f"(A folder {value!r} is in the current directory; to load it, write it as a path: './{value}'.)"


def _local_dir(value: str) -> Path | None:
    """`value` as an existing local directory (`~` expanded) when it is written as a path, or None;
    a name the filesystem cannot even look up (too long, an unknown `~user`) is simply not one."""
    if not _looks_like_path(value):
        return None
    try:
        path = Path(value).expanduser()
        return path if path.is_dir() else None
    except (OSError, RuntimeError, ValueError):
        return None
