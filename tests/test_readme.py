"""The README's quick start, run exactly as written, prints what the README shows.

Every code block of the "Quick start" section is taken from README.md (not copied here) and run:
Python blocks with this interpreter from the repository root, the `curl` blocks with bash against
`make serve` started from a fresh clone (see the `make_serve` fixture). The block after each one
is its shown output. The only change made to a command is the server's port (the fixture's free
port instead of 8000). JSON outputs are compared as JSON, with what differs from run to run
(`created` times, response ids, absolute paths of this machine) masked on both sides.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
_RESPONSE_ID = re.compile(r"^(cmpl|chatcmpl)-[0-9a-f]+$")


@dataclass(frozen=True)
class Example:
    language: str  # python or bash
    code: str
    shown: str | None  # the output block after it, if any
    shown_language: str | None  # text or json


def quick_start() -> str:
    text = README.read_text()
    start = text.index("\n## Quick start\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def quick_start_examples() -> list[Example]:
    blocks = [(match.group(1), match.group(2)) for match in _FENCE.finditer(quick_start())]
    examples = []
    for index, (language, code) in enumerate(blocks):
        if language not in ("python", "bash"):
            continue
        following = blocks[index + 1] if index + 1 < len(blocks) else ("", "")
        shown = following[1] if following[0] in ("text", "json") else None
        examples.append(Example(language, code, shown, following[0] if shown is not None else None))
    return examples


EXAMPLES = quick_start_examples()
PYTHON = [example for example in EXAMPLES if example.language == "python"]
CURLS = [example for example in EXAMPLES if example.language == "bash" and example.code.startswith("curl ")]


def masked(value: Any) -> Any:
    """A JSON value with what changes from run to run replaced by placeholders."""
    if isinstance(value, dict):
        return {key: "<time>" if key == "created" else masked(item) for key, item in value.items()}
    if isinstance(value, list):
        return [masked(item) for item in value]
    if isinstance(value, str) and (_RESPONSE_ID.match(value) or value.startswith("/")):
        return "<varies>"
    return value


def test_the_quick_start_shows_python_the_server_and_the_engine_loop() -> None:
    assert [example.code for example in EXAMPLES if example.language == "bash"][0] == "make serve\n"
    assert len(PYTHON) == 2 and "LLM(" in PYTHON[0].code and "LLMEngine" in PYTHON[1].code
    assert all(example.shown for example in PYTHON + CURLS), "every example shows its output"
    routes = [re.search(r"127\.0\.0\.1:8000(/\S+)", example.code).group(1) for example in CURLS]
    assert routes == ["/v1/models", "/v1/completions", "/v1/load_lora_adapter", "/v1/completions",
                      "/v1/unload_lora_adapter"]
    assert '"model": "sql"' in CURLS[1].code


@pytest.mark.parametrize("example", PYTHON, ids=["llm", "llm_engine"])
def test_a_python_example_prints_what_the_readme_shows(example: Example, embedded_model_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", example.code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == example.shown


def test_the_curl_examples_answer_make_serve_as_shown(make_serve) -> None:
    for example in CURLS:  # in order: load, ask, unload
        command = example.code.replace("127.0.0.1:8000", f"127.0.0.1:{make_serve.port}")
        result = subprocess.run(["bash", "-c", command], cwd=make_serve.clone, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{example.code}\n{result.stderr}"
        if example.shown_language == "json":
            assert masked(json.loads(result.stdout)) == masked(json.loads(example.shown)), example.code
        else:
            assert result.stdout.rstrip("\n") == example.shown.rstrip("\n"), example.code


def test_make_serve_finds_an_adapter_put_into_the_tree(make_serve) -> None:
    """The filesystem resolver `make serve` points at examples/adapters/ serves a new directory by name."""
    tree = make_serve.clone / "examples" / "adapters" / "SmolLM2-135M-Instruct"
    shutil.copytree(tree / "json-extract", tree / "people")
    prompt = "[user] Extract the person as JSON.\n\n text: Ines Varga (52) teaches in Szeged. [/user] [assistant]"
    answers = {}
    for model in ("json-extract", "people"):
        reply = make_serve.http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 32,
                                                              "temperature": 0, "stop": ["[/assistant]"]})
        assert reply.status_code == 200, reply.text
        answers[model] = reply.json()["choices"][0]["text"]
    assert answers["people"] == answers["json-extract"] == ' {"name": "Ines Varga", "age": 52, "city": "Szeged"} '
    models = [entry["id"] for entry in make_serve.http.get("/v1/models").json()["data"]]
    assert "people" in models
