"""Find a model directory and load its config, tokenizer and weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from .. import huge_pages
from ..errors import ModelNotFoundError
from ..models import CausalLM, build_model
from ..models.registry import architecture_of


def resolve_model_path(model: str | None, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A local Hugging Face model directory for `model` (None = the embedded default); a Hub repo
    id is downloaded at `revision` (default: main) into `download_dir` (default: the HF cache)."""
    if model is None:
        from .embedded import embedded_model_dir

        return embedded_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {str(path)!r} has no config.json; point --model at a Hugging Face "
                "model directory (config.json, *.safetensors, tokenizer files)"
            )
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(
            f"model {model!r} is not a directory; give the path of a Hugging Face model directory "
            "or a Hub repo id like 'org/name' (or leave it out to use the embedded default)"
        )
    return _download_from_hub(model, revision, download_dir)


def _download_from_hub(repo_id: str, revision: str | None, download_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"],
            revision=revision, cache_dir=download_dir,
        )
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local directory and could not be downloaded from the "
            f"Hugging Face Hub ({type(exc).__name__}: {exc}); check the name, your network, or pass a local path"
        ) from exc
    return Path(local)


def load_config(path: Path) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"cannot read the model config in {str(path)!r}: {exc}") from exc
    architecture_of(config, str(path))  # refuse unsupported architectures before any weight is read
    return config


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from *.safetensors, or from *.bin read with weights_only=True."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelNotFoundError(f"model directory {str(path)!r} holds no *.safetensors or pytorch_model*.bin weights")
    for file in bins:
        yield from torch.load(str(file), map_location="cpu", weights_only=True).items()


def load_model(
    path: Path, config: PretrainedConfig, max_positions: int, dtype: torch.dtype, device: torch.device
) -> CausalLM:
    model = build_model(config, str(path), max_positions, dtype, device)
    try:
        model.load_weights(iter_checkpoint(path))
    except ValueError as exc:
        raise ModelNotFoundError(f"weights in {str(path)!r} do not fit its config: {exc}") from exc
    if device.type == "cpu":
        huge_pages.adopt_parameters(model)  # a decode step streams every weight: fewer TLB misses
    return model
