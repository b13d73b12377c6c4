"""The `loraplex` command line: `loraplex serve` runs the OpenAI-compatible server, `loraplex generate`
runs prompts through the engine, with or without a LoRA adapter; `loraplex plugins` lists the
installed plugins and what became of them; `loraplex new-resolver NAME` lays out a resolver package."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from .entrypoints.cli_args import LORA, add_engine_arguments, add_serve_arguments, engine_args_from
from .errors import LoraplexError


def _add_lora_modules(llm, modules: list[dict[str, str]]) -> None:
    engine = llm.llm_engine
    for module in modules:  # ids from the catalog
        engine.add_lora(engine.lora_catalog.request_for(module["name"], module["path"], module.get("base_model_name")))


def _generate(args: argparse.Namespace) -> int:
    from .llm import LLM
    from .sampling_params import SamplingParams

    engine_args = engine_args_from(args, enable_lora=args.lora is not None)
    llm = LLM(**{field.name: getattr(engine_args, field.name) for field in dataclasses.fields(engine_args) if field.init})
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
    from . import envs
    from .plugins import list_plugins, plugin_failures, render_plugins

    statuses = list_plugins()
    print(render_plugins(statuses, as_json=args.json))
    failed = plugin_failures(statuses)
    if failed and (args.strict or envs.plugins_strict()):
        print(f"loraplex: error: strict mode: {len(failed)} plugin(s) failed or are not installed: "
              f"{', '.join(s.name for s in failed)} (see STATUS above)", file=sys.stderr)
        return 1
    return 0


def _new_resolver(args: argparse.Namespace) -> int:
    from .testing.template import write_resolver_package

    package = write_resolver_package(args.name, args.dir)
    print(f"created {package}: a resolver package whose conformance tests pass as generated; next:\n"
          f"  cd {package} && pip install -e '.[test]' && pytest")
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.ray:
        from .ray.application import run_on_local_ray

        return run_on_local_ray(args)
    from .entrypoints.openai.api_server import run_server

    return run_server(args)


def build_parser(engine_flags: bool = True) -> argparse.ArgumentParser:
    """The command line; `engine_flags=False` leaves out the flags of serve and generate, whose
    defaults need torch to read (so `loraplex plugins` starts fast)."""
    parser = argparse.ArgumentParser(prog="loraplex", description="Serve many LoRA adapters on one base model.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the OpenAI-compatible server (default model: the embedded SmolLM2-135M-Instruct)",
        description="Serve a model and its LoRA adapters over an OpenAI-compatible HTTP API (vLLM's flags).",
    )
    if engine_flags:
        add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)
    gen = commands.add_parser("generate", help="generate replies to prompts (default: a few chat prompts)")
    if engine_flags:
        add_engine_arguments(gen)[LORA].add_argument(
            "--lora", default=None, metavar="ADAPTER",
            help="the adapter every prompt uses: a --lora-modules name, an adapter directory, a Hub repo id, "
                 "or a name a resolver plugin finds (default: the base model; naming one turns LoRA on)",
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
    plugins.add_argument("--strict", action="store_true",
                         help="exit with status 1 when a plugin failed or VLLM_PLUGINS names one that is not installed "
                              "(also: LORAPLEX_PLUGINS_STRICT=1)")
    plugins.set_defaults(handler=_plugins)
    new = commands.add_parser("new-resolver", help="lay out a resolver package (entry point, plugin, conformance "
                                                   "tests that pass as generated)")
    new.add_argument("name", help="the resolver's short name, e.g. 'artifacts' (package loraplex-resolver-artifacts)")
    new.add_argument("--dir", default=".", help="where to create the package's folder (default: the current directory)")
    new.set_defaults(handler=_new_resolver)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(engine_flags=bool(argv) and argv[0] in ("serve", "generate")).parse_args(argv)
    try:
        return args.handler(args)
    except LoraplexError as exc:
        print(f"loraplex: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
