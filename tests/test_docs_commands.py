"""Every `loraplex ...` command the docs show exists and parses; the ones safe offline run.

Commands are taken from code blocks (lines starting with `loraplex `) and inline code spans of
docs/*.md, README.md, resolvers/*/README.md and plugins_example/README.md. `serve` and `generate`
are parsed by the real parser (their `--help` forms run); `plugins` and `new-resolver` run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("resolvers/*/README.md"),
               ROOT / "plugins_example" / "README.md"])
_INLINE = re.compile(r"`(loraplex [^`]+)`")
_PLACEHOLDER = re.compile(r"^\[?[A-Z][A-Z_]*\]?$")  # MODEL, [MODEL], NAME


def doc_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        in_block = False
        for line in doc.read_text().replace("\\\n", " ").splitlines():  # continued lines joined
            if line.startswith("```"):
                in_block = not in_block
                continue
            if in_block and line.startswith("loraplex "):
                found.append((doc.relative_to(ROOT).as_posix(), line.split("  #")[0].split(" # ")[0].strip()))
            elif not in_block:
                found += [(doc.relative_to(ROOT).as_posix(), span) for span in _INLINE.findall(line)]
    return sorted(set(found))


COMMANDS = doc_commands()


def argv_of(command: str, tmp_path: Path) -> list[str]:
    argv = [word for word in shlex.split(command)[1:] if not _PLACEHOLDER.match(word)]
    if argv[:1] == ["new-resolver"]:
        argv = ["new-resolver", "demo", "--dir", str(tmp_path)]  # NAME stands for the author's name
    return argv


def test_the_docs_show_commands_of_every_kind() -> None:
    subcommands = {shlex.split(command)[1] for _, command in COMMANDS}
    assert {"serve", "plugins", "new-resolver", "generate"} <= subcommands, subcommands


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c}" for d, c in COMMANDS])
def test_a_documented_command_exists_and_does_what_the_doc_says(doc: str, command: str, tmp_path, capsys) -> None:
    argv = argv_of(command, tmp_path)
    parser = build_parser()
    assert argv and argv[0] in parser._subparsers._group_actions[0].choices, f"{doc}: {command!r}: no such command"
    if argv[0] in ("serve", "generate"):
        if "--help" in argv:
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            assert exit_info.value.code == 0 and "usage: loraplex " + argv[0] in capsys.readouterr().out
        else:
            args = parser.parse_args(argv)  # every flag parses (a bad one exits 2), nothing starts
            assert args.handler.__name__ == f"_{argv[0]}"
        return
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "LORAPLEX_PLUGINS_STRICT")}
    result = subprocess.run([sys.executable, "-m", "loraplex.cli", *argv], capture_output=True, text=True, env=env,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, f"{doc}: {command!r} exited {result.returncode}: {result.stderr}"
    if argv[0] == "plugins":
        if "--json" in argv:
            assert set(json.loads(result.stdout)) >= {"plugins", "resolvers", "vllm_plugins", "failed"}
        else:
            assert "LoRA resolvers, in the order they are asked" in result.stdout
    else:
        assert (tmp_path / "loraplex-resolver-demo" / "tests" / "test_conformance.py").is_file()
