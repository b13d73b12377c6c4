"""Errors over HTTP: OpenAI's error shape, and the status each error gets.

Every error answer is `{"error": {"message", "type", "param", "code"}}` (plus vLLM's
`"object": "error"`), which the `openai` client turns into its typed exceptions. Bad input is
always a 4xx: pydantic's validation errors and malformed JSON are 400 (not FastAPI's 422), a
loraplex error gets the status of its class (STATUS_OF), and only a fault of the server itself
is a 500.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...errors import (
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    LoRAAdapterNotFoundError,
    LoRAError,
    LoraplexError,
    ModelNotFoundError,
)

logger = logging.getLogger(__name__)

# first match wins: subclasses before their bases
STATUS_OF: tuple[tuple[type[BaseException], HTTPStatus], ...] = (
    (EngineDeadError, HTTPStatus.SERVICE_UNAVAILABLE),
    (LoRAAdapterNotFoundError, HTTPStatus.NOT_FOUND),
    (ModelNotFoundError, HTTPStatus.NOT_FOUND),
    (LoRAError, HTTPStatus.BAD_REQUEST),  # InvalidLoRAAdapterError among them
    (InvalidRequestError, HTTPStatus.BAD_REQUEST),
    (ConfigError, HTTPStatus.BAD_REQUEST),  # e.g. an adapter asked of a server started without --enable-lora
)

# the `type` field, as vLLM names it after the openai client's exception classes
_TYPE_OF = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    503: "ServiceUnavailableError",
}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _TYPE_OF.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"object": "error", "error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def status_of(exc: BaseException) -> int:
    for kind, status in STATUS_OF:
        if isinstance(exc, kind):
            return int(status)
    return int(HTTPStatus.INTERNAL_SERVER_ERROR)


def exception_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and error body for an exception raised while serving a request."""
    status = status_of(exc)
    if status >= 500 and not isinstance(exc, LoraplexError):
        logger.exception("internal error while serving a request", exc_info=exc)
        message = f"internal server error ({type(exc).__name__}: {exc}); the server log has the traceback"
    else:
        message = str(exc)
    return status, error_body(status, message)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraplexError)
    async def loraplex_error(_: Request, exc: LoraplexError) -> JSONResponse:
        status, body = exception_body(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(exc.errors())
        return error_response(HTTPStatus.BAD_REQUEST, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == HTTPStatus.NOT_FOUND:
            message = f"no route {request.method} {request.url.path} on this server; see GET /v1/models and the API docs"
        elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            allowed = (getattr(exc, "headers", None) or {}).get("Allow", "another method")
            message = f"{request.url.path} does not take {request.method} requests; use {allowed}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    app.add_middleware(InternalErrorMiddleware)


class InternalErrorMiddleware:
    """Any other exception a route raises becomes a 500 in the error shape, and the connection
    stays open (Starlette's own handler re-raises, and the server then drops the connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:  # too late for a status: the server ends the connection
                raise
            status, body = exception_body(exc)
            await JSONResponse(body, status_code=status)(scope, receive, send)


def describe_validation_errors(errors: Any) -> tuple[str, str | None]:
    """pydantic's errors as one message naming each field, its problem and the value sent."""
    parts, param = [], None
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        kind = error.get("type", "")
        if kind == "json_invalid":
            reason = error.get("ctx", {}).get("error", error.get("msg", ""))
            return f"the request body is not valid JSON ({reason}); send a JSON object", None
        if not loc:
            if kind == "missing":
                return "the request body is missing; send a JSON object", None
            sent = error.get("input")
            if isinstance(sent, (bytes, str)):  # not parsed: the Content-Type was not JSON
                return ("the request body was not read as JSON; send a JSON object with the header "
                        "`Content-Type: application/json`"), None
            return f"the request body must be a JSON object; got {_short(sent)}", None
        field = ".".join(loc) or "body"
        param = param or field
        detail = error.get("msg", "invalid value")
        if kind != "missing" and "input" in error:
            detail += f" (got {_short(error['input'])})"
        parts.append(f"{field}: {detail}")
    count = len(parts)
    return f"{count} invalid field{'s' if count > 1 else ''} in the request: " + "; ".join(parts), param


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
