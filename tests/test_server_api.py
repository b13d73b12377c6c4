"""The OpenAI-compatible server over HTTP: completions and chat, streamed and whole, on the base
model and on adapters, against transformers and PEFT; sampling options; tokenization; /metrics;
bad input; client disconnects.

One real server (uvicorn on 127.0.0.1) for the module, on a tiny Llama with two PEFT adapters,
driven with the official `openai` client and `httpx`. VLLM_ALLOW_RUNTIME_LORA_UPDATING is unset
here (test_server_adapters covers runtime loading).
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_helpers import TinyAdapters
from loraplex import AsyncLLMEngine, EngineArgs
from loraplex.entrypoints.openai.api_server import build_app
from loraplex.entrypoints.openai.serving_models import add_lora_modules
from server_helpers import ServerThread, assert_error, sse_events
from tiny_models import TINY_KV_BYTES, TINY_MAX_MODEL_LEN, hf_greedy, tiny  # noqa: F401

SERVED = "tiny-llama"
PROMPT = "The quick brown fox jumps over the lazy dog."
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]
TOKENS = 8
GREEDY = {"temperature": 0.0, "max_tokens": TOKENS}
AS_IDS = {"ignore_eos": True, "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> TinyAdapters:
    return TinyAdapters(tiny.path("llama"), tmp_path_factory.mktemp("server_api_adapters"), ["a1", "a2"])


@pytest.fixture(scope="module")
def engine(tiny, adapters):
    with pytest.MonkeyPatch.context() as env:
        env.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
        engine = AsyncLLMEngine.from_engine_args(EngineArgs(
            model=str(tiny.path("llama")), served_model_name=SERVED, dtype="float32", device="cpu",
            kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=TINY_MAX_MODEL_LEN,
            enable_lora=True, max_loras=2, max_lora_rank=8,
        ))
        asyncio.run(add_lora_modules(engine, [{"name": name, "path": str(path)} for name, path in adapters.paths.items()]))
        yield engine
        engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with pytest.MonkeyPatch.context() as env:
        env.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
        running = ServerThread(build_app(engine))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def token_ids(tokens: list[str]) -> list[int]:
    """Token ids from tokens written `token_id:<id>` (return_tokens_as_token_ids)."""
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.split(":", 1)[1]) for t in tokens]


def oracle_greedy(tiny, adapters: TinyAdapters, model: str, prompt_ids: list[int], n: int = TOKENS) -> list[int]:
    """transformers' greedy tokens for the base model, PEFT's for an adapter."""
    if model == SERVED:
        return hf_greedy(tiny.hf("llama"), prompt_ids, n)
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(adapters.oracle.logprobs(model, ids)[-1].argmax()))
    return ids[len(prompt_ids):]


def chat_prompt_ids(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"])


# ---- models, health, version ----------------------------------------------------------------------


def test_models_lists_the_base_and_each_adapter(client, tiny, adapters) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [SERVED, "a1", "a2"]
    base = models[SERVED].model_dump()
    assert base["root"] == str(tiny.path("llama")) and base["parent"] is None and base["max_model_len"] == TINY_MAX_MODEL_LEN
    for name in ("a1", "a2"):
        card = models[name].model_dump()
        assert card["root"] == str(adapters.paths[name]) and card["parent"] == SERVED and card["object"] == "model"


def test_health_and_version_answer(server) -> None:
    import loraplex

    assert server.http.get("/health").status_code == 200
    assert server.http.get("/version").json() == {"version": loraplex.__version__}


# ---- greedy answers against the oracles --------------------------------------------------------------


@pytest.mark.parametrize("model", [SERVED, "a1", "a2"])
def test_greedy_completion_equals_transformers_and_peft(client, engine, tiny, adapters, model: str) -> None:
    tokenizer = engine.engine.tokenizer
    prompt_ids = tokenizer.encode(PROMPT)
    expected = oracle_greedy(tiny, adapters, model, prompt_ids)
    # as text, whole
    out = client.completions.create(model=model, prompt=PROMPT, logprobs=0, extra_body=AS_IDS, **GREEDY)
    choice = out.choices[0]
    assert token_ids(choice.logprobs.tokens) == expected
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert out.model == model
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(prompt_ids), TOKENS, len(prompt_ids) + TOKENS)
    # as token ids, streamed with usage
    stream = client.completions.create(model=model, prompt=prompt_ids, logprobs=0, extra_body=AS_IDS, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    streamed = [tok for chunk in chunks[:-1] for c in chunk.choices for tok in c.logprobs.tokens]
    assert token_ids(streamed) == expected
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == choice.text
    assert [c.finish_reason for chunk in chunks for c in chunk.choices][-1] == "length"


@pytest.mark.parametrize("model", [SERVED, "a1"])
def test_greedy_chat_equals_transformers_and_peft(client, engine, tiny, adapters, model: str) -> None:
    tokenizer = engine.engine.tokenizer
    prompt_ids = chat_prompt_ids(tokenizer)
    expected = oracle_greedy(tiny, adapters, model, prompt_ids)
    out = client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, extra_body=AS_IDS,
                                         temperature=0.0, max_completion_tokens=TOKENS)
    choice = out.choices[0]
    assert token_ids([t.token for t in choice.logprobs.content]) == expected
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), TOKENS)
    assert out.object == "chat.completion"
    # streamed: the role first, then the content in pieces, then the usage
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True, max_tokens=TOKENS,
                                                 temperature=0.0, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == choice.message.content
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_logprobs_equal_peft_log_softmax(client, engine, adapters) -> None:
    prompt_ids = engine.engine.tokenizer.encode(PROMPT)
    out = client.completions.create(model="a2", prompt=prompt_ids, logprobs=5, extra_body=AS_IDS, **GREEDY)
    logprobs = out.choices[0].logprobs
    ids = token_ids(logprobs.tokens)
    reference = adapters.oracle.logprobs("a2", prompt_ids + ids)  # [L, V]
    for step, (token, value, top) in enumerate(zip(ids, logprobs.token_logprobs, logprobs.top_logprobs)):
        row = reference[len(prompt_ids) - 1 + step]
        assert value == pytest.approx(row[token].item(), abs=1e-4)
        assert set(token_ids(list(top))) == set(row.topk(5).indices.tolist())
        for name, lp in top.items():
            assert lp == pytest.approx(row[token_ids([name])[0]].item(), abs=1e-4)
    chat = client.chat.completions.create(model="a2", messages=MESSAGES, logprobs=True, top_logprobs=3, max_tokens=2,
                                          temperature=0.0)
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[2].logprob
        assert entry.bytes == list(entry.token.encode())


# ---- sampling options ---------------------------------------------------------------------------------


def test_stop_strings_end_the_text(client) -> None:
    full = client.completions.create(model=SERVED, prompt=PROMPT, temperature=0.0, max_tokens=16, logprobs=0,
                                     extra_body={"ignore_eos": True})
    text, tokens = full.choices[0].text, full.choices[0].logprobs.tokens
    stop = next(t.strip() for t in tokens[4:] if len(t.strip()) >= 2)  # a word from the middle of the reply
    cut = text.index(stop)
    out = client.completions.create(model=SERVED, prompt=PROMPT, temperature=0.0, max_tokens=16, stop=[stop, "@@@"],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == text[:cut]
    assert out.choices[0].finish_reason == "stop"
    assert out.model_dump()["choices"][0]["stop_reason"] == stop
    kept = client.completions.create(model=SERVED, prompt=PROMPT, temperature=0.0, max_tokens=16, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:cut + len(stop)]
    streamed = client.completions.create(model=SERVED, prompt=PROMPT, temperature=0.0, max_tokens=16, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    chunks = [c for chunk in streamed for c in chunk.choices]
    assert "".join(c.text for c in chunks) == text[:cut] and chunks[-1].finish_reason == "stop"


def test_stop_token_ids_min_tokens_and_max_tokens(client) -> None:
    full = client.completions.create(model=SERVED, prompt=PROMPT, logprobs=0, extra_body=AS_IDS, **GREEDY)
    ids = token_ids(full.choices[0].logprobs.tokens)
    stop_id = ids[3]
    first = ids.index(stop_id)
    out = client.completions.create(model=SERVED, prompt=PROMPT, logprobs=0,
                                    extra_body={**AS_IDS, "stop_token_ids": [stop_id]}, **GREEDY)
    assert token_ids(out.choices[0].logprobs.tokens) == ids[:first + 1]
    assert out.choices[0].finish_reason == "stop" and out.model_dump()["choices"][0]["stop_reason"] == stop_id
    short = client.completions.create(model=SERVED, prompt=PROMPT, temperature=0.0, max_tokens=3, extra_body=AS_IDS)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    # top_k=1 at temperature 1 is greedy
    top1 = client.completions.create(model=SERVED, prompt=PROMPT, temperature=1.0, max_tokens=TOKENS, logprobs=0,
                                     extra_body={**AS_IDS, "top_k": 1})
    assert token_ids(top1.choices[0].logprobs.tokens) == ids


def test_seeds_give_repeatable_samples(client) -> None:
    def sample(seed: int, stream: bool = False) -> list[str]:
        args = dict(model="a1", prompt=PROMPT, temperature=1.0, max_tokens=12, seed=seed, n=3,
                    extra_body={"ignore_eos": True})
        if not stream:
            return [c.text for c in sorted(client.completions.create(**args).choices, key=lambda c: c.index)]
        texts = ["", "", ""]
        for chunk in client.completions.create(stream=True, **args):
            for c in chunk.choices:
                texts[c.index] += c.text
        return texts

    first = sample(1234)
    assert sample(1234) == first
    assert sample(1234, stream=True) == first
    assert len(set(first)) > 1, "n=3 samples at temperature 1 were all the same"
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_several_prompts_and_n_choices_in_openai_order(client) -> None:
    prompts = [PROMPT, "Hello, my name is"]
    singles = [client.completions.create(model="a2", prompt=p, **GREEDY).choices[0].text for p in prompts]
    out = client.completions.create(model="a2", prompt=prompts, n=2, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [singles[0], singles[0], singles[1], singles[1]]
    assert out.usage.completion_tokens == 4 * TOKENS
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(model="a2", prompt=prompts, n=2, stream=True, **GREEDY):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in out.choices]


# ---- tokenization -------------------------------------------------------------------------------------


def test_tokenize_and_detokenize(server, engine) -> None:
    tokenizer = engine.engine.tokenizer
    out = server.http.post("/tokenize", json={"model": "a1", "prompt": PROMPT, "return_token_strs": True}).json()
    assert out["tokens"] == tokenizer.encode(PROMPT) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == TINY_MAX_MODEL_LEN and out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
    assert server.http.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": PROMPT}
    chat = server.http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == chat_prompt_ids(tokenizer)
    assert_error(server.http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "nope")
    assert_error(server.http.post("/detokenize", json={"tokens": [10**9]}), 400, "outside the vocabulary")


# ---- bad input: a clear 4xx, and the server keeps serving ------------------------------------------------

JSON = {"Content-Type": "application/json"}
LONG_PROMPT = [100] * (TINY_MAX_MODEL_LEN + 10)

BAD_REQUESTS = [
    # (id, method, path, body (bytes: raw), status, message fragments)
    ("malformed json", "POST", "/v1/completions", b'{"prompt": "x",', 400, ["not valid JSON"]),
    ("not an object", "POST", "/v1/chat/completions", b"[1, 2]", 400, ["body"]),
    ("no body", "POST", "/v1/completions", b"", 400, ["body"]),
    ("max_tokens wrong type", "POST", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, ["max_tokens"]),
    ("prompt wrong type", "POST", "/v1/completions", {"prompt": {"text": "x"}}, 400, ["prompt"]),
    ("messages wrong type", "POST", "/v1/chat/completions", {"messages": "hi"}, 400, ["messages"]),
    ("messages missing", "POST", "/v1/chat/completions", {"model": SERVED}, 400, ["messages", "Field required"]),
    ("messages empty", "POST", "/v1/chat/completions", {"messages": []}, 400, ["messages"]),
    ("image content", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, ["messages"]),
    ("prompt over the context", "POST", "/v1/completions", {"prompt": LONG_PROMPT}, 400,
     ["maximum context length is 256", "leaving no room"]),
    ("prompt and max_tokens over the context", "POST", "/v1/completions",
     {"prompt": [100] * 200, "max_tokens": 100}, 400, ["maximum context length is 256", "300 tokens"]),
    ("chat over the context", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "word " * 300}]}, 400, ["maximum context length"]),
    ("max_tokens 0", "POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, ["max_tokens must be at least 1"]),
    ("max_tokens negative", "POST", "/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, ["max_tokens"]),
    ("max_completion_tokens 0", "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, 400,
     ["max_tokens must be at least 1"]),
    ("max_tokens 0 streamed", "POST", "/v1/completions", {"prompt": "x", "max_tokens": 0, "stream": True}, 400,
     ["max_tokens"]),
    ("temperature negative", "POST", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, ["temperature"]),
    ("too many logprobs", "POST", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, ["logprobs"]),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400,
     ["top_logprobs needs logprobs"]),
    ("n zero", "POST", "/v1/completions", {"prompt": "x", "n": 0}, 400, ["n must be"]),
    ("penalty out of range", "POST", "/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, ["presence_penalty"]),
    ("token id outside the vocabulary", "POST", "/v1/completions", {"prompt": [10**8]}, 400, ["vocabulary"]),
    ("unknown model", "POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, ["`nope` does not exist"]),
    ("parent path", "POST", "/v1/completions", {"model": "../x", "prompt": "x"}, 404, ["`../x` does not exist"]),
    ("absolute path", "POST", "/v1/chat/completions", {"model": "/etc/passwd", "messages": MESSAGES}, 404,
     ["does not exist"]),
    ("hub repo id", "POST", "/v1/completions", {"model": "org/repo", "prompt": "x"}, 404, ["`org/repo` does not exist"]),
    ("unknown model streamed", "POST", "/v1/chat/completions", {"model": "nope", "messages": MESSAGES, "stream": True},
     404, ["nope"]),
    ("runtime loading off", "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}, 404, ["no route"]),
    ("unknown route", "GET", "/v1/nope", None, 404, ["no route"]),
    ("wrong method", "GET", "/v1/completions", None, 405, ["POST"]),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "fragments"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(server, method, path, body, status, fragments) -> None:
    if isinstance(body, bytes):
        response = server.http.request(method, path, content=body, headers=JSON)
    else:
        response = server.http.request(method, path, json=body)
    assert_error(response, status, *fragments)
    good = server.http.post("/v1/completions", json={"model": "a1", "prompt": PROMPT, "max_tokens": 2})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_an_adapter_directory_is_not_a_model_name(server, adapters) -> None:
    """A real adapter's path on the server is still no model: only registered names are."""
    response = server.http.post("/v1/completions", json={"model": str(adapters.paths["a1"]), "prompt": "x"})
    assert_error(response, 404, "does not exist")


