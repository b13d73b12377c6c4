"""loraplex on Ray Serve: a local Ray instance (2 CPUs), a tiny Llama, two engine replicas,
deployed by Ray Serve's own command (`serve run loraplex.ray:app model=... num_replicas=2 ...`).

Every answer through the Ray endpoint equals the single engine's for its adapter, the filesystem
resolver's adapters included; with more adapters than one replica holds, adapter-affine routing
loads each adapter about once while adapter-blind routing (the baseline) reloads them again and
again; load / unload reach every replica; a replica killed mid-request gives a retryable 503, and
the deployment recovers; adapters loaded at run time survive a restart of the AdapterRegistry and
reach replicas started after them. Ray is shut down at the end and no Ray process is left behind.
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
from ray_helpers import SERVE, SERVED, as_cli, assert_no_ray_process_left, tiny_builder_values  # noqa: E402
from server_helpers import assert_error, free_port  # noqa: E402
from tiny_models import TINY_MAX_MODEL_LEN, load_hf, tiny  # noqa: E402,F401

pytestmark = pytest.mark.slow

ADAPTERS = ["a0", "a1", "a2", "a3"]  # twice what one replica holds (max_cpu_loras=2)
LATE = "late"  # loaded at run time
FOUND = "found"  # known to the filesystem resolver only
PROMPT = "The quick brown fox jumps over the lazy dog."
GREEDY = {"temperature": 0.0, "max_tokens": 6, "logprobs": 0, "ignore_eos": True, "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def adapter_paths(tiny, tmp_path_factory) -> dict[str, str]:
    """ADAPTERS and LATE in one folder; FOUND alone in the filesystem resolver's tree."""
    root = tmp_path_factory.mktemp("ray_adapters")
    resolver_root = tmp_path_factory.mktemp("ray_resolver_root")
    base = load_hf(tiny.path("llama"))
    with quiet_peft():
        paths = {name: str(make_adapter(base, root / name, seed=300 + i, r=4, lora_alpha=8, target_modules="all-linear"))
                 for i, name in enumerate([*ADAPTERS, LATE])}
        paths[FOUND] = str(make_adapter(base, resolver_root / FOUND, seed=320, r=4, lora_alpha=8, target_modules="all-linear"))
    return paths


def builder_values(tiny, paths: dict[str, str], affinity: bool) -> dict[str, object]:
    return tiny_builder_values(tiny.path("llama"), lora_modules=" ".join(f"{name}={paths[name]}" for name in ADAPTERS),
                               adapter_affinity=str(affinity).lower())


