"""AsyncLLMEngine: the engine for asyncio callers (the HTTP server), run by one engine thread.

One thread owns the LLMEngine: it steps while any request is unfinished and sleeps otherwise.
Every other call reaches the engine as a command that the thread runs between two steps
(add_request, abort, the adapter methods), so nothing changes the engine while it steps. Adapters
are read from disk and resolved off that thread (see loraplex.lora.catalog); the engine thread
only hands what was read to the LoRA manager. Each
request's outputs go to its own asyncio queue on the event loop of the caller reading them, so
callers never wait on each other, and a request submitted meanwhile joins the next step:
concurrent callers share batches.

The engine thread only ever builds DELTA or FINAL_ONLY outputs (a CUMULATIVE caller's outputs
are summed up on its own side), so a step costs O(new tokens), never O(tokens so far).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..config import EngineArgs
from ..errors import EngineDeadError, InvalidRequestError
from ..lora.manager import AdapterStats
from ..lora.request import LoRARequest
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import RequestOutputKind, SamplingParams
from .block_pool import PrefixCacheStats
from .llm_engine import LLMEngine, PromptType

logger = logging.getLogger(__name__)

T = TypeVar("T")

# With requests pending but nothing schedulable (e.g. every adapter slot pinned), wait this long
# between attempts rather than spin.
_IDLE_RETRY_S = 0.005


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine for metrics, read while it runs (each field is current; they are
    not all from one instant)."""

    num_running: int  # requests with a sequence in the running batch
    num_waiting: int  # requests whose unfinished sequences all wait
    num_preemptions: int  # sequences preempted so far (recomputed later)
    kv_cache_usage: float  # fraction of the KV cache blocks in use, 0 to 1
    prompt_tokens_total: int  # prompt tokens processed (each request's prompt once)
    generation_tokens_total: int  # tokens generated
    num_steps: int  # steps that ran a batch
    max_batch_size: int  # the most sequences one step has run
    running_lora_adapters: list[str]  # adapters of the running sequences (sorted)
    waiting_lora_adapters: list[str]  # adapters of the waiting sequences (sorted)
    lora_stats: dict[str, AdapterStats]  # per adapter: requests, tokens, loads, cache hits, ... (copies)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached (their K/V not computed again)
    lora_prefix_cache: dict[str, PrefixCacheStats] = field(default_factory=dict)  # the same, per adapter (copies)


