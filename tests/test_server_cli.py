"""`loraplex serve`: its flags (one per EngineArgs field, vLLM's names), and the real command run as
a subprocess on the embedded model with a PEFT adapter, answering like transformers and PEFT."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lora_helpers import PeftOracle, make_adapter
from loraplex import EngineArgs
from loraplex.cli import build_parser, main
from loraplex.entrypoints.cli_args import engine_args_from
from server_helpers import free_port, wait_until_healthy
from tiny_models import EMBEDDED_KV_BYTES, load_hf

ENGINE_FIELDS = [f.name for f in dataclasses.fields(EngineArgs) if f.init and f.name != "model"]


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_help_lists_every_engine_option_in_groups(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in ENGINE_FIELDS:
        assert f"--{name.replace('_', '-')}" in text, f"EngineArgs.{name} has no flag"
    for flag in ("--lora-modules", "--api-key", "--host", "--port", "--uvicorn-log-level", "--disable-log-requests"):
        assert flag in text
    for group in ("Model:", "Batching and memory:", "LoRA adapters:", "Server:"):
        assert group in text
    assert "(default: 256)" in text  # max_num_seqs' default, read from EngineArgs


def test_no_flags_give_engine_args_defaults() -> None:
    args = parse()
    assert engine_args_from(args) == EngineArgs()
    assert (args.host, args.port, args.api_key, args.lora_modules) == ("127.0.0.1", 8000, None, [])


def test_flags_reach_engine_args() -> None:
    module = json.dumps({"name": "b", "path": "/adapters/b", "base_model_name": "org/model"})
    args = parse("org/model", "--served-model-name", "served", "--dtype", "float32", "--device", "cpu", "--seed", "5",
                 "--max-model-len", "64", "--max-num-seqs", "8", "--max-num-batched-tokens", "128",
                 "--kv-cache-memory-bytes", "1048576", "--gpu-memory-utilization", "0.5", "--max-loras", "2",
                 "--max-lora-rank", "32", "--max-cpu-loras", "4", "--lora-dtype", "bfloat16",
                 "--lora-modules", "a=/adapters/a", module, "--host", "0.0.0.0", "--port", "9000", "--api-key", "k")
    assert engine_args_from(args) == EngineArgs(
        model="org/model", served_model_name="served", dtype="float32", device="cpu", seed=5, max_model_len=64,
        max_num_seqs=8, max_num_batched_tokens=128, kv_cache_memory_bytes=1 << 20, gpu_memory_utilization=0.5,
        enable_lora=True, max_loras=2, max_lora_rank=32, max_cpu_loras=4, lora_dtype="bfloat16",
    )  # --lora-modules turns LoRA on
    assert args.lora_modules == [{"name": "a", "path": "/adapters/a"},
                                 {"name": "b", "path": "/adapters/b", "base_model_name": "org/model"}]
    assert (args.host, args.port, args.api_key) == ("0.0.0.0", 9000, "k")
    assert engine_args_from(parse("--model", "m", "--enable-lora")).model == "m"
    repeated = parse("--lora-modules", "a=/adapters/a", "--max-loras", "2", "--lora-modules", "c=/adapters/c")
    assert [module["name"] for module in repeated.lora_modules] == ["a", "c"]  # as `make serve ARGS=...` relies on


def test_bad_values_are_refused_before_loading(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--max-loras", "two"])
    assert exc.value.code == 2 and "--max-loras" in capsys.readouterr().err
    assert main(["serve", "--max-loras", "0"]) == 2
    err = capsys.readouterr()
    assert "max_loras" in err.err and "loading" not in err.out


# ---- the real command on the embedded model -----------------------------------------------------------------

PROMPT = "The capital of France is"
TOKENS = 8
API_KEY = "sk-serve-test"


def greedy(oracle: PeftOracle, adapter: str | None, prompt_ids: list[int]) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(TOKENS):
        ids.append(int(oracle.logprobs(adapter, ids)[-1].argmax()))
    return ids[len(prompt_ids):]


def test_loraplex_serve_on_the_embedded_model_answers_like_transformers_and_peft(embedded_model_path, tmp_path) -> None:
    base = load_hf(embedded_model_path)
    adapter = make_adapter(base, tmp_path / "emb-adapter", seed=11, b_std=0.1, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    command = [str(Path(sys.executable).with_name("loraplex")), "serve", "--lora-modules", f"emb={adapter}",
               "--max-lora-rank", "8", "--dtype", "float32", "--device", "cpu", "--max-model-len", "256",
               "--kv-cache-memory-bytes", str(EMBEDDED_KV_BYTES), "--port", str(port), "--uvicorn-log-level", "warning"]
    env = {**os.environ, "VLLM_API_KEY": API_KEY}
    env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(url, process, log)
        oracle = PeftOracle(base, {"emb": adapter})  # wraps `base`: built while the server starts
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
            assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
            cards = http.get("/v1/models").json()["data"]
            served = cards[0]["id"]
            assert [c["id"] for c in cards] == [served, "emb"] and cards[1]["root"] == str(adapter)
            prompt_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
            answers = {}
            for model in (served, "emb"):
                response = http.post("/v1/completions", json={
                    "model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "logprobs": 0,
                    "ignore_eos": True, "return_tokens_as_token_ids": True})
                assert response.status_code == 200, response.text
                answers[model] = [int(t.split(":")[1]) for t in response.json()["choices"][0]["logprobs"]["tokens"]]
        assert answers[served] == greedy(oracle, None, prompt_ids)
        assert answers["emb"] == greedy(oracle, "emb", prompt_ids)
        assert answers["emb"] != answers[served]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    printed = log.read_text()
    assert f"listening on {url}" in printed and f"emb ({adapter})" in printed and "API key:  required" in printed
    assert process.returncode == 0 and "Traceback" not in printed and printed.rstrip().endswith("stopped"), printed
