"""Images over HTTP: chat messages with `image_url` parts through a real server (uvicorn on
127.0.0.1, the official `openai` client), against transformers and PEFT; default_mm_loras on the
server; the media policy (data: URLs, --allowed-local-media-path, --allowed-media-domains, size
limits); every bad image a 400 while the server keeps serving; `--default-mm-loras` on the
command line.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading
from pathlib import Path

import openai
import pytest

from lora_helpers import one_torch_thread  # noqa: F401
from multimodal_helpers import TOKENS, TinyLlava, png_bytes, random_image
from server_helpers import ServerThread
from tiny_models import TINY_KV_BYTES, TINY_MAX_MODEL_LEN, tiny  # noqa: F401

from loraplex import AsyncLLMEngine, EngineArgs
from loraplex.entrypoints.openai.api_server import build_app
from loraplex.errors import ConfigError
from loraplex.entrypoints.openai.serving_models import add_lora_modules
from loraplex.tokenizer import apply_chat_template

SERVED = "tiny-llava"
MAX_IMAGE_BYTES = 100_000
IMAGES = [random_image(seed) for seed in range(3)]
BIG = random_image(7, (300, 300))  # a PNG of ~270 kB: over MAX_IMAGE_BYTES
GREEDY = {"temperature": 0.0, "max_tokens": TOKENS, "extra_body": {"ignore_eos": True}}


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict | str) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


class ImageHost:
    """A loopback HTTP server holding a few image files."""

    def __init__(self, files: dict[str, bytes]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = files.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> TinyLlava:
    return TinyLlava(tmp_path_factory.mktemp("mm_server"), "llama")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("media")
    (directory / "cat.png").write_bytes(png_bytes(IMAGES[2]))
    return directory


@pytest.fixture(scope="module")
def host():
    running = ImageHost({"cat.png": png_bytes(IMAGES[2]), "big.png": png_bytes(BIG)})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(llava, media_dir):
    with pytest.MonkeyPatch.context() as env:
        env.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
        env.setenv("LORAPLEX_MAX_IMAGE_BYTES", str(MAX_IMAGE_BYTES))
        engine = AsyncLLMEngine.from_engine_args(EngineArgs(
            model=str(llava.path), served_model_name=SERVED, dtype="float32", device="cpu",
            kv_cache_memory_bytes=1 << 22, max_model_len=256, enable_lora=True, max_loras=3, max_lora_rank=8,
            limit_mm_per_prompt={"image": 2}, default_mm_loras={"image": str(llava.adapters["tower"])},
            allowed_local_media_path=str(media_dir), allowed_media_domains=["127.0.0.1"],
        ))
        asyncio.run(add_lora_modules(engine, [{"name": "lm", "path": str(llava.adapters["lm"])}]))
        running = ServerThread(build_app(engine))
    yield running
    running.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def expected(llava: TinyLlava, adapter: str | None, messages: list[dict], images: list) -> list[int]:
    """The oracle's tokens for the messages as the server renders them (images as `<image>`)."""
    conversation = [{"role": m["role"], "content": "".join(p["text"] if p["type"] == "text" else "<image>"
                                                          for p in m["content"])} for m in messages]
    ids = apply_chat_template(llava.processor.tokenizer, conversation)
    return llava.oracle_ids(adapter, ids, images)


def reply_ids(client, model: str, messages: list[dict]) -> list[int]:
    answer = client.chat.completions.create(model=model, messages=messages, logprobs=True,
                                            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
                                            temperature=0.0, max_tokens=TOKENS)
    return [int(t.token.split(":", 1)[1]) for t in answer.choices[0].logprobs.content]


def test_image_chat_gets_the_default_adapter_text_chat_the_base(llava, client) -> None:
    image_messages = user("What is in the picture? ", image_part(data_url(IMAGES[0])))
    assert reply_ids(client, SERVED, image_messages) == expected(llava, "tower", image_messages, [IMAGES[0]])
    text_messages = user("Tell me about the sea.")
    assert reply_ids(client, SERVED, text_messages) == expected(llava, None, text_messages, [])


def test_a_request_naming_an_adapter_keeps_it(llava, client) -> None:
    messages = user(image_part(data_url(IMAGES[0])), "and ", image_part(data_url(IMAGES[1])), " compared")
    assert reply_ids(client, "lm", messages) == expected(llava, "lm", messages, IMAGES[:2])


