"""One HTTP request run through an ASGI app in this process, its answer handed back in pieces.

A replica serves the OpenAI routes with the server's own FastAPI app (`build_app`); the ingress
forwards each request here as plain values (Ray pickles them) and gets back, first, the status
and headers, then the body in the chunks the app sent (one per server-sent event when it
streams). Closing the generator early (the client left) cancels the app, which aborts its engine
requests, as a disconnect does on a single server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message


@dataclass(frozen=True)
class ForwardedRequest:
    """What the ingress forwards of an HTTP request."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass(frozen=True)
class ResponseStart:
    """The first piece of a forwarded answer."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((value.decode("latin-1") for k, value in self.headers if k.lower() == key), None)


async def call_app(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
    """The app's answer to `request`: a ResponseStart, then the body's non-empty chunks."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
        "query_string": request.query_string, "headers": list(request.headers),
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    body_sent = asyncio.Event()

    async def receive() -> Message:
        if not body_sent.is_set():
            body_sent.set()
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves on its own: closing this generator cancels
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            sent.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while True:
            message = await sent.get()
            if message is None:
                task.result()  # the app's own exception, if it raised one
                return
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
