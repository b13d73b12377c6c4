"""OpenAIIngress: the one HTTP endpoint of a Ray Serve deployment of loraplex.

The OpenAI routes are the single server's (`build_app`), run by every engine replica; the
ingress only routes. It reads a request's `model`, tags the request with the adapter's name as
Ray Serve's multiplexed model id (none for the base model), and forwards it through a
DeploymentHandle: Serve picks a replica that already holds the adapter. The answer comes back
as the replica's app sent it (status, headers, body; streams event by event).

What concerns every replica is answered here: /v1/models (the union of the base model, the
registered adapters and what any replica resolved), /v1/load_lora_adapter and
/v1/unload_lora_adapter (through the AdapterRegistry, answered once every live replica has
applied them; an unload reaches adapters the replicas' resolvers found too), /metrics (every
replica's page, a `replica` label on each series), /health and /replicas (each replica's pid,
the adapters it holds and Serve routes to it, adapter loads).

A replica that dies mid-request: the request fails with 503 and `Retry-After` (in OpenAI's error
shape, or as the last event of a stream that had begun); Serve starts a replacement, and
requests meanwhile go to the other replicas.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..entrypoints.openai.auth import APIKeyMiddleware
from ..entrypoints.openai.errors import error_body, error_response, install_error_handlers
from ..entrypoints.openai.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from ..entrypoints.openai.serving_models import OWNED_BY, adapter_not_found, already_loaded, load_request_problem
from .asgi import ForwardedRequest, ResponseStart
from .faults import REPLICA_FAILURES, RETRY_AFTER_S
from .metrics import merge_pages

SYNC_TIMEOUT_S = 30.0  # how long an admin request waits for every replica to apply it


class OpenAIIngress:
    def __init__(self, engines: Any, registry: Any, adapter_affinity: bool = True, api_key: str | None = None,
                 allow_runtime_lora_updating: bool = False) -> None:
        self.engines = engines  # DeploymentHandle of the EngineReplica deployment
        self.registry = registry  # DeploymentHandle of the AdapterRegistry
        self.adapter_affinity = adapter_affinity
        self.api_key = api_key
        self.allow_runtime_lora_updating = allow_runtime_lora_updating
        self._base_names: set[str] | None = None
        self._created = int(time.time())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_ingress_app(self)

    async def base_names(self) -> set[str]:
        if self._base_names is None:
            self._base_names = set((await self.engines.describe.remote())["base_names"])
        return self._base_names

    async def adapter_of(self, body: bytes) -> str | None:
        """The adapter a request body's `model` names; None for the base model (or no JSON `model`)."""
        try:
            model = json.loads(body).get("model") if body else None
        except (ValueError, AttributeError):
            return None  # the replica's app answers the malformed body
        if not isinstance(model, str) or not model or model in await self.base_names():
            return None
        return model

    def handle_for(self, adapter: str | None, stream: bool = False) -> Any:
        handle = self.engines.options(stream=stream) if stream else self.engines
        if adapter is not None and self.adapter_affinity:
            handle = handle.options(multiplexed_model_id=adapter)
        return handle

    # ---- forwarding ---------------------------------------------------------------------------------

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        adapter = await self.adapter_of(body)
        forwarded = ForwardedRequest(request.method, route_path(request), request.url.query.encode(),
                                     [(k.lower(), v) for k, v in request.headers.raw], body)
        pieces = self.handle_for(adapter, stream=True).forward.remote(forwarded, adapter)
        try:
            start = await pieces.__anext__()
        except REPLICA_FAILURES as exc:
            return replica_lost(exc)
        assert isinstance(start, ResponseStart), start
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers if k.lower() != b"content-length"}
        if (start.header("content-type") or "").startswith("text/event-stream"):
            return StreamingResponse(_relay(pieces), status_code=start.status, headers=headers)
        try:
            content = b"".join([piece async for piece in pieces])
        except REPLICA_FAILURES as exc:
            return replica_lost(exc)
        return Response(content, status_code=start.status, headers=headers)

    # ---- what concerns every replica ------------------------------------------------------------------

    async def list_models(self) -> dict[str, Any]:
        reports = await self.registry.replicas.remote()
        snapshot = await self.registry.snapshot.remote()
        if not reports:
            raise _NoReplica()
        base = reports[0].models
        cards = {base["id"]: base}
        found = {name: path for report in reports for name, path in report.adapters.items()}
        found.update({name: entry.path for name, entry in snapshot.adapters.items()})
        parents = {name: entry.base_model_name for name, entry in snapshot.adapters.items()}
        for name, path in sorted(found.items()):
            cards.setdefault(name, {"id": name, "object": "model", "created": self._created, "owned_by": OWNED_BY,
                                    "root": path, "parent": parents.get(name) or base["id"], "max_model_len": None,
                                    "permission": []})
        return {"object": "list", "data": list(cards.values())}

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> Response:
        refused = load_request_problem(body, await self.base_names())
        if refused is not None:
            return refused
        name = body.lora_name
        before = (await self.registry.snapshot.remote()).adapters.get(name)
        if before is not None and not body.load_inplace:
            return already_loaded(name)
        # registered first, so the replica that checks it (and every later one) reads this path
        version = await self.registry.put.remote(name, body.lora_path, None)
        try:
            status, error = await self.handle_for(name).load.remote(name)
        except REPLICA_FAILURES as exc:
            status, error = HTTPStatus.SERVICE_UNAVAILABLE, error_body(503, _lost_message(exc))
        if status != HTTPStatus.OK:  # refused: the registry goes back to what it held
            if before is None:
                await self.registry.remove.remote(name)
            else:
                await self.registry.put.remote(name, before.path, before.base_model_name)
            return JSONResponse(error, status_code=status)
        behind = await self.registry.wait_synced.remote(version, SYNC_TIMEOUT_S)
        if behind:
            return _not_everywhere(name, "loaded", behind)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> Response:
        """By name, as vLLM (a `lora_int_id` beside it is accepted and not needed): each replica numbers
        its adapters itself, so an id alone names no adapter deployment-wide."""
        if not body.lora_name:
            alone = ("; 'lora_int_id' alone cannot name an adapter here: each Ray Serve replica numbers its adapters "
                     "itself (GET /v1/models lists the names)") if body.lora_int_id is not None else ""
            return error_response(HTTPStatus.BAD_REQUEST, f"'lora_name' must be provided to unload a LoRA adapter{alone}.",
                                  "lora_name")
        version = await self.registry.remove.remote(body.lora_name)
        if version is None:
            return adapter_not_found(body)
        behind = await self.registry.wait_synced.remote(version, SYNC_TIMEOUT_S)
        if behind:
            return _not_everywhere(body.lora_name, "unloaded", behind)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def metrics(self) -> Response:
        reports = await self.registry.replicas.remote(True)
        body = merge_pages({report.replica: report.metrics for report in reports})
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def replicas(self) -> dict[str, Any]:
        reports = await self.registry.replicas.remote()
        keys = ("replica", "pid", "synced_version", "held", "routed", "adapter_loads", "num_running", "num_waiting")
        return {"object": "list", "data": [{key: getattr(report, key) for key in keys} for report in reports]}


