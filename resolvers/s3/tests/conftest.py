"""Fixtures for the S3 resolver's tests: a moto S3 server on loopback (one per session, a fresh
bucket per test), fake AWS credentials, a tiny base model and a real PEFT adapter."""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BASE_MODEL_DIR_NAME = "tiny-base"
_buckets = itertools.count()

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (s3fs talks to it over HTTP; moto's in-process mock would not reach it)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def fake_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials from the environment; no profile or config file of the machine leaks in."""
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@dataclass
class Bucket:
    """A fresh bucket on the moto server, with boto3 to fill it."""

    name: str
    endpoint_url: str
    client: Any

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)

    def upload_dir(self, local: Path, prefix: str) -> None:
        for path in sorted(local.rglob("*")):
            if path.is_file():
                self.put(f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}", path.read_bytes())


@pytest.fixture
def bucket(moto_url: str, fake_aws_credentials: None) -> Bucket:
    import boto3

    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    name = f"loras-{next(_buckets)}"
    client.create_bucket(Bucket=name)
    return Bucket(name, moto_url, client)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraplex.testing import tiny_base_model

    return tiny_base_model(tmp_path_factory.mktemp("models") / BASE_MODEL_DIR_NAME)


@pytest.fixture(scope="session")
def adapter_template(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rank 16: the weights (~170 kB) span several of s3fs's 64 kB reads, so a download can be cut midway."""
    from loraplex.testing import make_lora_adapter

    return make_lora_adapter(tiny_base, tmp_path_factory.mktemp("adapters") / "template", rank=16, seed=0)


@pytest.fixture
def local_adapter(adapter_template: Path, tmp_path: Path):
    """local_adapter(mutate=None): a fresh local copy of the session adapter (optionally changed)."""
    copies = itertools.count()

    def copy(mutate=None) -> Path:
        dest = tmp_path / f"adapter-copy-{next(copies)}"
        shutil.copytree(adapter_template, dest)
        if mutate is not None:
            mutate(dest)
        return dest

    return copy