class AsyncLLMEngine:
    """vLLM's AsyncLLMEngine / AsyncLLM: `async for out in engine.generate(prompt, params, id)`.

    `engine` is the LLMEngine the thread owns: read its configuration (`tokenizer`,
    `served_model_name`, `max_model_len`, `model_config`, `args`) freely, but change it only
    through this class's methods.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._wakeup = threading.Condition()
        self._commands: deque[tuple[concurrent.futures.Future, Callable[..., Any], tuple]] = deque()
        self._stopping = False
        self._dead: tuple[str, BaseException | None] | None = None  # why the loop ended, and the cause
        self._streams: dict[str, _Stream] = {}  # request id -> its reader's queue (engine thread only)
        self._num_steps = 0
        self._max_batch_size = 0
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        """Build the LLMEngine (loads the model) and start the engine thread."""
        return cls(LLMEngine.from_engine_args(args))

    # ---- requests -------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        lora_request: LoRARequest | str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs, as `sampling_params.output_kind` asks, until it finishes.

        A request the engine refuses raises its error (InvalidRequestError, LoRAError, ...) from
        the first iteration. Leaving early (break, aclose, a cancelled task, a client gone)
        aborts the request. If the engine dies, the iteration raises EngineDeadError.
        DELTA outputs that queued up while the caller was busy come merged into one.
        """
        if not isinstance(sampling_params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be a SamplingParams; got {type(sampling_params).__name__}")
        cumulative = sampling_params.output_kind is RequestOutputKind.CUMULATIVE
        params = dataclasses.replace(sampling_params, output_kind=RequestOutputKind.DELTA) if cumulative else sampling_params
        total = _Cumulative(params) if cumulative else None
        stream = _Stream(asyncio.get_running_loop())
        finished = False
        try:
            if lora_request is not None:
                lora_request = await self._prepare_lora(lora_request)
            await self._call(self._add_request, stream, request_id, prompt, params, lora_request)
            while not finished:
                out = await stream.next()
                finished = out.finished
                yield total.add(out) if total is not None else out
        finally:
            if not finished:
                self._abort_quietly(request_id, stream)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its reader gets a last output with finish_reason "abort". Unknown ids are ignored."""
        await self._call(self._abort, request_id)

    # ---- adapters -------------------------------------------------------------------------------

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Add an adapter, checked off the engine thread first; with `load_inplace=True` for an added
        name, return once the new weights serve (requests started on the old ones finish on them)."""
        catalog = self.engine.lora_catalog
        if catalog is not None and isinstance(lora_request, LoRARequest):
            lora_request = await asyncio.to_thread(catalog.prepare, lora_request)
        done = await self._call(self.engine._add_lora, lora_request)
        return await asyncio.wrap_future(done)

    async def remove_lora(self, lora_id: int | str) -> bool:
        return await self._call(self.engine.remove_lora, lora_id)

    async def pin_lora(self, lora_id: int | str) -> bool:
        return await self._call(self.engine.pin_lora, lora_id)

    async def list_loras(self) -> set[int]:
        """The ids of the adapters held in the CPU cache, as vLLM's (an evicted adapter drops out)."""
        return await self._call(self.engine.list_loras)

    async def list_adapters(self) -> dict[str, LoRARequest]:
        """Every adapter added, by name."""
        return self.engine.list_adapters()

    async def resolve_lora(self, lora_name: str) -> LoRARequest:
        """The adapter named `lora_name`: one already added, else one the resolvers find (never a
        path or a Hub id: HTTP's rule).

        Resolvers run, and the adapter is read and checked, off the engine thread; the engine
        thread then adds what was read, between two steps.
        """
        catalog = self.engine._catalog()
        found = await catalog.resolve(lora_name)
        if catalog.get(found.lora_name) is found:
            return found
        return await self._call(catalog.register_found, found)

    async def _prepare_lora(self, lora_request: LoRARequest | str) -> LoRARequest | str:
        """What `generate` names, read and checked off the engine thread when it is new (the Python
        API's rule: names, directories, resolvers, Hub ids)."""
        catalog = self.engine.lora_catalog
        if catalog is None:
            return lora_request  # add_request says LoRA is off
        if isinstance(lora_request, LoRARequest):
            known = catalog.get(lora_request.lora_name)
            if known is not None and known.lora_path == lora_request.lora_path:
                return lora_request
        elif isinstance(lora_request, str) and catalog.get(lora_request) is not None:
            return lora_request
        return await asyncio.to_thread(catalog.prepare, lora_request)

    # ---- state ----------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None and not self._stopping

    @property
    def errored(self) -> bool:
        """The loop died of an error (not shut down)."""
        return self._dead is not None and self._dead[1] is not None

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine loop is not running."""
        if not self.is_running:
            raise self._dead_error()

    def stats(self) -> EngineStats:
        engine = self.engine
        scheduler = engine.scheduler
        # read while the engine thread steps: list() copies a container in one go under the GIL
        running, waiting = list(scheduler.running), list(scheduler.waiting)
        running_ids = {seq.request_id for seq in running}
        manager = engine.lora_manager
        pool = scheduler.pool
        return EngineStats(
            num_running=len(running_ids),
            num_waiting=len({seq.request_id for seq in waiting} - running_ids),
            num_preemptions=scheduler.num_preemptions,
            kv_cache_usage=1.0 - pool.num_free / pool.num_blocks,
            prompt_tokens_total=engine.output_processor.num_prompt_tokens,
            generation_tokens_total=engine.output_processor.num_generation_tokens,
            num_steps=self._num_steps,
            max_batch_size=self._max_batch_size,
            running_lora_adapters=sorted({seq.lora_name for seq in running if seq.lora_name is not None}),
            waiting_lora_adapters=sorted({seq.lora_name for seq in waiting if seq.lora_name is not None}),
            lora_stats={name: dataclasses.replace(s) for name, s in list(manager.stats.items())} if manager else {},
            prefix_cache_queries=scheduler.prefix_cache.queries,
            prefix_cache_hits=scheduler.prefix_cache.hits,
            lora_prefix_cache={name: dataclasses.replace(s) for name, s in list(scheduler.lora_prefix_cache.items())},
        )

    def shutdown(self) -> None:
        """Stop the engine thread (after its current step); running requests end with EngineDeadError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ---- the caller's side of commands ------------------------------------------------------------

    def _submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._wakeup:
            if self._dead is not None or self._stopping:
                raise self._dead_error()
            self._commands.append((future, fn, args))
            self._wakeup.notify()
        return future

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread between two steps; its result or exception."""
        return await asyncio.wrap_future(self._submit(fn, *args))

    def _abort_quietly(self, request_id: str, stream: _Stream) -> None:
        """Abort the request `stream` reads, without waiting (its reader has left)."""
        try:
            self._submit(self._abort_stream, request_id, stream)
        except EngineDeadError:
            pass  # nothing runs any more

    def _dead_error(self) -> EngineDeadError:
        reason, cause = self._dead or ("the engine is shutting down", None)
        error = EngineDeadError(f"{reason}; no request can be served: restart the engine")
        error.__cause__ = cause
        return error

    # ---- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._wakeup:
                    while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, deque()
                for future, fn, args in commands:
                    if future.set_running_or_notify_cancel():  # False: the caller gave up first
                        try:
                            future.set_result(fn(*args))
                        except Exception as exc:  # noqa: BLE001 - the caller's error, not the engine's
                            future.set_exception(exc)
                if engine.has_unfinished_requests() and not self._step():
                    with self._wakeup:
                        if not (self._commands or self._stopping):
                            self._wakeup.wait(_IDLE_RETRY_S)
            engine.abort_request(list(engine.requests))  # shut down: blocks and adapter slots go back
        except BaseException as exc:  # noqa: BLE001 - every reader must hear of it
            logger.exception("the engine loop failed")
            self._end(f"the engine loop failed: {type(exc).__name__}: {exc}", exc)
            return
        self._end("the engine was shut down", None)

    def _step(self) -> bool:
        """One engine step, its outputs handed to their readers; False if nothing could run."""
        processor = self.engine.output_processor
        before = processor.num_generation_tokens
        outputs = self.engine.step()
        batch_size = processor.num_generation_tokens - before  # one token per sequence that ran
        if batch_size:
            self._num_steps += 1
            self._max_batch_size = max(self._max_batch_size, batch_size)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():  # one wake-up per event loop and step
            if not _send(loop, items):  # that loop is closed: nobody reads these any more
                for _, out in items:
                    self._streams.pop(out.request_id, None)
                    self.engine.abort_request(out.request_id)
        return bool(batch_size or outputs)

    def _add_request(self, stream: _Stream, request_id: str, prompt: PromptType, params: SamplingParams,
                     lora_request: LoRARequest | str | None) -> None:
        self.engine.add_request(request_id, prompt, params, lora_request=lora_request)
        self._streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        request = self.engine.requests.get(request_id)
        self.engine.abort_request(request_id)
        if stream is not None and request is not None:
            last = self.engine.output_processor.make_output(request)  # finish_reason "abort"
            if last is not None:
                _send(stream.loop, [(stream, last)])

    def _abort_stream(self, request_id: str, stream: _Stream) -> None:
        if self._streams.get(request_id) is stream:  # not a later request that reuses the id
            del self._streams[request_id]
            self.engine.abort_request(request_id)

    def _end(self, reason: str, cause: BaseException | None) -> None:
        with self._wakeup:
            self._dead = (reason, cause)
            commands, self._commands = self._commands, deque()
        if self.engine.lora_catalog is not None:  # reloads waiting for a step that never comes
            self.engine.lora_catalog.fail_reloads(self._dead_error())
        for future, _, _ in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(self._dead_error())
        for stream in self._streams.values():
            _send(stream.loop, [(stream, self._dead_error())])
        self._streams.clear()


AsyncLLM = AsyncLLMEngine  # vLLM's newer name


class _Stream:
    """One request's outputs, queued on the event loop of the caller that reads them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._error: BaseException | None = None  # met while merging: raised by the next call

    async def next(self) -> RequestOutput:
        if self._error is not None:
            raise self._error
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        # a slow reader gets what queued meanwhile in one output (only DELTA queues more than one)
        while not item.finished and not self.queue.empty():
            later = self.queue.get_nowait()
            if isinstance(later, BaseException):
                self._error = later
                break
            item.add(later, aggregate=True)
        return item


def _send(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, RequestOutput | BaseException]]) -> bool:
    """Queue items on their streams from the engine thread; False if `loop` is closed."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:
        return False
    return True


def _put_all(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


class _Cumulative:
    """A CUMULATIVE caller's outputs, summed up from the engine's DELTA outputs on its own side.

    Like the engine's CUMULATIVE outputs, each carries every sample, and its token ids and
    logprobs are lists that keep growing while the request runs.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.total: RequestOutput | None = None

    def add(self, delta: RequestOutput) -> RequestOutput:
        if self.total is None:
            self.total = dataclasses.replace(delta, outputs=[self._empty(i, delta) for i in range(self.params.n)])
        self.total.add(delta, aggregate=True)
        # fresh objects (sharing the growing lists), so an output already handed out keeps its text
        return dataclasses.replace(self.total, outputs=[dataclasses.replace(c) for c in self.total.outputs])

    def _empty(self, index: int, delta: RequestOutput) -> CompletionOutput:
        logprobs = self.params.logprobs is not None
        return CompletionOutput(index, "", [], 0.0 if logprobs else None, [] if logprobs else None,
                                lora_request=delta.lora_request)
