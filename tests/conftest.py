"""Fixtures shared by the whole suite. Keep this file small: module-specific fixtures belong in
the test module that uses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The suite's models are tiny: one thread is faster than two here (no synchronisation stalls, no
# fight with the servers and subprocesses the tests start). Benchmarks keep torch's default.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def embedded_model_path() -> Path:
    """The embedded model (SmolLM2-135M-Instruct) as a Hugging Face directory.

    It lives in the user's normal cache (LORAPLEX_CACHE_DIR, else ~/.cache/loraplex), so the
    ~20 s conversion happens once per machine, not once per test run.
    """
    from loraplex.model_loader.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def make_serve(tmp_path_factory, embedded_model_path: Path):
    """`make serve` from a fresh clone of this repository (the README's server, with the demo
    adapters), shared by the README and demo-adapter tests; stopped at the end of the session."""
    from server_helpers import MakeServe

    server = MakeServe(Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("fresh") / "loraplex")
    yield server
    server.stop()
