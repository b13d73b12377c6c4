"""The OpenAI-compatible HTTP server: `build_app` (FastAPI routes over an AsyncLLMEngine) and
`run_server` (`loraplex serve`: the engine, the app and uvicorn).

Routes (vLLM's):
    GET  /health, /version, /metrics                      open, even with --api-key
    GET  /v1/models
    POST /v1/completions, /v1/chat/completions            streamed (server-sent events) or whole
    POST /tokenize, /detokenize
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True

A client that disconnects aborts its engine requests, whether it was waiting for a whole answer
or reading a stream.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ... import __version__, envs
from ...engine.async_engine import AsyncLLMEngine
from .auth import APIKeyMiddleware
from .errors import install_error_handlers
from .generation import Generation
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_models import ServingModels, add_lora_modules
from .serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger(__name__)

# nginx's code for "the client closed the connection": nobody reads it, it marks the access log
CLIENT_CLOSED_REQUEST = 499


def build_app(engine: AsyncLLMEngine, *, api_key: str | None = None, log_requests: bool = True,
              metrics: ServerMetrics | None = None) -> FastAPI:
    """The server's FastAPI app over `engine`. The adapter admin routes exist only when
    VLLM_ALLOW_RUNTIME_LORA_UPDATING is true now."""
    models = ServingModels(engine)
    metrics = metrics if metrics is not None else ServerMetrics(engine, models.served_model_name)
    generation = Generation(engine, metrics, log_requests)
    completion = OpenAIServingCompletion(engine, models, generation)
    chat = OpenAIServingChat(engine, models, generation)
    tokenization = OpenAIServingTokenization(models)

    app = FastAPI(title="loraplex", version=__version__, summary="OpenAI-compatible server for many LoRA adapters")
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.state.engine, app.state.models, app.state.metrics = engine, models, metrics

    @app.get("/health")
    async def health() -> Response:
        await engine.check_health()  # EngineDeadError: 503
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(models.list_models())

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await until_disconnected(request, completion.create_completion(body))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await until_disconnected(request, chat.create_chat_completion(body))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await tokenization.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await tokenization.detokenize(body)

    if envs.allow_runtime_lora_updating():
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
            return await models.load_lora_adapter(body)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
            return await models.unload_lora_adapter(body)

    return app


async def until_disconnected(request: Request, answer: Awaitable[Response]) -> Response:
    """`answer`, unless the client leaves first: then it is cancelled (its engine requests abort).

    A stream is watched by the response itself once it starts; this covers the wait before it.
    """
    task = asyncio.ensure_future(answer)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- loraplex serve ------------------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> int:
    """`loraplex serve`: load the model and the --lora-modules adapters, then serve until interrupted."""
    import uvicorn

    from ..cli_args import engine_args_from

    engine_args = engine_args_from(args)
    _configure_logging()
    print(f"loraplex serve: loading {engine_args.model or 'the embedded model'} ...", flush=True)
    engine = AsyncLLMEngine.from_engine_args(engine_args)
    try:
        asyncio.run(add_lora_modules(engine, args.lora_modules))  # a bad adapter stops the start, with its reason
        api_key = args.api_key or envs.api_key()
        app = build_app(engine, api_key=api_key, log_requests=not args.disable_log_requests)
        print(startup_summary(app.state.models, args.host, args.port, api_key is not None), flush=True)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level))
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn has shut down gracefully, then re-raises Ctrl-C
            pass
        print("loraplex serve: stopped", flush=True)
    finally:
        engine.shutdown()
    return 0


def startup_summary(models: ServingModels, host: str, port: int, has_api_key: bool) -> str:
    """Where the server listens and what it serves."""
    shown_host = f"[{host}]" if ":" in host else host
    where = f"http://{shown_host}:{port}"
    if host in ("0.0.0.0", "::", ""):
        where += " (every interface)"
    lines = [f"loraplex serve: listening on {where}; OpenAI API under /v1",
             f"  model:    {models.served_model_name} ({models.model_path})"]
    if not models.lora_enabled:
        lines.append("  adapters: LoRA off (--enable-lora to serve adapters)")
    else:
        adapters = models.adapters()
        listed = ", ".join(f"{name} ({request.lora_path})" for name, request in sorted(adapters.items()))
        lines.append(f"  adapters: {listed or 'none yet'}")
        if envs.allow_runtime_lora_updating():
            lines.append("  runtime adapter loading: on (POST /v1/load_lora_adapter; unknown names go to the resolvers)")
        else:
            lines.append("  runtime adapter loading: off (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True turns it on)")
    lines.append(f"  API key:  {'required (Authorization: Bearer <key>)' if has_api_key else 'none (--api-key to require one)'}")
    return "\n".join(lines)


def _configure_logging() -> None:
    """loraplex's own logs (request logs, resolvers) to stderr, when the process has set up none."""
    root = logging.getLogger("loraplex")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
