"""The `loraplex` command line: `loraplex generate` runs prompts through the engine, with or without
a LoRA adapter; `loraplex plugins` lists the installed plugins and what became of them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import LoraplexError


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="model directory or Hub repo id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)


def _lora_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """vLLM's LoRA flags. Naming an adapter (--lora-modules, --lora) turns LoRA on by itself."""
    group = parser.add_argument_group("LoRA adapters")
    group.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (implied by --lora-modules and --lora)")
    group.add_argument("--max-loras", type=int, default=None, help="adapters in device slots at once (default 1)")
    group.add_argument("--max-lora-rank", type=int, default=None, help="the highest adapter rank accepted (default 16)")
    group.add_argument("--max-cpu-loras", type=int, default=None, help="adapters cached on the CPU (default: max-loras)")
    group.add_argument(
        "--lora-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype adapters are stored in (default auto: the model's; bfloat16 streams half the bytes on CPU)",
    )
    group.add_argument(
        "--lora-modules", nargs="+", default=[], type=_lora_module, metavar="NAME=PATH",
        help='adapters to add at start: NAME=PATH, or JSON {"name": ..., "path": ..., "base_model_name": ...}',
    )
    return group


def _lora_module(text: str) -> dict[str, str]:
    """One --lora-modules entry, as vLLM spells it: `name=path` or a JSON object."""
    if text.lstrip().startswith("{"):
        try:
            module = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc})") from None
        keys = set(module) if isinstance(module, dict) else set()
        if not {"name", "path"} <= keys <= {"name", "path", "base_model_name"}:
            raise argparse.ArgumentTypeError(
                f'{text!r}: a JSON entry needs "name" and "path" (and optionally "base_model_name"), nothing else'
            )
        return {key: str(value) for key, value in module.items()}
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH; write e.g. sql=/adapters/sql-lora")
    return {"name": name, "path": path}


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(
        model=args.model_flag or args.model, dtype=args.dtype, device=args.device, seed=args.seed,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
    )
    lora = {"max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank, "max_cpu_loras": args.max_cpu_loras,
            "lora_dtype": args.lora_dtype}
    kwargs.update({key: value for key, value in lora.items() if value is not None})
    kwargs["enable_lora"] = args.enable_lora or bool(args.lora_modules) or args.lora is not None
    return kwargs


def _add_lora_modules(llm, modules: list[dict[str, str]]) -> None:
    from .lora.request import LoRARequest

    for lora_id, module in enumerate(modules, start=1):
        request = LoRARequest(module["name"], lora_id, module["path"], module.get("base_model_name"))
        llm.llm_engine.add_lora(request)


def _generate(args: argparse.Namespace) -> int:
    from .llm import LLM
    from .sampling_params import SamplingParams

    kwargs = _engine_kwargs(args)
    llm = LLM(kwargs.pop("model"), **kwargs)
    _add_lora_modules(llm, args.lora_modules)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.sampling_seed, ignore_eos=args.ignore_eos)
    prompts = args.prompt or ["What is the capital of France?", "Write a haiku about the sea.", "Give me three tips for learning to code."]
    if args.chat:
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        outputs = llm.chat(conversations, params, use_tqdm=False, lora_request=args.lora)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=args.lora)
    for prompt, out in zip(prompts, outputs, strict=True):
        print(f"### {prompt}\n{out.outputs[0].text.strip()}\n")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from .plugins import list_plugins, render_plugins

    print(render_plugins(list_plugins(), as_json=args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Serve many LoRA adapters on one base model.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate replies to prompts (default: a few chat prompts)")
    _engine_options(gen)
    _lora_options(gen).add_argument(
        "--lora", default=None, metavar="ADAPTER",
        help="the adapter every prompt uses: a --lora-modules name, an adapter directory, a Hub repo id, "
             "or a name a resolver plugin finds (default: the base model)",
    )
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="send prompts raw, without the chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens")
    gen.set_defaults(handler=_generate)
    plugins = commands.add_parser("plugins", help="list installed plugins: package, version, allowed by VLLM_PLUGINS, "
                                                  "loaded or why not, resolvers registered")
    plugins.add_argument("--json", action="store_true", help="print the report as JSON")
    plugins.set_defaults(handler=_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LoraplexError as exc:
        print(f"loraplex: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
