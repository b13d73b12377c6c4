"""Running one HTTP request's prompts through the async engine.

An HTTP request becomes one engine request per prompt (completions may send several). Each runs
with DELTA outputs (only what is new since the last output), and is timed for /metrics. Before
the HTTP answer starts, every prompt's first output is awaited ("primed"): the engine raises a
request's errors (bad token ids, an adapter that fails to load) from the first output, and they
must become an HTTP status, not an error inside a stream that already answered 200. Closing the
merged stream, or cancelling its consumer (a client that disconnected), aborts every engine
request still running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ...engine.async_engine import AsyncLLMEngine
from ...lora.request import LoRARequest
from ...outputs import RequestOutput
from ...sampling_params import SamplingParams
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

# (prompt index, output) pairs, in the order the engine produced them
IndexedOutputs = AsyncIterator[tuple[int, RequestOutput]]


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None
    multi_modal_data: dict[str, Any] | None = None  # {"image": [PIL images]}


class Generation:
    """Submits engine requests for the server, with metrics and request logs."""

    def __init__(self, engine: AsyncLLMEngine, metrics: ServerMetrics, log_requests: bool = True) -> None:
        self.engine = engine
        self.metrics = metrics
        self.log_requests = log_requests

    async def start(self, requests: list[EngineRequest]) -> IndexedOutputs:
        """Submit every request and await each one's first output; then their outputs, merged."""
        streams = [self._stream(request) for request in requests]
        firsts = [asyncio.ensure_future(_first(stream)) for stream in streams]
        try:
            outputs = await asyncio.gather(*firsts)
        except BaseException:
            for task in firsts:
                task.cancel()
            await asyncio.gather(*firsts, return_exceptions=True)
            for stream in streams:
                await stream.aclose()
            raise
        return _merge(streams, outputs)

    async def _stream(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        lora_name = request.lora_request.lora_name if request.lora_request is not None else None
        if self.log_requests:
            logger.info("request %s: adapter %s, %d prompt tokens, %s", request.request_id, lora_name or "none (base model)",
                        len(request.prompt_token_ids), request.params)
        timer = self.metrics.request_started(lora_name, len(request.prompt_token_ids))
        finish_reason = None
        prompt: dict[str, Any] = {"prompt_token_ids": request.prompt_token_ids}
        if request.multi_modal_data is not None:
            prompt["multi_modal_data"] = request.multi_modal_data
        stream = self.engine.generate(prompt, request.params, request.request_id, request.lora_request)
        try:
            async for output in stream:
                timer.tokens(sum(len(completion.token_ids) for completion in output.outputs))
                if output.finished:
                    finish_reason = next((c.finish_reason for c in output.outputs if c.finish_reason), None)
                yield output
        finally:
            await stream.aclose()  # aborts the engine request if it has not finished
            timer.finished(finish_reason)


async def _first(stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    return await anext(stream, None)


async def _merge(streams: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput | None]) -> IndexedOutputs:
    """The primed first outputs, then every stream's outputs as they come."""
    if len(streams) == 1:
        try:
            if firsts[0] is not None:
                yield 0, firsts[0]
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        for index, first in enumerate(firsts):
            if first is not None:
                yield index, first
        running = len(streams)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
