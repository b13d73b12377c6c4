"""On-demand resolution: an adapter name nobody added, found through the registered resolvers.

`LoRAResolution.resolve(name)` asks the resolvers in registry order; the first that returns a
LoRARequest whose adapter passes validation (the catalog reads it: PEFT LoRA, base model,
shapes) wins. The resolution never touches the engine: the catalog keeps the adapter it read, and
the engine's thread adds it (see loraplex.lora.catalog). Around that:

* gate: only when `VLLM_ALLOW_RUNTIME_LORA_UPDATING` is true;
* each resolver call runs under a timeout (`LORAPLEX_LORA_RESOLVER_TIMEOUT`, default 30 s); one
  that raises or times out is logged with its name and reason, and the next one is asked;
* resolvers cannot take the process down: each runs on an event loop thread of its own
  (`resolver_loop`), so one that blocks its loop with synchronous work still times out and
  blocks only itself, and anything it raises (`SystemExit`, `KeyboardInterrupt`, a
  `CancelledError` of its own) fails that one lookup like any error. A resolver still stuck in
  a call that outlived its timeout is reported as busy, without being asked, until that call
  ends. Only a cancellation of the resolution itself (its task, its loop shutting down)
  propagates;
* single-flight: concurrent calls for one name (from any event loop or thread) share one run
  and get the same result or error;
* misses (no resolver found the name) are remembered for `LORAPLEX_LORA_RESOLVER_MISS_TTL`
  seconds (default 10, 0 disables), so a flood of bad names does not hammer remote sources;
* a found adapter that fails validation is reported with the resolver and the reason; the
  next resolver is asked, and if none yields a valid adapter the call fails with
  `InvalidLoRAAdapterError` (never remembered as a success or a miss);
* `outcome_counts` counts each resolver's answers by their final kind, for /metrics.

`resolve_sync(name)` serves synchronous callers (`LLMEngine.add_request`): it runs the
resolution on loraplex's private event loop thread, so it works inside a running loop too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .. import envs
from ..errors import InvalidLoRAAdapterError, LoRAAdapterNotFoundError, LoRAError
from ..resolver import LoRAResolverRegistry, _LoRAResolverRegistry
from .request import LoRARequest
from .resolver_loop import call_resolver

__all__ = ["LoRAResolution", "ValidateFn"]

logger = logging.getLogger(__name__)

# Loads and checks a found adapter (the catalog reads it, off the engine thread, and keeps it
# for the engine to add); may be a coroutine function; raises if the adapter is invalid.
ValidateFn = Callable[[LoRARequest], "None | Awaitable[None]"]

_ENABLE_HINT = "set VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to let loraplex find unknown adapters through its resolvers"


@dataclass
class _Outcome:
    resolver: str
    kind: str  # "not found" | "error" | "timeout" | "busy" | "invalid" | "found"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.resolver!r}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


class LoRAResolution:
    """Finds unknown adapters through `registry` for the engine serving `base_model_name`."""

    def __init__(
        self,
        registry: _LoRAResolverRegistry | None,
        base_model_name: str,
        validate: ValidateFn,
        *,
        timeout: float | None = None,
        miss_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = LoRAResolverRegistry if registry is None else registry
        self.base_model_name = base_model_name
        self.validate = validate
        self.timeout = envs.lora_resolver_timeout() if timeout is None else float(timeout)
        self.miss_ttl = envs.lora_resolver_miss_ttl() if miss_ttl is None else float(miss_ttl)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds; got {timeout!r}")
        if not self.miss_ttl >= 0:
            raise ValueError(f"miss_ttl must be >= 0 seconds; got {miss_ttl!r}")
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._leader_loops: dict[str, asyncio.AbstractEventLoop] = {}
        self._tasks: set[asyncio.Task] = set()  # leaders' tasks, referenced until they end
        self._misses: dict[str, tuple[float, str]] = {}  # name -> (expiry, message)
        self.resolver_calls = 0  # how many times a resolver was asked (for tests and metrics)
        # (resolver, outcome kind) -> answers, the final kind of each ("invalid": found but refused)
        self.outcome_counts: dict[tuple[str, str], int] = {}

    @property
    def enabled(self) -> bool:
        """True when runtime updating is allowed and at least one resolver is registered."""
        return envs.allow_runtime_lora_updating() and bool(self.registry.get_supported_resolvers())

    def disabled_hint(self) -> str | None:
        """When resolvers are registered but runtime updating is off: a sentence saying so and
        naming the switch; else None."""
        names = list(self.registry.get_supported_resolvers())
        if not names or envs.allow_runtime_lora_updating():
            return None
        return (f"LoRA resolvers are installed ({', '.join(names)}) but were not asked: VLLM_ALLOW_RUNTIME_LORA_UPDATING "
                f"is off; {_ENABLE_HINT}.")

    def forget_misses(self) -> None:
        with self._lock:
            self._misses.clear()

    # ---- async API ------------------------------------------------------------------------------

    async def resolve(self, lora_name: str) -> LoRARequest:
        """The validated LoRARequest for `lora_name`; LoRAAdapterNotFoundError or InvalidLoRAAdapterError."""
        if not envs.allow_runtime_lora_updating():
            installed = list(self.registry.get_supported_resolvers())
            which = f" (resolvers installed but not asked: {', '.join(installed)})" if installed else ""
            raise LoRAAdapterNotFoundError(
                f"LoRA adapter {lora_name!r} is not loaded and resolving unknown adapters is disabled{which}; "
                f"{_ENABLE_HINT}, or add the adapter first (add_lora, --lora-modules)"
            )
        if not isinstance(lora_name, str) or not lora_name:
            raise LoRAAdapterNotFoundError(f"a LoRA adapter name must be a non-empty string; got {lora_name!r}")
        with self._lock:
            self._raise_if_remembered_miss(lora_name)
            future = self._inflight.get(lora_name)
            leader = future is None
            if leader:
                future = concurrent.futures.Future()
                self._inflight[lora_name] = future
                self._leader_loops[lora_name] = asyncio.get_running_loop()
        if leader:
            # a task of its own, so that a cancelled caller does not cancel the others' fetch
            task = asyncio.ensure_future(self._lead(lora_name, future))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(asyncio.wrap_future(future))

    async def _lead(self, lora_name: str, future: concurrent.futures.Future) -> None:
        try:
            result = await self._run(lora_name)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            with self._lock:
                if isinstance(exc, LoRAAdapterNotFoundError) and self.miss_ttl > 0:
                    self._misses[lora_name] = (self._clock() + self.miss_ttl, str(exc))
                self._end_flight(lora_name)
            if isinstance(exc, Exception):
                future.set_exception(exc)
                return
            # this run was cancelled or interrupted (e.g. its loop shut down): the waiters, who
            # were not, get an error rather than a cancellation that is not theirs
            future.set_exception(LoRAError(
                f"resolving LoRA adapter {lora_name!r} was interrupted ({_reason(exc)}) before it ended; try again"
            ))
            raise
        else:
            with self._lock:
                self._end_flight(lora_name)
            future.set_result(result)

    def _end_flight(self, lora_name: str) -> None:
        del self._inflight[lora_name]
        del self._leader_loops[lora_name]

    async def _run(self, lora_name: str) -> LoRARequest:
        outcomes: list[_Outcome] = []
        for name, resolver in self.registry.items():
            outcome, request = await self._ask(name, resolver, lora_name)
            if request is not None:
                outcome = await self._validate(outcome, request, lora_name)
            self._count(outcome)
            if outcome.kind == "found":
                assert request is not None
                logger.info("LoRA resolver %r resolved adapter %r to %s", name, lora_name, request.lora_path)
                return request
            outcomes.append(outcome)
        tried = "; ".join(str(o) for o in outcomes) or "no resolver is registered"
        if any(o.kind == "invalid" for o in outcomes):
            raise InvalidLoRAAdapterError(
                f"LoRA adapter {lora_name!r} was found but could not be loaded. Resolvers tried, in order: {tried}; "
                "fix the adapter in its source (it must be a PEFT LoRA adapter for this base model)"
            )
        raise LoRAAdapterNotFoundError(
            f"LoRA adapter {lora_name!r} is not loaded and no resolver found it. Resolvers tried, in order: {tried}; "
            "check the name, or add the adapter to one of these sources"
        )

    async def _validate(self, outcome: _Outcome, request: LoRARequest, lora_name: str) -> _Outcome:
        """`outcome` ("found") if the found adapter passes `validate`, else an "invalid" outcome."""
        try:
            checked = self.validate(request)
            if inspect.isawaitable(checked):
                await checked
        except Exception as exc:  # noqa: BLE001 - an invalid adapter is reported, the next resolver asked
            logger.warning("LoRA resolver %r found adapter %r but it is invalid: %s; asking the next resolver",
                           outcome.resolver, lora_name, _reason(exc))
            return _Outcome(outcome.resolver, "invalid", f"found at {request.lora_path!r} but refused: {_reason(exc)}")
        return outcome

    def _count(self, outcome: _Outcome) -> None:
        with self._lock:
            key = (outcome.resolver, outcome.kind)
            self.outcome_counts[key] = self.outcome_counts.get(key, 0) + 1

    async def _ask(self, name: str, resolver, lora_name: str) -> tuple[_Outcome, LoRARequest | None]:
        """One resolver's answer, under the timeout, on its own loop thread; whatever it does
        becomes an outcome. Raises only CancelledError, when this resolution is cancelled."""
        self.resolver_calls += 1
        answer = await call_resolver(resolver, name, (self.base_model_name, lora_name), self.timeout)
        if answer.kind == "timeout":
            detail = f"no answer within {self.timeout:g} s (LORAPLEX_LORA_RESOLVER_TIMEOUT)"
            logger.warning("LoRA resolver %r timed out resolving adapter %r: %s; asking the next resolver", name, lora_name, detail)
            return _Outcome(name, "timeout", detail), None
        if answer.kind == "busy":
            detail = (f"not asked: an earlier call is still running past the {self.timeout:g} s timeout (the resolver "
                      "blocks its event loop or ignores cancellation)")
            logger.warning("LoRA resolver %r is busy, so adapter %r was not looked up there: %s; asking the next resolver",
                           name, lora_name, detail)
            return _Outcome(name, "busy", detail), None
        if answer.kind != "value":  # raised anything (SystemExit and CancelledError included)
            detail = _reason(answer.error) if answer.error is not None else "its call was cancelled"
            logger.warning("LoRA resolver %r failed resolving adapter %r: %s; asking the next resolver", name, lora_name, detail)
            return _Outcome(name, "error", detail), None
        request = answer.value
        if request is None:
            return _Outcome(name, "not found"), None
        if not isinstance(request, LoRARequest):
            detail = f"returned a {type(request).__name__}, not a LoRARequest or None"
            logger.warning("LoRA resolver %r %s for adapter %r; asking the next resolver", name, detail, lora_name)
            return _Outcome(name, "error", detail), None
        if request.lora_name != lora_name:
            detail = f"returned an adapter named {request.lora_name!r} for the name {lora_name!r}"
            logger.warning("LoRA resolver %r %s; asking the next resolver", name, detail)
            return _Outcome(name, "error", detail), None
        return _Outcome(name, "found", request.lora_path), request

    def _raise_if_remembered_miss(self, lora_name: str) -> None:
        remembered = self._misses.get(lora_name)
        if remembered is None:
            return
        expiry, message = remembered
        left = expiry - self._clock()
        if left <= 0:
            del self._misses[lora_name]
            return
        raise LoRAAdapterNotFoundError(
            f"{message} (remembered: resolvers are not asked again for this name for {left:.1f} s more; "
            "LORAPLEX_LORA_RESOLVER_MISS_TTL sets how long)"
        )

    # ---- sync API -------------------------------------------------------------------------------

    def resolve_sync(self, lora_name: str) -> LoRARequest:
        """`resolve` for synchronous code, run on loraplex's private event loop thread.

        Blocks the calling thread (even one running an event loop) until the resolution ends.
        """
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        with self._lock:
            leader_loop = self._leader_loops.get(lora_name)
        if running is not None and leader_loop is running:
            # waiting here would block the very loop that is fetching the adapter: a deadlock
            raise LoRAError(
                f"LoRA adapter {lora_name!r} is being resolved on this thread's event loop, so a synchronous call "
                "here cannot wait for it; from async code use `await engine.resolve_lora(name)` first"
            )
        future = asyncio.run_coroutine_threadsafe(self.resolve(lora_name), _private_loop())
        return future.result()


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ---- the private loop ------------------------------------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _private_loop() -> asyncio.AbstractEventLoop:
    """One daemon thread running an event loop for synchronous callers, started on first use.

    One loop for the whole process: resolvers that keep loop-bound clients (aiohttp, s3fs in
    async mode) see the same loop on every synchronous call.
    """
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="loraplex-lora-resolution", daemon=True)
            thread.start()
            _loop = loop
        return _loop

