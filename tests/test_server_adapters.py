"""Adapters over HTTP with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: /v1/load_lora_adapter and
/v1/unload_lora_adapter (success, in-place reload, every error with its status and message),
adapters found by the filesystem resolver, and 32 concurrent clients over several adapters while
another client loads and unloads an adapter in a loop.

One real server for the module (a tiny Llama, 2 device slots for 3 started adapters plus the base
model), driven with `httpx` and the official `openai` client; PEFT is the oracle.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from lora_helpers import TinyAdapters, make_adapter
from loraplex import AsyncLLMEngine, EngineArgs
from loraplex.entrypoints.openai.api_server import build_app
from loraplex.entrypoints.openai.serving_models import add_lora_modules
from loraplex.resolver import LoRAResolverRegistry
from server_helpers import ServerThread, assert_error
from tiny_models import TINY_KV_BYTES, TINY_MAX_MODEL_LEN, load_hf, tiny  # noqa: F401

SERVED = "tiny-llama"
STARTED = ["a1", "a2", "a3"]  # --lora-modules
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello, my name is", "def add(a, b):", "In 1889 the tower"]
TOKENS = 6
GREEDY = {"temperature": 0.0, "max_tokens": TOKENS, "logprobs": 0}
AS_IDS = {"ignore_eos": True, "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> TinyAdapters:
    names = [*STARTED, "x", "y", "churn", "fs"]
    return TinyAdapters(tiny.path("llama"), tmp_path_factory.mktemp("server_adapters"), names)


@pytest.fixture(scope="module")
def resolver_root(adapters, tiny, tmp_path_factory):
    """The filesystem resolver's tree: `fs-adapter` (good), `too-big` (rank 16 > max_lora_rank 8),
    and a good adapter just outside the tree (`../outside`)."""
    top = tmp_path_factory.mktemp("resolver")
    root = top / "loras"
    shutil.copytree(adapters.paths["fs"], root / "fs-adapter")
    shutil.copytree(adapters.paths["x"], top / "outside")
    make_adapter(load_hf(tiny.path("llama")), root / "too-big", seed=9, r=16, lora_alpha=16, target_modules=["q_proj"])
    return root


@pytest.fixture(scope="module")
def server(tiny, adapters, resolver_root):
    from loraplex_resolver_filesystem import RESOLVER_NAME, FilesystemResolver

    import loraplex.plugins

    saved = LoRAResolverRegistry._snapshot()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        patch.setattr(loraplex.plugins, "load_plugins", lambda *args, **kwargs: [])  # only the resolver below
        LoRAResolverRegistry.clear()
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, FilesystemResolver(resolver_root))
        engine = AsyncLLMEngine.from_engine_args(EngineArgs(
            model=str(tiny.path("llama")), served_model_name=SERVED, dtype="float32", device="cpu",
            kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=TINY_MAX_MODEL_LEN,
            enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=8,
        ))
        asyncio.run(add_lora_modules(engine, [{"name": n, "path": str(adapters.paths[n])} for n in STARTED]))
        running = ServerThread(build_app(engine))
        yield running
        running.stop()
        engine.shutdown()
    LoRAResolverRegistry._restore(saved)


def token_ids(tokens: list[str]) -> list[int]:
    return [int(t.split(":", 1)[1]) for t in tokens]


def served_tokens(server, model: str, prompt: str) -> list[int]:
    response = server.http.post("/v1/completions", json={"model": model, "prompt": prompt, **GREEDY, **AS_IDS})
    assert response.status_code == 200, response.text
    return token_ids(response.json()["choices"][0]["logprobs"]["tokens"])


def peft_greedy(adapters: TinyAdapters, name: str | None, prompt_ids: list[int], n: int = TOKENS) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(adapters.oracle.logprobs(name, ids)[-1].argmax()))
    return ids[len(prompt_ids):]


def model_cards(server) -> dict[str, dict]:
    return {card["id"]: card for card in server.http.get("/v1/models").json()["data"]}


def load(server, **body):
    return server.http.post("/v1/load_lora_adapter", json=body)


def unload(server, **body):
    return server.http.post("/v1/unload_lora_adapter", json=body)


def assert_serving(server) -> None:
    """The server still answers a good request."""
    assert served_tokens(server, "a1", PROMPTS[1])


# ---- load, serve, unload ----------------------------------------------------------------------------------


def test_load_serve_and_unload(server, adapters, tiny) -> None:
    prompt_ids = server.http.post("/tokenize", json={"prompt": PROMPTS[0]}).json()["tokens"]
    response = load(server, lora_name="x", lora_path=str(adapters.paths["x"]))
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'x' added successfully."
    card = model_cards(server)["x"]
    assert card["root"] == str(adapters.paths["x"]) and card["parent"] == SERVED
    assert served_tokens(server, "x", PROMPTS[0]) == peft_greedy(adapters, "x", prompt_ids)
    assert served_tokens(server, "x", PROMPTS[0]) != peft_greedy(adapters, None, prompt_ids)  # the adapter matters

    response = unload(server, lora_name="x")
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'x' removed successfully."
    assert "x" not in model_cards(server)
    assert_error(server.http.post("/v1/completions", json={"model": "x", "prompt": "hi"}), 404, "`x` does not exist")
    assert_error(unload(server, lora_name="x"), 404, "The lora adapter 'x' cannot be found.")


def test_unload_by_id_and_ids_stay_unique(server, adapters) -> None:
    for name in ("x", "y"):
        assert load(server, lora_name=name, lora_path=str(adapters.paths[name])).status_code == 200
    added = asyncio.run(server.app.state.engine.list_adapters())
    ids = [request.lora_int_id for request in added.values()]
    assert len(added) == len(STARTED) + 2 and len(set(ids)) == len(ids)
    assert added["y"].lora_int_id == max(ids)
    response = unload(server, lora_int_id=max(ids))
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'y' removed successfully."
    assert unload(server, lora_name="x").status_code == 200


def test_load_inplace_serves_the_new_weights(server, adapters) -> None:
    prompt_ids = server.http.post("/tokenize", json={"prompt": PROMPTS[2]}).json()["tokens"]
    assert load(server, lora_name="swap", lora_path=str(adapters.paths["x"])).status_code == 200
    try:
        assert served_tokens(server, "swap", PROMPTS[2]) == peft_greedy(adapters, "x", prompt_ids)
        # the same name again, without load_inplace: refused, as vLLM does
        assert_error(load(server, lora_name="swap", lora_path=str(adapters.paths["y"])), 400,
                     "The lora adapter 'swap' has already been loaded. If you want to load the adapter in place, "
                     "set 'load_inplace' to True.")
        assert served_tokens(server, "swap", PROMPTS[2]) == peft_greedy(adapters, "x", prompt_ids)
        response = load(server, lora_name="swap", lora_path=str(adapters.paths["y"]), load_inplace=True)
        assert response.status_code == 200 and response.text == "Success: LoRA adapter 'swap' added successfully."
        assert peft_greedy(adapters, "y", prompt_ids) != peft_greedy(adapters, "x", prompt_ids)
        assert served_tokens(server, "swap", PROMPTS[2]) == peft_greedy(adapters, "y", prompt_ids)
        assert model_cards(server)["swap"]["root"] == str(adapters.paths["y"])
    finally:
        assert unload(server, lora_name="swap").status_code == 200


LOAD_ERRORS = [
    # (id, body (paths: a key of `paths` below), status, message fragments)
    ("no fields", {}, 400, ["Both 'lora_name' and 'lora_path' must be provided."]),
    ("no path", {"lora_name": "z"}, 400, ["Both 'lora_name' and 'lora_path' must be provided."]),
    ("no name", {"lora_path": "good"}, 400, ["Both 'lora_name' and 'lora_path' must be provided."]),
    ("empty name", {"lora_name": "", "lora_path": "good"}, 400, ["must be provided"]),
    ("wrong types", {"lora_name": 5, "lora_path": ["x"]}, 400, ["lora_name", "lora_path"]),
    ("missing directory", {"lora_name": "z", "lora_path": "missing"}, 404, ["'z'", "is not a directory"]),
    ("a file", {"lora_name": "z", "lora_path": "file"}, 404, ["'z'", "is not a directory"]),
    ("no adapter_config.json", {"lora_name": "z", "lora_path": "empty"}, 404, ["adapter_config.json"]),
    ("rank above max_lora_rank", {"lora_name": "z", "lora_path": "too-big"}, 400, ["'z'", "max_lora_rank"]),
    ("a started adapter's name", {"lora_name": "a1", "lora_path": "good"}, 400, ["'a1' has already been loaded"]),
    ("the base model's name", {"lora_name": SERVED, "lora_path": "good"}, 400, [f"'{SERVED}' names the base model"]),
]


@pytest.mark.parametrize(("body", "status", "fragments"), [case[1:] for case in LOAD_ERRORS], ids=[c[0] for c in LOAD_ERRORS])
def test_load_errors(server, adapters, resolver_root, tmp_path, body, status, fragments) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not an adapter")
    paths = {"good": adapters.paths["x"], "missing": tmp_path / "nowhere", "file": tmp_path / "file",
             "empty": tmp_path / "empty", "too-big": resolver_root / "too-big"}
    if isinstance(body.get("lora_path"), str):
        body = {**body, "lora_path": str(paths[body["lora_path"]])}
    assert_error(load(server, **body), status, *fragments)
    assert set(model_cards(server)) == {SERVED, *STARTED}
    assert_serving(server)


def test_unload_errors(server) -> None:
    assert_error(unload(server), 400, "'lora_name' must be provided.")
    assert_error(unload(server, lora_name="never-loaded"), 404, "The lora adapter 'never-loaded' cannot be found.")
    assert_error(unload(server, lora_int_id=10**6), 404, "cannot be found")
    assert_error(unload(server, lora_name=["a1"]), 400, "lora_name")
    assert set(model_cards(server)) == {SERVED, *STARTED}
    assert_serving(server)


# ---- the resolvers ------------------------------------------------------------------------------------------


def test_a_resolver_serves_an_unknown_name(server, adapters, resolver_root) -> None:
    prompt_ids = server.http.post("/tokenize", json={"prompt": PROMPTS[3]}).json()["tokens"]
    assert "fs-adapter" not in model_cards(server)
    assert served_tokens(server, "fs-adapter", PROMPTS[3]) == peft_greedy(adapters, "fs", prompt_ids)
    card = model_cards(server)["fs-adapter"]
    assert card["root"] == str((resolver_root / "fs-adapter").resolve()) and card["parent"] == SERVED
    response = server.http.post("/v1/chat/completions", json={"model": "fs-adapter", "max_tokens": 2,
                                                              "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.json()["model"] == "fs-adapter"
    assert unload(server, lora_name="fs-adapter").status_code == 200


@pytest.mark.parametrize("model", ["nope", "../outside", "loras/../../outside", "/abs", "org/repo", "fs-adapter/.."])
def test_names_no_resolver_serves_are_404(server, resolver_root, model: str) -> None:
    if model == "/abs":
        model = str(resolver_root / "fs-adapter")  # a real adapter's absolute path: still not a name
    error = assert_error(server.http.post("/v1/completions", json={"model": model, "prompt": "hi"}), 404,
                         f"`{model}` does not exist")
    if model == "nope":
        assert "lora_filesystem_resolver" in error["message"]
    assert set(model_cards(server)) >= {SERVED, *STARTED} and model not in model_cards(server)
    assert_serving(server)


def test_an_invalid_adapter_a_resolver_finds_is_400(server) -> None:
    assert_error(server.http.post("/v1/completions", json={"model": "too-big", "prompt": "hi"}), 400,
                 "'too-big'", "max_lora_rank")
    assert "too-big" not in model_cards(server)
    assert_serving(server)


# ---- concurrency --------------------------------------------------------------------------------------------


def test_concurrent_clients_get_their_adapters_answers_while_another_loads_and_unloads(server, adapters) -> None:
    lanes = [SERVED, *STARTED]
    work = [(lanes[i % len(lanes)], PROMPTS[(i // len(lanes)) % len(PROMPTS)], i % 2 == 1) for i in range(32)]
    expected = {(model, prompt): served_tokens(server, model, prompt) for model, prompt, _ in work}
    for lane in STARTED:  # the adapters change the answers, so a mix-up would show
        assert expected[(lane, PROMPTS[0])] != expected[(SERVED, PROMPTS[0])]

    async def ask(client, model: str, prompt: str, stream: bool) -> list[int]:
        if not stream:
            out = await client.completions.create(model=model, prompt=prompt, extra_body=AS_IDS, **GREEDY)
            return token_ids(out.choices[0].logprobs.tokens)
        tokens = []
        async for chunk in await client.completions.create(model=model, prompt=prompt, stream=True, extra_body=AS_IDS,
                                                           **GREEDY):
            tokens += [t for c in chunk.choices for t in c.logprobs.tokens]
        return token_ids(tokens)

    async def churn(http, done: asyncio.Event) -> int:
        cycles = 0
        while not done.is_set() or cycles == 0:
            response = await http.post("/v1/load_lora_adapter", json={"lora_name": "churn",
                                                                       "lora_path": str(adapters.paths["churn"])})
            assert response.status_code == 200, response.text
            response = await http.post("/v1/unload_lora_adapter", json={"lora_name": "churn"})
            assert response.status_code == 200, response.text
            cycles += 1
        return cycles

    async def main() -> tuple[list[list[int]], int]:
        import httpx

        client = server.async_client()
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            done = asyncio.Event()
            loader = asyncio.ensure_future(churn(http, done))
            try:
                answers = await asyncio.gather(*(ask(client, *item) for item in work))
            finally:
                done.set()
            cycles = await loader
        await client.close()
        return answers, cycles

    answers, cycles = asyncio.run(main())
    for (model, prompt, stream), answer in zip(work, answers):
        assert answer == expected[(model, prompt)], f"{model!r} on {prompt!r} (stream={stream}) differs"
    assert cycles >= 1
    assert "churn" not in model_cards(server)
