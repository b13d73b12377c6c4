"""vLLM's engine arguments that loraplex accepts for compatibility, and what it does with each.

Code and command lines written for vLLM pass arguments such as `enforce_eager=True` or
`tensor_parallel_size=1` out of habit. `VllmCompatArgs` declares them (EngineArgs inherits it,
so they are keywords of `EngineArgs`, `LLM(...)` and flags of `loraplex serve`), and
`VLLM_ARGS` says, for each, what loraplex does: a value that changes nothing passes silently; a
value loraplex cannot act on but can run without is accepted with one logged INFO line per
engine; a value whose meaning loraplex cannot honour (two GPUs, a quantized checkpoint) is
refused with a ConfigError naming the argument and the fix. docs/vllm-compatibility.md is the
user-facing table.

This module stays free of torch: `loraplex serve --help` reads the help texts from it.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["VLLM_ARGS", "VllmArg", "VllmCompatArgs", "check_vllm_args", "unknown_argument_error"]

logger = logging.getLogger(__name__)


def _never(value: Any) -> bool:
    return False


def _given(value: Any) -> bool:
    return value is not None


def _unless(*allowed: Any) -> Callable[[Any], bool]:
    """True for a value other than `allowed` (bools compare as bools, not as 0 / 1)."""
    return lambda value: not any(value == a and type(value) is type(a) for a in allowed)


_ONE_DEVICE = ("loraplex runs on one device", "leave it at 1 (or out); to use several GPUs, start one loraplex "
               "per GPU with device='cuda:N'")


@dataclass(frozen=True)
class VllmArg:
    """What loraplex does with one vLLM argument.

    types: the Python types it takes (None is always allowed when the default is None).
    does: what loraplex does with it, one sentence (help text and docs).
    ignored(value): accepted, logged once, changes nothing. refused(value): a ConfigError
    ending with `fix`.
    """

    types: tuple[type, ...]
    does: str
    ignored: Callable[[Any], bool] = _never
    refused: Callable[[Any], bool] = _never
    fix: str = ""


# name -> policy; the defaults are VllmCompatArgs' (None: "not given", for arguments whose vLLM
# default is only a number loraplex has no use for).
VLLM_ARGS: dict[str, VllmArg] = {
    "tensor_parallel_size": VllmArg((int,), "1 is what loraplex does; more is refused (one device)",
                                    refused=_unless(1), fix=" - ".join(_ONE_DEVICE)),
    "pipeline_parallel_size": VllmArg((int,), "1 is what loraplex does; more is refused (one device)",
                                      refused=_unless(1), fix=" - ".join(_ONE_DEVICE)),
    "data_parallel_size": VllmArg((int,), "1 is what loraplex does; more is refused (one device)",
                                  refused=_unless(1), fix=" - ".join(_ONE_DEVICE)),
    "enforce_eager": VllmArg((bool,), "honoured: loraplex always runs eagerly (it captures no CUDA graphs)"),
    "max_seq_len_to_capture": VllmArg((int,), "ignored: loraplex captures no CUDA graphs", ignored=_given),
    "compilation_config": VllmArg((int, str, dict), "ignored: loraplex does not compile the model", ignored=_given),
    "trust_remote_code": VllmArg((bool,), "ignored: loraplex runs its own implementation of each supported "
                                          "architecture, never code from the model repository",
                                 ignored=_unless(False)),
    "swap_space": VllmArg((int, float), "ignored: a preempted request is recomputed, so no CPU swap space "
                                           "is kept", ignored=_given),
    "cpu_offload_gb": VllmArg((int, float), "0 only: every weight stays on the device",
                              refused=_unless(0, 0.0),
                              fix="loraplex keeps every weight on the device; leave cpu_offload_gb at 0 and choose "
                                  "a smaller model or a smaller dtype (dtype='bfloat16')"),
    "disable_log_stats": VllmArg((bool,), "honoured: loraplex logs no periodic stats (they are at /metrics)"),
    "disable_custom_all_reduce": VllmArg((bool,), "honoured: one device, no all-reduce to disable"),
    "distributed_executor_backend": VllmArg((str,), "ignored: one device in one process", ignored=_given),
    "worker_cls": VllmArg((str,), "'auto' only: the engine is loraplex's own", refused=_unless("auto"),
                          fix="loraplex runs its own engine, so a vLLM worker class cannot be plugged in; "
                              "leave worker_cls at 'auto'"),
    "num_scheduler_steps": VllmArg((int,), "ignored: every step is scheduled (as in vLLM's V1 engine)",
                                   ignored=_unless(1)),
    "use_v2_block_manager": VllmArg((bool,), "ignored: loraplex has one block manager", ignored=_unless(True)),
    "quantization": VllmArg((str,), "'gguf' (CPU, float32): decode steps read the model's GGUF weights (Q4_1, "
                                    "Q8_0) as stored; other methods are refused",
                            refused=_unless("gguf"),
                            fix="loraplex serves float checkpoints, and on the CPU the weights of the model's GGUF "
                                "file with quantization='gguf'; leave quantization unset or pass 'gguf'"),
    "kv_cache_dtype": VllmArg((str,), "'auto' only: the KV cache is kept in the model's dtype",
                              refused=_unless("auto"),
                              fix="the KV cache is kept in the model's dtype; leave kv_cache_dtype at 'auto' "
                                  "(dtype= sets both)"),
    "load_format": VllmArg((str,), "'auto', 'safetensors' or 'pt': loraplex reads *.safetensors, else "
                                   "pytorch_model*.bin", refused=_unless("auto", "safetensors", "pt"),
                           fix="loraplex reads *.safetensors (or pytorch_model*.bin) checkpoints; leave load_format "
                               "at 'auto'"),
    "tokenizer_mode": VllmArg((str,), "'auto' or 'hf': the model's Hugging Face tokenizer",
                              refused=_unless("auto", "hf"),
                              fix="loraplex loads the model's Hugging Face tokenizer; leave tokenizer_mode at 'auto' "
                                  "(or point tokenizer= at another tokenizer directory)"),
    "revision": VllmArg((str,), "honoured: the Hub revision (branch, tag or commit) of the model"),
    "download_dir": VllmArg((str,), "honoured: where a Hub model is downloaded (default: the Hugging Face cache)"),
    "max_logprobs": VllmArg((int,), "up to 20 (the most logprobs a request may ask for); a lower value is "
                                    "ignored", ignored=lambda v: 0 <= v < 20, refused=lambda v: v < 0 or v > 20,
                            fix="loraplex returns at most 20 logprobs per token (vLLM's default); give a value "
                                "in [0, 20]"),
    "fully_sharded_loras": VllmArg((bool,), "ignored: one device, nothing to shard", ignored=_unless(False)),
    "long_lora_scaling_factors": VllmArg((tuple, list, str), "refused: loraplex has no long-context LoRA (nor "
                                                             "has vLLM since 0.10)", refused=_given,
                                         fix="leave long_lora_scaling_factors unset and serve adapters trained "
                                             "for the model's own context length"),
    "lora_extra_vocab_size": VllmArg((int,), "ignored: adapters that add tokens are refused when loaded",
                                     ignored=_given),
    "enable_lora_bias": VllmArg((bool,), "False only: adapters with bias are refused when loaded",
                                refused=_unless(False),
                                fix="loraplex serves LoRA adapters without bias terms; leave enable_lora_bias off "
                                    "and retrain with bias='none'"),
}


@dataclass(kw_only=True)
class VllmCompatArgs:
    """vLLM's engine arguments that loraplex accepts (see VLLM_ARGS for what each does).

    Typed for the command line (`loraplex serve --compilation-config '{...}'`); from Python,
    compilation_config may also be a dict or a level, long_lora_scaling_factors a tuple.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enforce_eager: bool = False
    max_seq_len_to_capture: int | None = None
    compilation_config: str | None = None
    trust_remote_code: bool = False
    swap_space: float | None = None
    cpu_offload_gb: float = 0.0
    disable_log_stats: bool = False
    disable_custom_all_reduce: bool = False
    distributed_executor_backend: str | None = None
    worker_cls: str = "auto"
    num_scheduler_steps: int = 1
    use_v2_block_manager: bool = True
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    load_format: str = "auto"
    tokenizer_mode: str = "auto"
    revision: str | None = None
    download_dir: str | None = None
    max_logprobs: int = 20
    fully_sharded_loras: bool = False
    long_lora_scaling_factors: str | None = None
    lora_extra_vocab_size: int | None = None
    enable_lora_bias: bool = False


def check_vllm_args(args: VllmCompatArgs) -> None:
    """Type-check every vLLM argument, refuse what cannot be honoured, and log (once, one line)
    those accepted and ignored."""
    ignored = []
    for name, policy in VLLM_ARGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if not isinstance(value, policy.types) or (isinstance(value, bool) and bool not in policy.types):
            kinds = " or ".join(t.__name__ for t in policy.types)
            raise ConfigError(f"{name} must be {kinds}; got {value!r}")
        if policy.refused(value):
            raise ConfigError(f"{name}={value!r} cannot be honoured: {policy.fix}")
        if policy.ignored(value):
            ignored.append(f"{name}={value!r} ({policy.does.removeprefix('ignored: ')})")
    if ignored:
        logger.info("accepted for vLLM compatibility and ignored: %s", "; ".join(ignored))


def unknown_argument_error(caller: str, name: str, known: Iterable[str]) -> ConfigError:
    """The error for a keyword that is not an engine option, with the closest known names."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return ConfigError(
        f"{caller} got an unknown argument {name!r}: it is not an engine option; {hint}"
        "see EngineArgs for loraplex's options and docs/vllm-compatibility.md for vLLM's"
    )
