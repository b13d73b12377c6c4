"""Starting loraplex on Ray Serve the ways an operator does, each on its own local Ray instance:
Ray Serve's `serve run` on a config file made from examples/ray-serve.yaml, and `loraplex serve
--ray`; both answer, stop on a signal and leave no Ray process behind. A bad --lora-modules entry
is refused where the application is built, naming the entry, before any replica (or Ray) starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

import yaml  # noqa: E402  (Ray Serve's config format; installed with it)

from lora_helpers import make_adapter, quiet_peft  # noqa: E402
from loraplex.errors import ConfigError  # noqa: E402
from loraplex.ray.options import serve_args_from_builder  # noqa: E402
from ray_helpers import (  # noqa: E402
    SERVE,
    SERVED,
    ServingCommand,
    as_cli,
    assert_no_ray_process_left,
    ray_processes,
    tiny_builder_values,
)
from server_helpers import free_port  # noqa: E402
from tiny_models import load_hf, tiny  # noqa: E402,F401

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray-serve.yaml"
DEMO_ADAPTERS = EXAMPLE.parent / "adapters" / "SmolLM2-135M-Instruct"
# a local Ray instance of each command's own; no plugins; runtime loading only where a config turns it on
LOCAL_ONLY = {"RAY_ADDRESS": None, "VLLM_PLUGINS": "", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": None}


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    with quiet_peft():
        return make_adapter(load_hf(tiny.path("llama")), tmp_path_factory.mktemp("ray_tools") / "a", seed=41, r=4,
                            lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module", autouse=True)
def no_ray_before_or_after():
    assert not ray_processes(), f"a Ray instance is already running: {ray_processes()}"
    yield
    assert_no_ray_process_left()


def environment() -> dict[str, str]:
    """This process's environment without what would change the commands' behaviour (LOCAL_ONLY)."""
    env = {key: value for key, value in os.environ.items() if key not in LOCAL_ONLY}
    env.update({key: value for key, value in LOCAL_ONLY.items() if value is not None})
    return env


def completion(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120.0,
                      json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True})


def wait_replicas(url: str, count: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while len(httpx.get(f"{url}/replicas").json()["data"]) != count:
        assert time.monotonic() < deadline, f"{count} replicas did not report: {httpx.get(f'{url}/replicas').text}"
        time.sleep(0.5)


# ---- the example config ------------------------------------------------------------------------------


def test_the_example_is_a_serve_config_whose_args_the_builder_takes(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(EXAMPLE.read_text()))
    [application] = config.applications
    assert application.import_path == "loraplex.ray:app"
    args = serve_args_from_builder(application.args)
    assert args.num_replicas > 1 and args.enable_lora and len(args.lora_modules) == 2

    from loraplex.ray import app

    # its adapter paths are the operator's; with the demo adapters in their place it builds
    demo = {**application.args, "lora_modules": [f"sql={DEMO_ADAPTERS / 'sql'}", f"json={DEMO_ADAPTERS / 'json-extract'}"]}
    assert app(demo) is not None
    with pytest.raises(ConfigError, match="entry 'sql=/mnt/adapters/sql' is refused: '/mnt/adapters/sql' does not exist"):
        app(application.args)


@pytest.mark.parametrize("entry, reason", [
    ("x=/no/such/dir", "does not exist or is not a directory"),
    ("x={notadapter}", "peft_type is 'IA3', only LORA adapters are served"),
    ("x={empty}", "has no adapter weights"),
    (" x={adapter}", "surrounding whitespace"),
    (f"{SERVED}={{adapter}}", "is the base model's"),
])
def test_bad_lora_modules_are_refused_when_the_application_is_built(tiny, adapter, tmp_path, entry, reason):
    from loraplex.ray import app

    (tmp_path / "notadapter").mkdir()
    (tmp_path / "notadapter" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    (tmp_path / "notadapter" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    entry = entry.format(adapter=adapter, notadapter=tmp_path / "notadapter", empty=tmp_path / "empty")
    with pytest.raises(ConfigError, match="lora_modules") as refused:
        app(tiny_builder_values(tiny.path("llama"), lora_modules=[f"ok={adapter}", entry]))
    assert f"entry '{entry}' is refused" in str(refused.value) and reason in str(refused.value)
    with pytest.raises(ConfigError, match="already given to"):
        app(tiny_builder_values(tiny.path("llama"), lora_modules=f"x={adapter} x={tmp_path / 'other'}"))


def test_both_commands_refuse_a_bad_adapter_before_ray_starts(tiny):
    import ray

    from loraplex.cli import build_parser
    from loraplex.ray.application import run_on_local_ray

    bad = "x=/no/such/dir"
    command = [SERVE, "run", "loraplex.ray:app", *as_cli(tiny_builder_values(tiny.path("llama"), lora_modules=bad))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment())
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"entry '{bad}' is refused" in output, output[-3000:]
    assert "Started a local Ray instance" not in output

    args = build_parser().parse_args(["serve", str(tiny.path("llama")), "--ray", "--lora-modules", bad])
    with pytest.raises(ConfigError, match=f"entry '{bad}' is refused"):  # `loraplex serve` prints it, exits 2
        run_on_local_ray(args)
    assert not ray.is_initialized() and not ray_processes()


# ---- serving, then stopping ----------------------------------------------------------------------------


def test_serve_run_on_the_example_config(tiny, adapter, tmp_path):
    """`serve run CONFIG` (Ray Serve's own command; it starts Ray here), the example adapted to the
    tiny model on CPU; Ctrl-C stops Serve and Ray."""
    config = yaml.safe_load(EXAMPLE.read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    [application] = config["applications"]
    application["route_prefix"] = "/llm"  # the OpenAI routes below it
    values = tiny_builder_values(tiny.path("llama"), lora_modules=[f"a={adapter}"], num_gpus_per_replica=0,
                                 num_cpus_per_replica=1)
    application["args"] = dict(values)
    path = tmp_path / "ray-serve.yaml"
    path.write_text(yaml.safe_dump(config))

    run = ServingCommand([SERVE, "run", str(path)], f"http://127.0.0.1:{port}/llm", tmp_path / "serve-run.log",
                         env=environment())
    try:
        run.wait_ready()
        assert completion(run.url, "a").status_code == 200 and completion(run.url, SERVED).status_code == 200
        # the config's runtime_env reached the replicas: runtime loading is on
        loaded = httpx.post(f"{run.url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapter)})
        assert loaded.status_code == 200, loaded.text
        wait_replicas(run.url, 2)
        run.stop(signal.SIGINT)
    finally:
        run.kill()
    assert_no_ray_process_left()


def test_loraplex_serve_ray_starts_answers_and_stops(tiny, adapter, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "loraplex.cli", "serve", str(tiny.path("llama")), "--ray", "--num-replicas", "2",
               "--port", str(port)]
    values = tiny_builder_values(tiny.path("llama"))
    for key in ("served_model_name", "dtype", "device", "kv_cache_memory_bytes", "max_model_len", "max_loras",
                "max_cpu_loras", "max_lora_rank"):
        command += [f"--{key.replace('_', '-')}", str(values[key])]
    command += ["--lora-modules", f"a={adapter}", "--disable-log-requests"]
    serving = ServingCommand(command, f"http://127.0.0.1:{port}", tmp_path / "loraplex-serve.log", env=environment())
    try:
        serving.wait_ready()
        assert completion(serving.url, "a").status_code == 200 and completion(serving.url, SERVED).status_code == 200
        wait_replicas(serving.url, 2)
        serving.wait_log("loraplex serve --ray: listening on")
        assert serving.stop(signal.SIGTERM) == 0, serving.log()
    finally:
        serving.kill()
    assert "loraplex serve --ray: stopped" in serving.log()
    assert_no_ray_process_left()
