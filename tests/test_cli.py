"""`loraplex generate`: the engine and LoRA flags (vLLM's names), against transformers + PEFT."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from loraplex.cli import main
from loraplex.testing import make_lora_adapter, peft_greedy_tokens, tiny_base_model

PROMPT = "The quick brown fox"
TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    base = tiny_base_model(root / "base")
    adapter = make_lora_adapter(base, root / "tuned", rank=4, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(str(base))

    def expected(adapter_path) -> str:
        return tokenizer.decode(peft_greedy_tokens(base, adapter_path, PROMPT, TOKENS)).strip()

    return {"base": base, "adapter": adapter, "base_text": expected(None), "adapter_text": expected(adapter)}


def generate(setup: dict, *flags: str) -> list[str]:
    argv = ["generate", str(setup["base"]), "--no-chat", "--prompt", PROMPT, "--max-tokens", str(TOKENS),
            "--ignore-eos", "--dtype", "float32", "--device", "cpu", "--kv-cache-memory-bytes", str(4 << 20), *flags]
    return argv


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reply(out: str) -> str:
    header, text = out.strip().split("\n", 1)
    assert header == f"### {PROMPT}"
    return text.strip()


def test_base_model_and_an_added_adapter_give_peft_text(setup, capsys) -> None:
    assert setup["base_text"] != setup["adapter_text"]  # the adapter changes the reply: the test can fail
    code, out, _ = run(capsys, generate(setup))
    assert code == 0 and reply(out) == setup["base_text"]
    code, out, _ = run(capsys, generate(setup, "--lora-modules", f"tuned={setup['adapter']}", "--lora", "tuned"))
    assert code == 0 and reply(out) == setup["adapter_text"]


def test_lora_modules_json_form_and_lora_flags(setup, capsys) -> None:
    module = json.dumps({"name": "tuned", "path": str(setup["adapter"]), "base_model_name": str(setup["base"])})
    flags = ("--lora-modules", module, "--lora", "tuned", "--max-loras", "2", "--max-lora-rank", "8", "--max-cpu-loras", "3",
             "--lora-dtype", "float32")
    code, out, _ = run(capsys, generate(setup, *flags))
    assert code == 0 and reply(out) == setup["adapter_text"]


def test_an_adapter_directory_needs_no_registration(setup, capsys) -> None:
    code, out, _ = run(capsys, generate(setup, "--lora", str(setup["adapter"])))
    assert code == 0 and reply(out) == setup["adapter_text"]


@pytest.mark.parametrize(("entry", "message"), [
    ("tuned", "is not NAME=PATH"),
    ("=/x", "is not NAME=PATH"),
    ('{"name": "tuned"}', 'needs "name" and "path"'),
    ('{"name": "a", "path": "/x", "scale": 2}', 'needs "name" and "path"'),
    ("{not json", "is not valid JSON"),
])
def test_malformed_lora_modules_are_refused_by_the_parser(setup, capsys, entry: str, message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(generate(setup, "--lora-modules", entry))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_an_adapter_that_cannot_be_loaded_is_a_clear_error(setup, tmp_path, capsys) -> None:
    missing = tmp_path / "nowhere"
    code, out, err = run(capsys, generate(setup, "--lora-modules", f"ghost={missing}", "--lora", "ghost"))
    assert code == 2 and out == ""
    assert err.startswith("loraplex: error:") and "ghost" in err
