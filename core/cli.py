"""The `loraplex` command line: `loraplex generate` runs prompts through the engine; `loraplex plugins`
lists the installed plugins and what became of them."""

from __future__ import annotations

import argparse
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


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model_flag or args.model, dtype=args.dtype, device=args.device, seed=args.seed,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
    )


def _generate(args: argparse.Namespace) -> int:
    from .llm import LLM
    from .sampling_params import SamplingParams

    kwargs = _engine_kwargs(args)
    llm = LLM(kwargs.pop("model"), **kwargs)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.sampling_seed)
    prompts = args.prompt or ["What is the capital of France?", "Write a haiku about the sea.", "Give me three tips for learning to code."]
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
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
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="send prompts raw, without the chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--sampling-seed", type=int, default=None)
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
