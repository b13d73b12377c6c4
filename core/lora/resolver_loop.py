"""Each resolver's calls run on an event loop thread of that resolver's own.

A resolver is third-party code. Awaited on the caller's loop, one that blocks with synchronous
work (`time.sleep` inside `async def resolve_lora`) would freeze every request on that loop and
no timeout could fire; one that raises `SystemExit` or `KeyboardInterrupt` would stop the loop;
one that raises `CancelledError` would look like a cancellation of the caller. So:

* Every resolver object gets one long-lived daemon thread running an event loop, started at its
  first call and stopped when the resolver is garbage collected. All its calls run there, so
  loop-bound clients it keeps (aiohttp sessions, s3fs) see the same loop on every call.
* The caller waits on its own loop, never blocked, under its own timeout.
* Whatever the resolver raises, any `BaseException` (`CancelledError` included), is caught on
  the resolver's thread and handed back as the call's `error`. So the caller's wait raises
  `CancelledError` only when the caller itself is cancelled: that propagates, after cancelling
  the resolver's call.
* On timeout the call is cancelled and given `CANCEL_GRACE` seconds to unwind. A call that
  does not end by then (its loop is blocked, or it ignores cancellation) leaves the resolver
  *stuck*: until that call ends, later calls are not started (they would only queue behind it
  on the blocked loop) and are answered at once as `busy`. Once it ends, calls run normally.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CANCEL_GRACE", "Answer", "call_resolver"]

CANCEL_GRACE = 1.0  # seconds a timed-out call may take to unwind before its resolver counts as stuck


@dataclass
class Answer:
    """How one call ended. kind: "value" (`value` is what it returned), "raised" (`error`),
    "timeout" (no answer in time), "busy" (not asked: an earlier call is stuck), or "cancelled"."""

    kind: str
    value: Any = None
    error: BaseException | None = None


async def call_resolver(resolver: Any, label: str, args: tuple, timeout: float) -> Answer:
    """`await resolver.resolve_lora(*args)` on the resolver's own loop thread, within `timeout` s.

    Never raises for anything the resolver does; raises CancelledError when the caller is cancelled.
    """
    loop = _loop_for(resolver, label)
    if loop.busy():
        return Answer("busy")
    call = loop.start(lambda: resolver.resolve_lora(*args))
    waiter = _waiter(call.answer)
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
        if done:
            return waiter.result()
        loop.cancel(call)
        done, _ = await asyncio.wait({waiter}, timeout=CANCEL_GRACE)
    except asyncio.CancelledError:
        loop.cancel(call)  # the caller is gone: so is its question
        raise
    if not done:
        loop.mark_stuck(call)
    return Answer("timeout")


def _waiter(answer: concurrent.futures.Future[Answer]) -> asyncio.Future[Answer]:
    """A future of the running loop that gets `answer`'s result (never cancelled with it)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Answer] = loop.create_future()

    def deliver(result: Answer) -> None:
        if not waiter.done():
            waiter.set_result(result)

    def on_answer(done: concurrent.futures.Future[Answer]) -> None:
        try:
            loop.call_soon_threadsafe(deliver, done.result())
        except RuntimeError:  # the caller's loop closed meanwhile: nobody is waiting
            pass

    answer.add_done_callback(on_answer)
    return waiter


class _Call:
    """One call on a resolver's loop: its task there, whether we cancelled it, how it ended."""

    def __init__(self) -> None:
        self.answer: concurrent.futures.Future[Answer] = concurrent.futures.Future()
        self.task: asyncio.Task | None = None
        self.cancel_requested = False

    def settle(self, answer: Answer) -> None:
        if not self.answer.done():
            self.answer.set_result(answer)


class _ResolverLoop:
    """A daemon thread running an event loop for one resolver."""

    def __init__(self, label: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"loraplex-resolver-{label}", daemon=True)
        self._lock = threading.Lock()
        self._stuck: list[_Call] = []
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def stop(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # already closed
            pass

    def start(self, make_coroutine: Callable[[], Any]) -> _Call:
        call = _Call()

        def launch() -> None:
            call.task = self.loop.create_task(_guarded(call, make_coroutine))
            # a task cancelled before its first step never enters _guarded: settle it here too
            call.task.add_done_callback(lambda _: call.settle(Answer("cancelled")))

        self.loop.call_soon_threadsafe(launch)
        return call

    def cancel(self, call: _Call) -> None:
        def cancel() -> None:
            call.cancel_requested = True
            if call.task is not None:
                call.task.cancel()

        try:
            self.loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # the loop is gone, and the call with it
            pass

    def mark_stuck(self, call: _Call) -> None:
        with self._lock:
            self._stuck.append(call)

    def busy(self) -> bool:
        """True while a call that outlived its timeout and grace is still running."""
        with self._lock:
            self._stuck = [call for call in self._stuck if not call.answer.done()]
            return bool(self._stuck)


async def _guarded(call: _Call, make_coroutine: Callable[[], Any]) -> None:
    """Run the resolver's coroutine; every way it can end becomes the call's Answer."""
    try:
        awaitable = make_coroutine()
        if not inspect.isawaitable(awaitable):
            raise TypeError(f"resolve_lora returned a {type(awaitable).__name__}, not an awaitable; define it "
                            "with `async def`")
        value = await awaitable
    except asyncio.CancelledError as exc:
        if call.cancel_requested:  # ours (timeout, or the caller went away): end as cancelled
            call.settle(Answer("cancelled"))
            raise
        call.settle(Answer("raised", error=exc))  # the resolver's own
    except GeneratorExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt...: this call's failure only
        call.settle(Answer("raised", error=exc))
    else:
        call.settle(Answer("value", value))


# ---- one loop per resolver object -----------------------------------------------------------------

_loops: dict[int, tuple[Any, _ResolverLoop]] = {}  # id(resolver) -> (weak or strong reference, loop)
_loops_lock = threading.Lock()  # serialises creation; _forget, run by any thread's GC, never takes it


def _loop_for(resolver: Any, label: str) -> _ResolverLoop:
    key = id(resolver)
    entry = _loops.get(key)
    if entry is not None and entry[1].thread.is_alive():
        return entry[1]
    with _loops_lock:
        entry = _loops.get(key)
        if entry is not None and entry[1].thread.is_alive():
            return entry[1]
        loop = _ResolverLoop(label)
        try:
            # the loop ends with its resolver; the callback runs before the id can be reused
            reference: Any = weakref.ref(resolver, lambda _, key=key: _forget(key))
        except TypeError:  # no weak references to this object (__slots__): it keeps its loop
            reference = resolver
        _loops[key] = (reference, loop)
        return loop


def _forget(key: int) -> None:
    entry = _loops.pop(key, None)  # atomic: a lock here could deadlock with a GC run while it is held
    if entry is not None:
        entry[1].stop()
