"""What the Ray Serve tests share: the tiny model's builder arguments, Ray Serve's own `serve`
command, and the check that no Ray process is left behind."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tiny_models import TINY_KV_BYTES, TINY_MAX_MODEL_LEN

SERVED = "tiny-llama"
SERVE = str(Path(sys.executable).parent / "serve")  # Ray Serve's command line, installed with ray[serve]
# what Ray runs: its daemons (gcs_server, raylet, the dashboard and its agents, log monitor) and workers
_RAY_PROCESSES = "gcs_server|raylet|site-packages/ray/|ray::"


def tiny_builder_values(model: Path, **extra: object) -> dict[str, object]:
    """`loraplex.ray:app` arguments for the tiny Llama on CPU: two replicas, two adapters each."""
    return {
        "model": str(model), "served_model_name": SERVED, "dtype": "float32", "device": "cpu",
        "kv_cache_memory_bytes": str(TINY_KV_BYTES), "max_model_len": str(TINY_MAX_MODEL_LEN),
        "max_loras": "2", "max_cpu_loras": "2", "max_lora_rank": "8", "enable_lora": "true",
        "num_replicas": "2", "disable_log_requests": "true", **extra,
    }


def as_cli(values: dict[str, object]) -> list[str]:
    """Builder arguments as `serve run IMPORT_PATH key=value ...` writes them."""
    return [f"{key}={value}" for key, value in values.items()]


def ray_processes() -> list[str]:
    found = subprocess.run(["pgrep", "-af", _RAY_PROCESSES], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def assert_no_ray_process_left(timeout: float = 30.0) -> None:
    """Ray's daemons and workers exit within `timeout` s of its shutdown."""
    deadline = time.monotonic() + timeout
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), f"Ray processes left behind: {ray_processes()}"


class ServingCommand:
    """A command that serves HTTP until signalled (`serve run`, `loraplex serve --ray`), run as a
    user runs it: its own session, output in a log file; `stop(sig)` signals it and waits."""

    def __init__(self, command: list[str], url: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, path: str = "/v1/models", timeout: float = 180.0) -> None:
        """Until `path` answers 200 (the application deployed and a replica reporting)."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode} before serving:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url}{path} did not answer within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.5)

    def wait_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text(errors="replace"):
            assert self.process.poll() is None and time.monotonic() < deadline, f"no {text!r} in:\n{self.log()}"
            time.sleep(0.2)

    def stop(self, sig: int, timeout: float = 60.0) -> int:
        """Signal the command (the process alone) and wait for it to exit; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout:.0f} s after signal {sig}:\n{self.log()}") from None

    def kill(self) -> None:
        """Clean-up after a failure: the command and what it started in its session."""
        import os
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
