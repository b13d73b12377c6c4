"""`--api-key`: a Bearer token guarding the API (every /v1 route, /tokenize, /detokenize).

`/health`, `/version` and `/metrics` stay open, so that load balancers and Prometheus need no
key. A middleware rather than a route dependency: routes added later are covered as well, and
an unknown /v1 route answers 401 to a caller without the key, revealing nothing.
"""

from __future__ import annotations

import hmac
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

PROTECTED_PREFIXES = ("/v1/",)
PROTECTED_PATHS = frozenset({"/v1", "/tokenize", "/detokenize"})


def is_protected(path: str) -> bool:
    return path in PROTECTED_PATHS or path.startswith(PROTECTED_PREFIXES)


class APIKeyMiddleware:
    """401 in OpenAI's error shape unless `Authorization: Bearer <key>` carries the key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        problem = self._problem(dict(scope["headers"]).get(b"authorization"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        response = error_response(HTTPStatus.UNAUTHORIZED, problem, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _problem(self, header: bytes | None) -> str | None:
        """Why the request is not authorised, or None if it is."""
        if header is None:
            return ("this server requires an API key and the request has none; send the header "
                    "`Authorization: Bearer <key>` (the openai client's api_key)")
        scheme, _, token = header.partition(b" ")
        # compared in constant time, so response times reveal nothing about the key
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            return ("the API key is not valid for this server; send the key the server was started with "
                    "(--api-key or VLLM_API_KEY) as `Authorization: Bearer <key>`")
        return None
