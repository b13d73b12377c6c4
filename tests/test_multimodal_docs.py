"""docs/multimodal.md: its offline example runs as written, in a fresh directory and process."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "multimodal.md"


def test_the_offline_example_runs(tmp_path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    example = next(block for block in blocks if "tiny_llava_model" in block)
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 3 and all(len(tokens) == 8 for tokens in lines)
    assert lines[0] != lines[1]  # the image's default adapter and the adapter the request named differ
    assert (tmp_path / "tiny-llava" / "config.json").is_file() and (tmp_path / "vision-lora").is_dir()