class RayDeployment:
    """Ray Serve on a local Ray instance started here, HTTP on 127.0.0.1; the loraplex application
    deployed onto it by `serve run` in a subprocess, as an operator deploys onto a running cluster."""

    def __init__(self) -> None:
        import ray
        from ray import serve

        self.port = free_port()
        ray.init(num_cpus=2, include_dashboard=False, namespace="loraplex-tests", log_to_driver=False,
                 configure_logging=False)
        self.address = ray.get_runtime_context().gcs_address
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=120.0)

    def deploy(self, values: dict[str, object]) -> None:
        command = [SERVE, "run", "--non-blocking", "--address", self.address, "--name", "loraplex", "--route-prefix", "/",
                   "loraplex.ray:app", *as_cli(values)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-4000:]
        self.wait_replicas(2)

    def replicas(self) -> list[dict]:
        response = self.http.get("/replicas")
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def wait_replicas(self, count: int, exclude_pids: set[int] = frozenset(), timeout: float = 90.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.http.get("/replicas")
            reports = [r for r in response.json()["data"] if r["pid"] not in exclude_pids] if response.status_code == 200 else []
            if len(reports) == count:
                return reports
            time.sleep(0.2)
        raise AssertionError(f"{count} replicas did not report within {timeout} s: {self.http.get('/replicas').text}")

    def completion(self, model: str, prompt: str = PROMPT) -> httpx.Response:
        return self.http.post("/v1/completions", json={"model": model, "prompt": prompt, **GREEDY})

    def model_ids(self) -> set[str]:
        response = self.http.get("/v1/models")
        assert response.status_code == 200, response.text
        return {card["id"] for card in response.json()["data"]}

    def close(self) -> None:
        import ray
        from ray import serve

        self.http.close()
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_serve(tiny, adapter_paths):
    with pytest.MonkeyPatch.context() as patch:
        # read by the builder (in `serve run`) and handed to every replica
        patch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        patch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", os.path.dirname(adapter_paths[FOUND]))
        patch.delenv("VLLM_PLUGINS", raising=False)
        deployment = RayDeployment()
        try:
            deployment.deploy(builder_values(tiny, adapter_paths, affinity=True))
            yield deployment
        finally:
            deployment.close()
    assert_no_ray_process_left()


def token_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [int(t.split(":", 1)[1]) for t in response.json()["choices"][0]["logprobs"]["tokens"]]


@pytest.fixture(scope="module")
def single_engine_answers(tiny, adapter_paths) -> dict[str | None, list[int]]:
    """Each adapter's (and the base model's) greedy tokens on one local engine."""
    from lora_helpers import lora_llm

    from loraplex import LoRARequest, SamplingParams

    llm = lora_llm(tiny.path("llama"), max_loras=2, max_cpu_loras=6, max_lora_rank=8)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    names: list[str | None] = [None, *ADAPTERS, LATE, FOUND]
    requests = [None if n is None else LoRARequest(n, i + 1, adapter_paths[n]) for i, n in enumerate(names)]
    outputs = llm.generate([PROMPT] * len(names), params, lora_request=requests)
    return {name: list(out.outputs[0].token_ids) for name, out in zip(names, outputs)}


def total_loads(deployment: RayDeployment) -> int:
    """Adapter loads over the replicas, once their reports (every 0.5 s) carry the last ones."""
    def now() -> int:
        return sum(sum(r["adapter_loads"].values()) for r in deployment.replicas())

    last, deadline = None, time.monotonic() + 15
    while (current := now()) != last and time.monotonic() < deadline:
        last = current
        time.sleep(1.0)
    return current


def eventually(check, timeout: float = 15.0) -> None:
    """`check()` true within `timeout` s (what the replicas report reaches the ingress within a second or so)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {check.__doc__ or check}"
        time.sleep(0.2)


def pids_of(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def load(deployment: RayDeployment, name: str, path: str) -> None:
    response = deployment.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    assert response.status_code == 200 and "added successfully" in response.text, response.text


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
    time.sleep(1.5)  # a few reports later: a name nobody serves takes no place among those Serve routes here
    assert all("no-such-adapter" not in r["routed"] for r in ray_serve.replicas())


def test_resolvers_work_in_the_replicas(ray_serve, single_engine_answers):
    """An adapter unknown at start, found by the filesystem resolver (VLLM_LORA_RESOLVER_CACHE_DIR,
    handed to every replica); an unload through the ingress reaches it too."""
    assert FOUND not in ray_serve.model_ids()
    assert token_ids(ray_serve.completion(FOUND)) == single_engine_answers[FOUND]
    eventually(lambda: FOUND in ray_serve.model_ids())  # the next reports carry what the replica resolved

    response = ray_serve.http.post("/v1/unload_lora_adapter", json={"lora_name": FOUND})
    assert response.status_code == 200 and "removed successfully" in response.text, response.text
    assert FOUND not in ray_serve.model_ids()
    assert all(FOUND not in r["held"] for r in ray_serve.replicas())
    # as on one server, a later request finds it again
    assert token_ids(ray_serve.completion(FOUND)) == single_engine_answers[FOUND]


def test_metrics_merge_every_replica(ray_serve):
    token_ids(ray_serve.completion("a0"))
    eventually(lambda: 'lora_name="a0"' in ray_serve.http.get("/metrics").text)  # the next reports carry it
    page = ray_serve.http.get("/metrics").text
    replicas = {r["replica"] for r in ray_serve.replicas()}
    assert len(replicas) == 2
    for replica in replicas:
        assert f'replica="{replica}"' in page
    assert "# TYPE vllm:num_requests_running gauge" in page


def test_load_and_unload_reach_every_replica(ray_serve, adapter_paths, single_engine_answers):
    load(ray_serve, LATE, adapter_paths[LATE])
    assert token_ids(ray_serve.completion(LATE)) == single_engine_answers[LATE]
    assert LATE in ray_serve.model_ids()
    # reloaded in place with other weights: the replica holding it serves them
    response = ray_serve.http.post("/v1/load_lora_adapter",
                                   json={"lora_name": LATE, "lora_path": adapter_paths["a3"], "load_inplace": True})
    assert response.status_code == 200, response.text
    assert token_ids(ray_serve.completion(LATE)) == single_engine_answers["a3"]
    again = ray_serve.http.post("/v1/load_lora_adapter", json={"lora_name": LATE, "lora_path": adapter_paths[LATE]})
    assert_error(again, 400, "already been loaded")
    bad = ray_serve.http.post("/v1/load_lora_adapter", json={"lora_name": "nope", "lora_path": "/no/such/dir"})
    assert bad.status_code in (400, 404), bad.text
    assert "nope" not in ray_serve.model_ids()

    # every replica applied the load (the one that checked it, and the others, which read it on demand)
    reports = ray_serve.replicas()
    assert len(reports) == 2 and len({r["synced_version"] for r in reports}) == 1, reports

    # by name, as vLLM: an id beside it is accepted; an id alone names nothing deployment-wide
    alone = ray_serve.http.post("/v1/unload_lora_adapter", json={"lora_int_id": 1})
    assert_error(alone, 400, "lora_name", "lora_int_id")
    response = ray_serve.http.post("/v1/unload_lora_adapter", json={"lora_name": LATE, "lora_int_id": 12345})
    assert response.status_code == 200 and "removed successfully" in response.text, response.text
    assert all(LATE not in r["held"] and LATE not in r["routed"] for r in ray_serve.replicas())
    assert LATE not in ray_serve.model_ids()
    assert_error(ray_serve.completion(LATE), 404, LATE)
    assert_error(ray_serve.http.post("/v1/unload_lora_adapter", json={"lora_name": LATE}), 404, LATE)


def test_killed_replicas_give_503s_then_replacements_serve_what_was_loaded(ray_serve, adapter_paths,
                                                                          single_engine_answers):
    """A replica killed mid-stream: the stream ends with a retryable 503, later requests succeed.
    The other one killed too: the replacements, started after LATE was loaded, serve it."""
    load(ray_serve, LATE, adapter_paths[LATE])
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
    # meanwhile: answers, or 503s with Retry-After
    for _ in range(4):
        response = ray_serve.completion("a2")
        if response.status_code != 200:
            error = assert_error(response, 503, "retry")
            assert response.headers["retry-after"] and error["type"] == "ServiceUnavailableError"
    killed = {victim, *(r["pid"] for r in ray_serve.replicas())}
    for pid in killed - {victim}:
        os.kill(pid, signal.SIGKILL)
    ray_serve.wait_replicas(2, exclude_pids=killed)
    for name in ADAPTERS:
        assert token_ids(ray_serve.completion(name)) == single_engine_answers[name]
    assert token_ids(ray_serve.completion(LATE)) == single_engine_answers[LATE]
    assert LATE in ray_serve.model_ids()


def test_a_restarted_registry_learns_runtime_adapters_back(ray_serve, adapter_paths):
    """The AdapterRegistry killed: its replacement knows only --lora-modules, and takes LATE (loaded
    at run time) back from the replicas' reports; unloading it still works."""
    if LATE not in ray_serve.model_ids():
        load(ray_serve, LATE, adapter_paths[LATE])
    [registry] = pids_of("ServeReplica:loraplex:AdapterRegistry")
    os.kill(registry, signal.SIGKILL)
    assert token_ids(ray_serve.completion("a0"))  # completions go on meanwhile
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if pids_of("ServeReplica:loraplex:AdapterRegistry") not in ([], [registry]):
            response = ray_serve.http.get("/v1/models")
            if response.status_code == 200 and LATE in {card["id"] for card in response.json()["data"]}:
                break
            assert response.status_code in (200, 503), response.text
        time.sleep(0.2)
    else:
        raise AssertionError(f"the restarted registry does not list {LATE!r}: {ray_serve.http.get('/v1/models').text}")
    response = ray_serve.http.post("/v1/unload_lora_adapter", json={"lora_name": LATE})
    assert response.status_code == 200 and "removed successfully" in response.text, response.text
    assert_error(ray_serve.completion(LATE), 404, LATE)


# the last test: it redeploys with adapter-blind routing


def test_affine_routing_loads_each_adapter_about_once(ray_serve, tiny, adapter_paths, single_engine_answers):
    """16 requests cycling over 4 adapters, 2 replicas holding 2 each: with affinity each adapter
    settles on one replica and is not loaded again; adapter-blind routing keeps reloading."""
    def loads_for_mix() -> int:
        before = total_loads(ray_serve)
        for _ in range(4):
            for name in ADAPTERS:
                token_ids(ray_serve.completion(name))
        return total_loads(ray_serve) - before

    affine = loads_for_mix()  # from what the tests before left: each adapter placed on one replica
    again = loads_for_mix()  # placed: every request goes to the replica that holds its adapter
    reports = ray_serve.replicas()
    # what Serve routes to a replica is what its CPU cache holds
    assert all(sorted(r["routed"]) == sorted(r["held"]) for r in reports), reports
    ray_serve.deploy(builder_values(tiny, adapter_paths, affinity=False))  # the last test: no way back
    blind = loads_for_mix()
    blind_again = loads_for_mix()
    print(f"adapter loads for 16 requests over {len(ADAPTERS)} adapters: affine {affine} then {again}, "
          f"blind {blind} then {blind_again}")
    assert again <= 1, f"{again} adapter loads for adapters already held; the replicas: {reports}"
    assert blind_again >= 4, f"adapter-blind routing: {blind_again} loads, as if it were adapter-affine"
    assert affine + again < blind + blind_again

    # spread over both replicas, each one's resolvers find the adapter
    answered_by = set()
    for _ in range(24):
        response = ray_serve.completion(FOUND)
        assert token_ids(response) == single_engine_answers[FOUND]
        answered_by.add(response.headers["x-loraplex-replica"])
        if len(answered_by) == 2:
            break
    assert len(answered_by) == 2, answered_by