def build_ingress_app(ingress: OpenAIIngress) -> FastAPI:
    app = FastAPI(title="loraplex on Ray Serve", version=__version__)
    install_error_handlers(app)
    if ingress.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=ingress.api_key)

    @app.get("/health")
    async def health() -> Response:
        if not await ingress.registry.replicas.remote():
            raise _NoReplica()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return await ingress.metrics()

    @app.get("/replicas")
    async def replicas() -> dict[str, Any]:
        return await ingress.replicas()

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(await ingress.list_models())

    if ingress.allow_runtime_lora_updating:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
            return await ingress.load_lora_adapter(body)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
            return await ingress.unload_lora_adapter(body)

    # every other route is the single server's, on a replica
    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request) -> Response:
        return await ingress.forward(request)

    @app.exception_handler(_NoReplica)
    async def no_replica(_: Request, exc: _NoReplica) -> JSONResponse:
        return error_response(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)})

    async def deployment_lost(_: Request, exc: Exception) -> JSONResponse:  # e.g. the AdapterRegistry restarting
        return error_response(HTTPStatus.SERVICE_UNAVAILABLE,
                              f"a deployment this request needs is unavailable ({type(exc).__name__}); Ray Serve "
                              "restarts it: retry the request", headers={"Retry-After": str(RETRY_AFTER_S)})

    for failure in REPLICA_FAILURES:
        app.add_exception_handler(failure, deployment_lost)

    return app


class _NoReplica(Exception):
    def __init__(self) -> None:
        super().__init__("no engine replica has reported yet (starting, or all of them restarting); retry shortly")


def route_path(request: Request) -> str:
    """The path below the application's route prefix (Serve mounts the app there: a config's
    `route_prefix: /llm` gives `/llm/v1/models`), which is what the replica's app routes on."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def replica_lost(exc: BaseException) -> JSONResponse:
    """503 with Retry-After: the replica serving the request went away; another one will answer."""
    return error_response(HTTPStatus.SERVICE_UNAVAILABLE, _lost_message(exc), headers={"Retry-After": str(RETRY_AFTER_S)})


def _lost_message(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"the engine replica serving this request is unavailable ({type(exc).__name__}: {first_line[:200]}); "
            "Ray Serve replaces it and the other replicas keep serving: retry the request")


def _not_everywhere(name: str, done: str, behind: list[str]) -> JSONResponse:
    return error_response(HTTPStatus.SERVICE_UNAVAILABLE,
                          f"LoRA adapter '{name}' is {done} in the registry, but replica(s) {', '.join(behind)} did not "
                          f"apply it within {SYNC_TIMEOUT_S:.0f} s (busy with it, or restarting); they apply it when they "
                          "can, retry to confirm", "lora_name")


async def _relay(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream's events; if the replica dies mid-stream, an error event (503) and the end marker."""
    try:
        async for piece in pieces:
            yield piece
    except REPLICA_FAILURES as exc:
        yield f"data: {json.dumps(error_body(503, _lost_message(exc)))}\n\n".encode()
        yield b"data: [DONE]\n\n"