def test_streamed_image_chat_equals_the_whole_answer(client) -> None:
    messages = user("Describe ", image_part(data_url(IMAGES[1])))
    whole = client.chat.completions.create(model=SERVED, messages=messages, **GREEDY).choices[0].message.content
    stream = client.chat.completions.create(model=SERVED, messages=messages, stream=True, **GREEDY)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == whole


def test_local_file_under_the_allowed_directory_and_allowed_remote_host(llava, client, media_dir, host) -> None:
    want = expected(llava, "tower", user("Look: ", image_part("data:")), [IMAGES[2]])
    assert reply_ids(client, SERVED, user("Look: ", image_part((media_dir / "cat.png").as_uri()))) == want
    assert reply_ids(client, SERVED, user("Look: ", image_part(f"{host.url}/cat.png"))) == want


@pytest.mark.parametrize(("url", "pattern"), [
    ("data:image/png;base64,@@not base64@@", r"does not hold valid base64"),
    ("data:text/plain,hello", r"is not a base64 image data URL"),
    ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(), r"does not hold a decodable image"),
    ("data:image/png;base64," + base64.b64encode(png_bytes(IMAGES[0])[:300]).decode(), r"does not hold a decodable image"),
    ("data:image/png;base64," + base64.b64encode(png_bytes(BIG)).decode(), r"larger than the 100000 bytes allowed"),
    ("ftp://example.com/cat.png", r"is not a data:, file:// or http\(s\):// URL"),
    ("file:///etc/passwd", r"outside the directory this server may read images from"),
    ("http://localhost:1/cat.png", r"fetches images only from the hosts its operator allows \(127\.0\.0\.1\)"),
])
def test_bad_images_are_400s_and_the_server_keeps_serving(client, url, pattern) -> None:
    with pytest.raises(openai.BadRequestError, match=pattern) as caught:
        client.chat.completions.create(model=SERVED, messages=user("What? ", image_part(url)), **GREEDY)
    assert caught.value.status_code == 400
    assert client.chat.completions.create(model=SERVED, messages=user("Hi"), **GREEDY).choices[0].message.content


def test_remote_errors_and_too_many_images_are_400s(client, host) -> None:
    with pytest.raises(openai.BadRequestError, match=r"answered HTTP 404"):
        client.chat.completions.create(model=SERVED, messages=user(image_part(f"{host.url}/nothing.png")), **GREEDY)
    with pytest.raises(openai.BadRequestError, match=r"larger than the 100000 bytes allowed"):
        client.chat.completions.create(model=SERVED, messages=user(image_part(f"{host.url}/big.png")), **GREEDY)
    three = user(*(image_part(data_url(image)) for image in IMAGES))
    with pytest.raises(openai.BadRequestError, match=r"3 images, more than the 2 allowed per prompt"):
        client.chat.completions.create(model=SERVED, messages=three, **GREEDY)


def test_an_image_for_a_text_only_model_is_a_400(tiny) -> None:
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(
        model=str(tiny.path("llama")), served_model_name="tiny-llama", dtype="float32", device="cpu",
        kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=TINY_MAX_MODEL_LEN,
    ))
    running = ServerThread(build_app(engine))
    try:
        client = running.client()
        with pytest.raises(openai.BadRequestError, match=r"carry 1 image\(s\), but the model 'tiny-llama' takes text only"):
            client.chat.completions.create(model="tiny-llama", messages=user("What? ", image_part(data_url(IMAGES[0]))),
                                           **GREEDY)
        assert client.chat.completions.create(model="tiny-llama", messages=user("Hi"), **GREEDY).choices[0].message.content
    finally:
        running.stop()
        engine.shutdown()


def test_serve_flags(tmp_path) -> None:
    from loraplex.cli import build_parser
    from loraplex.entrypoints.cli_args import engine_args_from

    args = build_parser().parse_args([
        "serve", "some/model", "--default-mm-loras", '{"image": "/adapters/vision"}', "--limit-mm-per-prompt",
        '{"image": 3}', "--allowed-local-media-path", str(tmp_path), "--allowed-media-domains", "a.example", "b.example",
    ])
    options = engine_args_from(args)
    assert options.default_mm_loras == {"image": "/adapters/vision"} and options.enable_lora  # implied, as --lora-modules
    assert options.limit_mm_per_prompt == {"image": 3}
    assert options.allowed_local_media_path == str(tmp_path)
    assert options.allowed_media_domains == ["a.example", "b.example"]
    bad = build_parser().parse_args(["serve", "--default-mm-loras", "{not json"])
    with pytest.raises(ConfigError, match=r"default_mm_loras must be a JSON object"):
        engine_args_from(bad)
