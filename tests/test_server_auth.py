"""`--api-key`: every /v1 route, /tokenize and /detokenize need `Authorization: Bearer <key>`;
/health, /version and /metrics stay open. A real server on 127.0.0.1 with a key, on a tiny Llama."""

from __future__ import annotations

import httpx
import openai
import pytest

from loraplex import AsyncLLMEngine, EngineArgs
from loraplex.entrypoints.openai.api_server import build_app
from server_helpers import ServerThread, assert_error
from tiny_models import TINY_KV_BYTES, TINY_MAX_MODEL_LEN, tiny  # noqa: F401

KEY = "sk-loraplex-test-key"


@pytest.fixture(scope="module")
def server(tiny):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")  # the admin routes exist, behind the key
        engine = AsyncLLMEngine.from_engine_args(EngineArgs(
            model=str(tiny.path("llama")), served_model_name="tiny", dtype="float32", device="cpu",
            kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=TINY_MAX_MODEL_LEN, enable_lora=True,
        ))
        running = ServerThread(build_app(engine, api_key=KEY), api_key=KEY)
    yield running
    running.stop()
    engine.shutdown()


@pytest.fixture
def anonymous(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


PROTECTED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1]}),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
    ("GET", "/v1/no-such-route", None),
]
WRONG = {
    "missing": {},
    "wrong key": {"Authorization": "Bearer sk-wrong"},
    "key with a suffix": {"Authorization": f"Bearer {KEY}x"},
    "key prefix only": {"Authorization": f"Bearer {KEY[:-1]}"},
    "other scheme": {"Authorization": f"Basic {KEY}"},
    "bare key": {"Authorization": KEY},
}


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
@pytest.mark.parametrize("headers", list(WRONG.values()), ids=list(WRONG))
def test_protected_routes_refuse_a_missing_or_wrong_key(server, anonymous, method, path, body, headers) -> None:
    response = anonymous.request(method, path, json=body, headers=headers)
    error = assert_error(response, 401, "API key")
    assert error["type"] == "AuthenticationError"
    assert response.headers["www-authenticate"] == "Bearer"
    assert server.http.get("/v1/models").status_code == 200  # the right key still works


def test_the_right_key_is_served(server, anonymous) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0.0)
    assert out.usage.completion_tokens == 3
    headers = {"Authorization": f"bearer {KEY}"}  # the scheme is case-insensitive
    assert anonymous.post("/tokenize", json={"prompt": "hi"}, headers=headers).status_code == 200
    assert_error(anonymous.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"},
                                headers=headers), 404, "is not a directory")


def test_the_openai_client_with_a_wrong_key_gets_an_authentication_error(server) -> None:
    with pytest.raises(openai.AuthenticationError) as exc:
        server.client(api_key="sk-wrong").models.list()
    assert exc.value.status_code == 401 and "API key" in exc.value.message


@pytest.mark.parametrize("path", ["/health", "/version", "/metrics"])
def test_health_version_and_metrics_need_no_key(anonymous, path: str) -> None:
    assert anonymous.get(path).status_code == 200
