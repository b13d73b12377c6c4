"""A real loraplex server for the server tests: uvicorn on 127.0.0.1 (a free port), in a thread.

`ServerThread(app)` starts uvicorn on the app in a background thread and waits until it listens;
`url`, `client()` (the official `openai` client) and `http` (an `httpx.Client`) reach it; `stop()`
ends it. The engine behind the app lives in the test process, so tests can compare the server's
answers with transformers and PEFT and look at the engine's state. Tests share one server per
module (see the module fixtures); `free_port()` serves subprocess servers too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    def __init__(self, app: Any, api_key: str | None = None, timeout: float = 60.0) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on port {self.port} did not start")
            time.sleep(0.02)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=120.0)
        self._clients: list[Any] = []

    def client(self, api_key: str | None = None, **options: Any):
        """The official openai client, pointed at this server."""
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "EMPTY",
                               max_retries=0, timeout=120.0, **options)
        self._clients.append(client)
        return client

    def async_client(self, api_key: str | None = None):
        """The openai AsyncOpenAI client (close it on the loop that used it)."""
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "EMPTY",
                                  max_retries=0, timeout=120.0)

    def stop(self) -> None:
        self.http.close()
        for client in self._clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


def sse_events(response: httpx.Response) -> list[Any]:
    """The JSON payloads of a server-sent-event stream, checking that it ends with `data: [DONE]`."""
    events, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), f"not a server-sent event line: {line!r}"
        assert not done, "an event after data: [DONE]"
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    assert done, "the stream did not end with data: [DONE]"
    return events


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    """The response is an error in OpenAI's shape with this status, its message holding every fragment."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["code"] == status
    for fragment in fragments:
        assert fragment in error["message"], f"{fragment!r} not in {error['message']!r}"
    return error


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    """Wait until the server `process` (its output in `log`) answers 200 on /health."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not answer /health within {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")


class MakeServe:
    """`make serve` run in a fresh clone of this repository, as a user runs it: the Makefile's
    own command line, the adapters and examples as committed.

    The install step is the one `make test` has just run (the same Makefile rule): the clone uses
    this interpreter's virtual environment and `make -o` marks its stamp as up to date, so the
    clone does not install everything a second time. `url` reaches the server; `stop()` ends it
    and every process it started.
    """

    def __init__(self, root: Path, clone: Path, timeout: float = 300.0) -> None:
        subprocess.run(["git", "clone", "--quiet", str(root), str(clone)], check=True)
        venv = Path(sys.prefix)
        self.clone = Path(clone)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.clone / "make-serve.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("VLLM_PLUGINS", "LORAPLEX_PLUGINS_STRICT", "VLLM_LORA_RESOLVER_CACHE_DIR",
                            "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "MAKEFLAGS", "MFLAGS")}
        command = ["make", "serve", f"VENV={venv}", f"ARGS=--port {self.port}", "-o", f"{venv}/.loraplex-installed"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until_healthy(self.url, self.process, self.log_path, timeout)
        except AssertionError:
            self.stop()
            raise
        self.http = httpx.Client(base_url=self.url, timeout=120.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # make and the server it started
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if hasattr(self, "http"):
            self.http.close()
