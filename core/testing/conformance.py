"""`ResolverConformance`: the checks every LoRA resolver should pass, as a pytest mixin.

Subclass it in your resolver's tests and provide four fixtures (in the class, the module or a
conftest.py):

    resolver         your LoRAResolver instance, its source already holding `known_lora_name`
    base_model_name  the base model name passed to resolve_lora
    known_lora_name  an adapter your source holds, made for the fixture `base_model_path`
    publish_adapter  a function `publish(lora_name, adapter_dir)` that makes the source of
                     `resolver` hold the files of `adapter_dir` under `lora_name`, replacing
                     whatever it held there, as your users publish a new version (copy a folder,
                     upload to a bucket, push to a repo, pack an archive...)

and, optionally, override in the class:

    escaping_lora_names   names that try to leave your source (default: DEFAULT_ESCAPING_NAMES)
    unknown_lora_name     a name your source does not hold (default: "loraplex-conformance-missing")
    fresh_lora_name       a name `publish_adapter` can publish to that nothing resolved before
                          (default: "loraplex-conformance-fresh")
    serves_replaced_adapters  class attribute: True (default) if, once an adapter is replaced at
                          the source, the next resolve serves the new files; False if the first
                          copy fetched keeps being served (say in your docs how to refresh it)
    max_loop_block_seconds  class attribute: fail if one resolve blocks the event loop longer
                          (default None: not checked; timing checks belong in CI you control)

`base_model_path`, `lora_adapter_dir` and `other_lora_adapter_dir` come from loraplex's pytest
plugin (`loraplex.testing.pytest_plugin`, loaded automatically once loraplex is installed): a tiny
random Llama and two real PEFT adapters for it. Copy or upload them into your source in your
`resolver` fixture. The tests check that

* `resolve_lora` is a coroutine function of a `LoRAResolver`;
* the known name resolves to a LoRARequest with that `lora_name`, an integer id >= 1 and a
  `lora_path` directory holding `adapter_config.json` and `adapter_model.safetensors` (or
  `.bin`), the same path when asked again;
* loraplex's engine accepts that adapter on the tiny base model (`LLMEngine.add_lora`);
* an unknown name returns None (not an exception);
* every escaping name returns None or raises ValueError / LoRAError, never a LoRARequest;
* ten concurrent resolves of the known name (`asyncio.gather`) all succeed with one path;
* a broken adapter at the source (adapter_config.json not JSON; no weights file) fails through
  loraplex's resolution with an error naming it, and once the source holds a good adapter again,
  the next resolve serves it: nothing broken was kept under the adapter's name;
* an adapter replaced at the source is served as `serves_replaced_adapters` says;
* (with `max_loop_block_seconds`) a resolve never blocks the event loop longer than that.

Example, for a resolver that serves adapters from a directory:

    import shutil
    import pytest
    from loraplex.testing import ResolverConformance
    from my_package import DirectoryResolver

    class TestDirectoryResolver(ResolverConformance):
        @pytest.fixture
        def resolver(self, tmp_path, lora_adapter_dir):
            shutil.copytree(lora_adapter_dir, tmp_path / "root" / "my-adapter")
            (tmp_path / "x").mkdir()  # a decoy where "../x" would land
            return DirectoryResolver(tmp_path / "root")

        @pytest.fixture
        def publish_adapter(self, tmp_path):
            def publish(lora_name, adapter_dir):
                shutil.rmtree(tmp_path / "root" / lora_name, ignore_errors=True)
                shutil.copytree(adapter_dir, tmp_path / "root" / lora_name)
            return publish

        @pytest.fixture
        def base_model_name(self, base_model_path):
            return str(base_model_path)

        @pytest.fixture
        def known_lora_name(self):
            return "my-adapter"

Each test runs its coroutines in a fresh event loop (`asyncio.run`), so a function-scoped
`resolver` fixture sees one loop per test. Needs `pytest` and `peft` (`pip install loraplex[testing]`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from ..errors import LoRAError
from ..lora.request import LoRARequest
from ..resolver import LoRAResolver

__all__ = ["DEFAULT_ESCAPING_NAMES", "ResolverConformance"]

DEFAULT_ESCAPING_NAMES: tuple[str, ...] = (
    "../x",
    "/abs",
    "a/../../b",
    "..",
    "../",
    "./../x",
    "/etc",
    "x/../../x",
)

_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _config_not_json(adapter: Path, out: Path) -> Path:
    shutil.copytree(adapter, out)
    (out / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')  # cut short
    return out


def _no_weights(adapter: Path, out: Path) -> Path:
    shutil.copytree(adapter, out, ignore=shutil.ignore_patterns(*_WEIGHT_FILES))
    return out


# what a source may hold under an adapter's name that loraplex must refuse
_BREAKAGES: dict[str, Callable[[Path, Path], Path]] = {"config-not-json": _config_not_json, "no-weights": _no_weights}


class ResolverConformance:
    """pytest mixin: subclass it and provide `resolver`, `base_model_name`, `known_lora_name`, `publish_adapter`."""

    max_loop_block_seconds: float | None = None
    serves_replaced_adapters: bool = True

    # ---- fixtures the mixin provides (override in the class if you need to) -----------------------

    @pytest.fixture
    def escaping_lora_names(self) -> Sequence[str]:
        return DEFAULT_ESCAPING_NAMES

    @pytest.fixture
    def unknown_lora_name(self) -> str:
        return "loraplex-conformance-missing"

    @pytest.fixture
    def fresh_lora_name(self) -> str:
        return "loraplex-conformance-fresh"

    @pytest.fixture
    def publish_adapter(self) -> Callable[[str, Path], None]:
        pytest.fail(
            "ResolverConformance needs a `publish_adapter` fixture: a function publish(lora_name, adapter_dir) that "
            "makes your resolver's source hold the files of adapter_dir under lora_name, replacing what it held there "
            "(see loraplex.testing.conformance)"
        )

    @pytest.fixture
    def conformance_engines(self, base_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
        """`engine_for(base_model_name)`: an LLMEngine on the tiny model serving that name, cached."""

        def engine_for(base_model_name: str):
            return _session_cached(tmp_path_factory, f"engine:{base_model_name}",
                                   lambda root: _engine(base_model_path, base_model_name))

        return engine_for

    # ---- the checks -------------------------------------------------------------------------------

    def test_resolve_lora_is_a_coroutine(self, resolver: LoRAResolver) -> None:
        assert isinstance(resolver, LoRAResolver), f"{resolver!r} is not a loraplex LoRAResolver"
        assert inspect.iscoroutinefunction(resolver.resolve_lora), (
            f"{type(resolver).__name__}.resolve_lora must be `async def`"
        )

    def test_known_name_resolves_to_an_adapter_directory(self, resolver, base_model_name, known_lora_name) -> None:
        async def twice():
            first = await resolver.resolve_lora(base_model_name, known_lora_name)
            second = await resolver.resolve_lora(base_model_name, known_lora_name)
            return first, second

        first, second = asyncio.run(twice())
        _check_request(first, known_lora_name)
        _check_request(second, known_lora_name)
        assert Path(second.lora_path).resolve() == Path(first.lora_path).resolve(), (
            f"resolving {known_lora_name!r} twice gave two paths: {first.lora_path!r}, {second.lora_path!r}"
        )

    def test_known_adapter_loads_in_loraplex(self, resolver, base_model_name, known_lora_name, conformance_engines) -> None:
        request = asyncio.run(resolver.resolve_lora(base_model_name, known_lora_name))
        _check_request(request, known_lora_name)
        engine = conformance_engines(base_model_name)
        try:
            engine.add_lora(request)  # raises (naming the reason) if loraplex refuses the adapter
            assert request.lora_name in engine.list_adapters()
        finally:
            engine.remove_lora(request.lora_name)

    def test_unknown_name_returns_none(self, resolver, base_model_name, unknown_lora_name) -> None:
        try:
            result = asyncio.run(resolver.resolve_lora(base_model_name, unknown_lora_name))
        except Exception as exc:  # noqa: BLE001 - reported as the failure
            raise AssertionError(
                f"resolving {unknown_lora_name!r}, which the source does not hold, must give None, not raise "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        assert result is None, f"resolving {unknown_lora_name!r}, which the source does not hold, must give None; got {result!r}"

    def test_escaping_names_never_resolve(self, resolver, base_model_name, escaping_lora_names) -> None:
        async def outcome(name: str) -> str | None:
            try:
                result = await resolver.resolve_lora(base_model_name, name)
            except (ValueError, LoRAError):
                return None
            except Exception as exc:  # noqa: BLE001 - reported below
                return f"{name!r} raised {type(exc).__name__}: {exc} (raise ValueError or LoRAError, or return None)"
            if result is None:
                return None
            path = getattr(result, "lora_path", result)
            return f"{name!r} resolved to {path!r}: a name that leaves the source must give None or ValueError"

        async def all_outcomes() -> list[str | None]:
            return [await outcome(name) for name in escaping_lora_names]

        problems = [p for p in asyncio.run(all_outcomes()) if p]
        assert not problems, "; ".join(problems)

    def test_concurrent_resolves_agree(self, resolver, base_model_name, known_lora_name) -> None:
        async def gather():
            return await asyncio.gather(*(resolver.resolve_lora(base_model_name, known_lora_name) for _ in range(10)))

        results = asyncio.run(gather())
        for request in results:
            _check_request(request, known_lora_name)
        paths = {str(Path(r.lora_path).resolve()) for r in results}
        assert len(paths) == 1, f"10 concurrent resolves of {known_lora_name!r} gave different paths: {sorted(paths)}"

    @pytest.mark.parametrize("breakage", sorted(_BREAKAGES))
    def test_a_broken_adapter_fails_clearly_and_its_fix_is_served(
        self, resolver, base_model_name, fresh_lora_name, publish_adapter, lora_adapter_dir, conformance_engines,
        tmp_path_factory, monkeypatch, breakage,
    ) -> None:
        resolution = _resolution(resolver, base_model_name, conformance_engines(base_model_name), monkeypatch)
        broken = _BREAKAGES[breakage](lora_adapter_dir, tmp_path_factory.mktemp("broken") / "adapter")
        publish_adapter(fresh_lora_name, broken)
        try:
            found = asyncio.run(resolution.resolve(fresh_lora_name))
        except LoRAError as exc:
            assert fresh_lora_name in str(exc), f"the error for a broken adapter must name it: {exc}"
        else:
            pytest.fail(f"a broken adapter ({breakage}) at the source resolved to {found.lora_path!r} and passed checks")
        publish_adapter(fresh_lora_name, lora_adapter_dir)  # fixed at the source
        try:
            fixed = asyncio.run(resolution.resolve(fresh_lora_name))
        except LoRAError as exc:
            pytest.fail(
                f"the source was fixed after holding a broken adapter ({breakage}), but {fresh_lora_name!r} still fails: "
                f"{exc}. A resolver that keeps copies must never keep a broken one under the adapter's name: check "
                "what it fetched (config parses, weights present) before moving it into place"
            )
        _check_request(fixed, fresh_lora_name)
        _check_weights(fixed, lora_adapter_dir, "the fixed adapter")

    def test_a_replaced_adapter_is_served_as_documented(
        self, resolver, base_model_name, fresh_lora_name, publish_adapter, lora_adapter_dir, other_lora_adapter_dir,
    ) -> None:
        publish_adapter(fresh_lora_name, lora_adapter_dir)
        first = asyncio.run(resolver.resolve_lora(base_model_name, fresh_lora_name))
        _check_request(first, fresh_lora_name)
        _check_weights(first, lora_adapter_dir, "the published adapter")
        publish_adapter(fresh_lora_name, other_lora_adapter_dir)
        second = asyncio.run(resolver.resolve_lora(base_model_name, fresh_lora_name))
        _check_request(second, fresh_lora_name)
        if self.serves_replaced_adapters:
            _check_weights(second, other_lora_adapter_dir, "the replacement (serves_replaced_adapters = True)")
        else:
            _check_weights(second, lora_adapter_dir, "the first copy fetched (serves_replaced_adapters = False)")

    def test_resolve_does_not_block_the_event_loop(self, resolver, base_model_name, known_lora_name, unknown_lora_name) -> None:
        if self.max_loop_block_seconds is None:
            pytest.skip("set max_loop_block_seconds on the test class to check how long resolve_lora blocks the loop")
        limit = self.max_loop_block_seconds

        async def longest_block() -> float:
            worst = 0.0
            done = asyncio.Event()

            async def ticker() -> None:
                nonlocal worst
                last = time.perf_counter()
                while not done.is_set():
                    await asyncio.sleep(0.001)
                    now = time.perf_counter()
                    worst = max(worst, now - last)
                    last = now

            tick = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            try:
                await resolver.resolve_lora(base_model_name, known_lora_name)
                await resolver.resolve_lora(base_model_name, unknown_lora_name)
            finally:
                done.set()
                await tick
            return worst

        worst = asyncio.run(longest_block())
        assert worst <= limit, (
            f"resolve_lora blocked the event loop for {worst:.3f} s (limit {limit} s); move blocking I/O to "
            "asyncio.to_thread or an async client"
        )


# ---- session caches (plain fixtures + a cache keyed by the session's temp dir work on any pytest) ----

_CACHE: dict[tuple[str, str], Any] = {}


def _session_cached(tmp_path_factory: pytest.TempPathFactory, key: str, build) -> Any:
    root = tmp_path_factory.getbasetemp() / "loraplex-conformance"
    cache_key = (str(root), key)
    if cache_key not in _CACHE:
        root.mkdir(parents=True, exist_ok=True)
        _CACHE[cache_key] = build(root)
    return _CACHE[cache_key]


def _engine(base_model_path: Path, base_model_name: str):
    from ..config import EngineArgs
    from ..engine.llm_engine import LLMEngine

    args = EngineArgs(model=str(base_model_path), served_model_name=base_model_name, device="cpu", enable_lora=True,
                      max_loras=1, max_lora_rank=64, max_model_len=64, kv_cache_memory_bytes=1 << 20)
    return LLMEngine.from_engine_args(args)


def _check_request(request: Any, lora_name: str) -> None:
    assert isinstance(request, LoRARequest), f"resolving {lora_name!r} must give a LoRARequest; got {request!r}"
    assert request.lora_name == lora_name, f"the LoRARequest names {request.lora_name!r}, not {lora_name!r}"
    assert isinstance(request.lora_int_id, int) and not isinstance(request.lora_int_id, bool) and request.lora_int_id >= 1, (
        f"lora_int_id must be an integer >= 1; got {request.lora_int_id!r}"
    )
    path = Path(request.lora_path)
    assert path.is_dir(), f"lora_path {request.lora_path!r} is not a local directory"
    assert (path / "adapter_config.json").is_file(), f"{request.lora_path!r} has no adapter_config.json"
    assert any((path / name).is_file() for name in _WEIGHT_FILES), (
        f"{request.lora_path!r} has no adapter weights ({' or '.join(_WEIGHT_FILES)})"
    )


def _check_weights(request: LoRARequest, expected_dir: Path, what: str) -> None:
    """The adapter at `request.lora_path` has `expected_dir`'s weights, byte for byte."""
    path = Path(request.lora_path)
    name = next(n for n in _WEIGHT_FILES if (Path(expected_dir) / n).is_file())
    served = path / name
    assert served.is_file() and served.read_bytes() == (Path(expected_dir) / name).read_bytes(), (
        f"resolving {request.lora_name!r} served {request.lora_path!r}, which does not hold {what}'s weights"
    )
    json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))


def _resolution(resolver: LoRAResolver, base_model_name: str, engine: Any, monkeypatch: pytest.MonkeyPatch):
    """loraplex's own resolution over `resolver` alone, checking found adapters as the server does
    (the engine's catalog reads them), remembering no misses."""
    from ..lora.resolution import LoRAResolution
    from ..resolver import _LoRAResolverRegistry

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    registry = _LoRAResolverRegistry()
    registry.register_resolver("resolver-under-test", resolver)
    return LoRAResolution(registry, base_model_name, lambda request: asyncio.to_thread(engine.lora_catalog.read, request),
                          miss_ttl=0)
