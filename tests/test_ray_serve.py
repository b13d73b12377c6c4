"""loraplex on Ray Serve: a local Ray instance (2 CPUs), a tiny Llama, two engine replicas.

Every answer through the Ray endpoint equals the single engine's for its adapter; with more
adapters than one replica holds, adapter-affine routing loads each adapter about once while
adapter-blind routing (the baseline) reloads them again and again; load / unload reach every
replica; a replica killed mid-request gives a retryable 503, and the deployment recovers. Ray
is shut down at the end and no Ray process is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from lora_helpers import make_adapter, quiet_peft  # noqa: E402
from loraplex.ray.options import serve_args_from_builder  # noqa: E402
from server_helpers import assert_error, free_port  # noqa: E402
from tiny_models import TINY_KV_BYTES, TINY_MAX_MODEL_LEN, load_hf, tiny  # noqa: E402,F401

pytestmark = pytest.mark.slow

SERVED = "tiny-llama"
ADAPTERS = ["a0", "a1", "a2", "a3"]  # twice what one replica holds (max_cpu_loras=2)
LATE = "late"  # loaded at run time
PROMPT = "The quick brown fox jumps over the lazy dog."
GREEDY = {"temperature": 0.0, "max_tokens": 6, "logprobs": 0, "ignore_eos": True, "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def adapter_paths(tiny, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ray_adapters")
    base = load_hf(tiny.path("llama"))
    with quiet_peft():
        return {name: str(make_adapter(base, root / name, seed=300 + i, r=4, lora_alpha=8, target_modules="all-linear"))
                for i, name in enumerate([*ADAPTERS, LATE])}


def builder_values(tiny, paths: dict[str, str], affinity: bool) -> dict[str, object]:
    """Ray Serve builder arguments, as `serve run loraplex.ray:app key=value ...` passes them."""
    return {
        "model": str(tiny.path("llama")), "served_model_name": SERVED, "dtype": "float32", "device": "cpu",
        "kv_cache_memory_bytes": str(TINY_KV_BYTES), "max_model_len": str(TINY_MAX_MODEL_LEN),
        "max_loras": "2", "max_cpu_loras": "2", "max_lora_rank": "8", "enable_lora": "true",
        "lora_modules": " ".join(f"{name}={paths[name]}" for name in ADAPTERS),
        "num_replicas": "2", "adapter_affinity": str(affinity).lower(), "disable_log_requests": "true",
    }


class RayDeployment:
    """Ray Serve on a local Ray instance, the loraplex application deployed, HTTP on 127.0.0.1."""

    def __init__(self) -> None:
        import ray
        from ray import serve

        self.port = free_port()
        ray.init(num_cpus=2, include_dashboard=False, namespace="loraplex-tests", log_to_driver=False,
                 configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=120.0)

    def deploy(self, values: dict[str, object]) -> None:
        from ray import serve

        from loraplex.ray import app

        serve.run(app(values), name="loraplex", route_prefix="/")
        self.wait_replicas(2)

    def replicas(self) -> list[dict]:
        response = self.http.get("/replicas")
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def wait_replicas(self, count: int, exclude_pids: set[int] = frozenset(), timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reports = [r for r in self.replicas() if r["pid"] not in exclude_pids]
            if len(reports) == count:
                return reports
            time.sleep(0.2)
        raise AssertionError(f"{count} replicas did not report within {timeout} s: {self.replicas()}")

    def completion(self, model: str, prompt: str = PROMPT) -> httpx.Response:
        return self.http.post("/v1/completions", json={"model": model, "prompt": prompt, **GREEDY})

    def close(self) -> None:
        import ray
        from ray import serve

        self.http.close()
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_serve(tiny, adapter_paths):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        deployment = RayDeployment()
        try:
            deployment.deploy(builder_values(tiny, adapter_paths, affinity=True))
            yield deployment
        finally:
            deployment.close()
    assert not _ray_processes(), f"Ray processes left behind: {_ray_processes()}"


def _ray_processes() -> list[str]:
    found = subprocess.run(["pgrep", "-af", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def token_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [int(t.split(":", 1)[1]) for t in response.json()["choices"][0]["logprobs"]["tokens"]]


@pytest.fixture(scope="module")
def single_engine_answers(tiny, adapter_paths) -> dict[str | None, list[int]]:
    """Each adapter's (and the base model's) greedy tokens on one local engine."""
    from lora_helpers import lora_llm

    from loraplex import LoRARequest, SamplingParams

    llm = lora_llm(tiny.path("llama"), max_loras=2, max_cpu_loras=5, max_lora_rank=8)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    names: list[str | None] = [None, *ADAPTERS, LATE]
    requests = [None if n is None else LoRARequest(n, i + 1, adapter_paths[n]) for i, n in enumerate(names)]
    outputs = llm.generate([PROMPT] * len(names), params, lora_request=requests)
    return {name: list(out.outputs[0].token_ids) for name, out in zip(names, outputs)}


def total_loads(deployment: RayDeployment) -> int:
    time.sleep(1.5)  # the replicas' next reports carry the last loads
    return sum(sum(r["adapter_loads"].values()) for r in deployment.replicas())


# ---- the builder's arguments ---------------------------------------------------------------------------


def test_builder_arguments_are_the_serve_flags(tmp_path):
    args = serve_args_from_builder({"model": "m", "num_replicas": "3", "enable_lora": "true", "max_cpu_loras": 4,
                                    "adapter_affinity": "false", "lora_modules": "x=/a y=/b"})
    assert (args.model, args.num_replicas, args.enable_lora, args.max_cpu_loras, args.adapter_affinity) == ("m", 3, True, 4, False)
    assert args.lora_modules == [{"name": "x", "path": "/a"}, {"name": "y", "path": "/b"}]
    from loraplex.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown loraplex.ray:app argument 'num_replica'"):
        serve_args_from_builder({"num_replica": "2"})
    with pytest.raises(ConfigError, match="--num-replicas must be at least 1"):
        serve_args_from_builder({"num_replicas": "0"})
    with pytest.raises(ConfigError, match="not a boolean"):
        serve_args_from_builder({"enable_lora": "maybe"})


# ---- one endpoint, many replicas -----------------------------------------------------------------------


def test_answers_equal_the_single_engine(ray_serve, single_engine_answers):
    import openai

    client = openai.OpenAI(base_url=f"{ray_serve.url}/v1", api_key="EMPTY", max_retries=0)
    try:
        for name in [None, *ADAPTERS]:
            model = name or SERVED
            assert token_ids(ray_serve.completion(model)) == single_engine_answers[name], model
            reply = client.completions.create(model=model, prompt=PROMPT, temperature=0.0, max_tokens=6,
                                              extra_body={"ignore_eos": True})
            assert reply.model == model and reply.choices[0].text
        # streamed through the ingress, event by event
        with client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True) as stream:
            kinds = {chunk.object for chunk in stream}
        assert kinds == {"chat.completion.chunk"}
    finally:
        client.close()
    cards = {card["id"]: card for card in ray_serve.http.get("/v1/models").json()["data"]}
    assert set(cards) == {SERVED, *ADAPTERS}
    assert all(cards[name]["parent"] == SERVED for name in ADAPTERS)
    assert_error(ray_serve.completion("no-such-adapter"), 404, "no-such-adapter")


def test_metrics_merge_every_replica(ray_serve):
    token_ids(ray_serve.completion("a0"))
    time.sleep(1.0)  # the next reports carry the request
    page = ray_serve.http.get("/metrics").text
    replicas = {r["replica"] for r in ray_serve.replicas()}
    for replica in replicas:
        assert f'replica="{replica}"' in page
    assert 'lora_name="a0"' in page and "# TYPE vllm:num_requests_running gauge" in page


def test_load_and_unload_reach_every_replica(ray_serve, adapter_paths, single_engine_answers):
    response = ray_serve.http.post("/v1/load_lora_adapter", json={"lora_name": LATE, "lora_path": adapter_paths[LATE]})
    assert response.status_code == 200 and "added successfully" in response.text, response.text
    assert token_ids(ray_serve.completion(LATE)) == single_engine_answers[LATE]
    assert LATE in {card["id"] for card in ray_serve.http.get("/v1/models").json()["data"]}
    again = ray_serve.http.post("/v1/load_lora_adapter", json={"lora_name": LATE, "lora_path": adapter_paths[LATE]})
    assert_error(again, 400, "already been loaded")
    bad = ray_serve.http.post("/v1/load_lora_adapter", json={"lora_name": "nope", "lora_path": "/no/such/dir"})
    assert bad.status_code in (400, 404), bad.text
    assert "nope" not in {card["id"] for card in ray_serve.http.get("/v1/models").json()["data"]}

    # every replica applied the load (the one that checked it, and the others, which read it on demand)
    reports = ray_serve.replicas()
    assert len(reports) == 2 and len({r["synced_version"] for r in reports}) == 1, reports

    response = ray_serve.http.post("/v1/unload_lora_adapter", json={"lora_name": LATE})
    assert response.status_code == 200 and "removed successfully" in response.text, response.text
    assert all(LATE not in r["held"] for r in ray_serve.replicas())
    assert_error(ray_serve.completion(LATE), 404, LATE)
    assert_error(ray_serve.http.post("/v1/unload_lora_adapter", json={"lora_name": LATE}), 404, LATE)


def test_killed_replica_gives_503_then_recovers(ray_serve):
    body = {"model": "a2", "prompt": "Hi", "max_tokens": TINY_MAX_MODEL_LEN - 8, "ignore_eos": True, "stream": True,
            "temperature": 0.0}
    with ray_serve.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: {")
        replica = response.headers["x-loraplex-replica"]
        victim = next(r["pid"] for r in ray_serve.replicas() if r["replica"] == replica)
        os.kill(victim, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert '"code":503' in rest[-2].replace(" ", ""), rest[-2]  # the stream ends with a retryable error
    # meanwhile: answers, or 503s with Retry-After; then the replacement replica serves
    for _ in range(6):
        response = ray_serve.completion("a2")
        if response.status_code != 200:
            error = assert_error(response, 503, "retry")
            assert response.headers["retry-after"] and error["type"] == "ServiceUnavailableError"
    replaced = ray_serve.wait_replicas(2, exclude_pids={victim})
    assert len(replaced) == 2
    for name in ADAPTERS:
        assert token_ids(ray_serve.completion(name))


# the last test: it redeploys with adapter-blind routing


def test_affine_routing_loads_each_adapter_about_once(ray_serve, tiny, adapter_paths):
    def loads_for_mix() -> int:
        before = total_loads(ray_serve)
        for _ in range(4):
            for name in ADAPTERS:
                token_ids(ray_serve.completion(name))
        return total_loads(ray_serve) - before

    affine = loads_for_mix()
    # the same requests again: every adapter is held by the replica its requests go to
    again = loads_for_mix()
    assert again <= 1, f"{again} adapter loads for adapters already held"
    ray_serve.deploy(builder_values(tiny, adapter_paths, affinity=False))  # the last test: no way back
    blind = loads_for_mix()
    print(f"adapter loads for 16 requests over {len(ADAPTERS)} adapters: affine {affine} then {again}, blind {blind}")
    assert affine <= len(ADAPTERS) + 2, f"affine routing: {affine} loads for {len(ADAPTERS)} adapters"
    assert blind > affine + again, f"adapter-blind routing: {blind} loads; affine: {affine} then {again}"
