"""What a request's `model` names, `/v1/models`, and runtime adapter loading and unloading.

`model` is the base model (its served name, or the model path it was started with) or an
adapter. An adapter name is looked up among the adapters added (--lora-modules, load_lora_adapter)
and, when VLLM_ALLOW_RUNTIME_LORA_UPDATING is true, through the installed resolvers; it is never
taken as a directory on the server or a Hub repo id, so `../x`, `/etc` or `org/repo` reach
nothing a resolver does not serve.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus
from typing import Any

from fastapi.responses import PlainTextResponse, Response

from ...engine.async_engine import AsyncLLMEngine
from ...errors import LoRAAdapterNotFoundError, LoRAError
from ...lora.request import LoRARequest
from .errors import error_response
from .protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

OWNED_BY = "loraplex"


class ServingModels:
    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        inner = engine.engine
        self.served_model_name: str = inner.served_model_name
        self.model_path = inner.args.model or str(inner.model_path)
        self.base_names = {self.served_model_name, self.model_path, str(inner.model_path)}
        self._created = int(time.time())
        self._admin = asyncio.Lock()  # one load or unload at a time: name checks stay consistent

    @property
    def lora_enabled(self) -> bool:
        return self.engine.engine.lora_catalog is not None

    def adapters(self) -> dict[str, LoRARequest]:
        """The adapters added so far, by name (a snapshot)."""
        catalog = self.engine.engine.lora_catalog
        return {} if catalog is None else catalog.list_adapters()

    async def lora_request_for(self, model: str | None) -> LoRARequest | None:
        """The adapter `model` names; None for the base model. LoRAAdapterNotFoundError (404) otherwise."""
        if model is None or model in self.base_names:
            return None
        if not self.lora_enabled:
            raise LoRAAdapterNotFoundError(
                f"The model `{model}` does not exist: this server serves {self.served_model_name!r} only "
                "(LoRA adapters are off; start it with --enable-lora to serve adapters)"
            )
        try:
            return await self.engine.resolve_lora(model)
        except LoRAAdapterNotFoundError as exc:
            raise LoRAAdapterNotFoundError(
                f"The model `{model}` does not exist: it is neither the base model {self.served_model_name!r} nor "
                f"a loaded adapter (GET /v1/models lists them). {exc}"
            ) from None

    def list_models(self) -> dict[str, Any]:
        """`GET /v1/models`: the base model, then every adapter (root = its path, parent = the base)."""
        max_model_len = self.engine.engine.max_model_len
        data = [self._card(self.served_model_name, self.model_path, None, max_model_len)]
        for name, request in sorted(self.adapters().items()):
            data.append(self._card(name, request.lora_path, request.base_model_name or self.served_model_name, None))
        return {"object": "list", "data": data}

    def _card(self, model_id: str, root: str, parent: str | None, max_model_len: int | None) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": self._created, "owned_by": OWNED_BY, "root": root,
                "parent": parent, "max_model_len": max_model_len, "permission": []}

    # ---- runtime adapter management (VLLM_ALLOW_RUNTIME_LORA_UPDATING) -------------------------

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> Response:
        refused = load_request_problem(body, self.base_names)
        if refused is not None:
            return refused
        name = body.lora_name
        async with self._admin:
            known = self.adapters().get(name)
            if known is not None and not body.load_inplace:
                return already_loaded(name)
            if not self.lora_enabled:
                return error_response(HTTPStatus.BAD_REQUEST, "LoRA adapters are off on this server; start it with "
                                      "--enable-lora to load adapters", "lora_name")
            request = self.engine.engine.lora_catalog.request_for(name, body.lora_path, load_inplace=body.load_inplace)
            # an in-place reload answers once the new weights serve
            await self.engine.add_lora(request)  # errors: 404 no such adapter, 400 invalid (see errors.STATUS_OF)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> Response:
        if not body.lora_name and body.lora_int_id is None:
            return error_response(HTTPStatus.BAD_REQUEST, "'lora_name' must be provided.", "lora_name")
        async with self._admin:
            adapters = self.adapters()
            name = body.lora_name or next((n for n, r in adapters.items() if r.lora_int_id == body.lora_int_id), None)
            if name is None or name not in adapters:
                return adapter_not_found(body)
            try:
                await self.engine.remove_lora(name)
            except LoRAError as exc:  # still in use: try again once its requests end
                return error_response(HTTPStatus.CONFLICT, str(exc), "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def load_request_problem(body: LoadLoRAAdapterRequest, base_names: set[str]) -> Response | None:
    """The 400 for a load request that cannot be right whatever is loaded; None if it may be."""
    if not body.lora_name or not body.lora_path:
        return error_response(HTTPStatus.BAD_REQUEST, "Both 'lora_name' and 'lora_path' must be provided.",
                              "lora_name" if not body.lora_name else "lora_path")
    if body.lora_name in base_names:
        return error_response(HTTPStatus.BAD_REQUEST, f"'{body.lora_name}' names the base model, so requests could "
                              "never reach an adapter by that name; choose another lora_name", "lora_name")
    return None


def already_loaded(name: str) -> Response:
    return error_response(HTTPStatus.BAD_REQUEST, f"The lora adapter '{name}' has already been loaded. If you want to "
                          "load the adapter in place, set 'load_inplace' to True.", "lora_name")


def adapter_not_found(body: UnloadLoRAAdapterRequest) -> Response:
    shown = body.lora_name if body.lora_name else f"with id {body.lora_int_id}"
    return error_response(HTTPStatus.NOT_FOUND, f"The lora adapter '{shown}' cannot be found.", "lora_name")


async def add_lora_modules(engine: AsyncLLMEngine, modules: list[dict[str, str]]) -> None:
    """Add the --lora-modules adapters (ids from the catalog), each checked now: a bad one stops the start."""
    catalog = engine.engine.lora_catalog  # on: --lora-modules turns LoRA on
    for module in modules:
        await engine.add_lora(catalog.request_for(module["name"], module["path"], module.get("base_model_name")))