# ---- metrics ----------------------------------------------------------------------------------------------


def scrape(server) -> dict[tuple[str, tuple], float]:
    response = server.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_count_the_requests_served(server, client) -> None:
    model = (("model_name", SERVED),)
    before = scrape(server)
    outs = [client.completions.create(model="a1", prompt=PROMPT, **GREEDY),
            client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=5, temperature=0.0,
                                           extra_body={"ignore_eos": True})]
    list(client.completions.create(model="a2", prompt=PROMPT, stream=True, **GREEDY))
    after = scrape(server)

    def delta(name: str, labels: tuple = model) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    prompt_tokens = sum(o.usage.prompt_tokens for o in outs) + outs[0].usage.prompt_tokens  # the stream's prompt = outs[0]'s
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:generation_tokens_total") == TOKENS + 5 + TOKENS
    assert delta("vllm:request_success_total", (("finished_reason", "length"), *model)) == 3
    assert delta("vllm:e2e_request_latency_seconds_count") == 3
    assert delta("vllm:time_to_first_token_seconds_count") == 3
    for name in ("a1", "a2"):
        assert delta("loraplex:lora_requests_total", (("lora_name", name), *model)) == 1


# ---- client disconnects abort their requests ----------------------------------------------------------------


def wait_idle(engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests() or engine.stats().num_running:
        assert time.monotonic() < deadline, "the engine still runs requests whose clients left"
        time.sleep(0.01)


def test_a_client_that_leaves_a_stream_aborts_its_request(server, engine) -> None:
    before = scrape(server)
    body = {"model": "a1", "prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first event: the request runs; then hang up
    wait_idle(engine)
    after = scrape(server)
    model = (("model_name", SERVED),)
    generated = after[("vllm:generation_tokens_total", model)] - before[("vllm:generation_tokens_total", model)]
    assert 1 <= generated < 200
    assert after.get(("vllm:request_success_total", (("finished_reason", "length"), *model))) == \
        before.get(("vllm:request_success_total", (("finished_reason", "length"), *model)))


def test_a_client_that_leaves_before_the_answer_aborts_its_request(server, engine) -> None:
    before = scrape(server)
    payload = b'{"model": "a2", "prompt": "Hello", "max_tokens": 240, "ignore_eos": true}'
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        deadline = time.monotonic() + 30
        while not engine.engine.has_unfinished_requests():  # the request reached the engine: hang up
            assert time.monotonic() < deadline
            time.sleep(0.002)
    wait_idle(engine)
    after = scrape(server)
    model = (("model_name", SERVED),)
    assert after[("vllm:prompt_tokens_total", model)] > before[("vllm:prompt_tokens_total", model)]
    generated = after[("vllm:generation_tokens_total", model)] - before[("vllm:generation_tokens_total", model)]
    assert generated < 240
    assert after.get(("vllm:request_success_total", (("finished_reason", "length"), *model))) == \
        before.get(("vllm:request_success_total", (("finished_reason", "length"), *model)))


def test_sse_stream_shape(server) -> None:
    with server.http.stream("POST", "/v1/chat/completions",
                            json={"messages": MESSAGES, "max_tokens": 3, "stream": True, "n": 2}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert {e["choices"][0]["index"] for e in events} == {0, 1}
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == SERVED for e in events)


def test_a_dead_engine_answers_503(tiny) -> None:
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(tiny.path("llama")), device="cpu",
                                                        kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=64))
    running = ServerThread(build_app(engine))
    try:
        assert running.http.get("/health").status_code == 200
        engine.shutdown()
        assert_error(running.http.get("/health"), 503, "shut down")
        assert_error(running.http.post("/v1/completions", json={"prompt": "hi"}), 503, "restart")
        assert running.http.get("/version").status_code == 200
    finally:
        running.stop()
        engine.shutdown()
