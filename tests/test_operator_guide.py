"""The operator guide's slot-size figures are the engine's: docs/operator-guide.md's table of bytes
per device slot for the embedded model equals what the engine allocates."""

from __future__ import annotations

import re
from pathlib import Path

import torch

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "operator-guide.md"
_ROW = re.compile(r"^\| (\d+)(?: \(the default\))? \| ([\d,]+) bytes .*\| ([\d,]+) bytes", re.M)


def test_the_slot_size_table_is_what_the_engine_allocates(embedded_model_path: Path) -> None:
    from loraplex import LLM

    rows = [(int(rank), int(f32.replace(",", "")), int(bf16.replace(",", ""))) for rank, f32, bf16 in _ROW.findall(GUIDE.read_text())]
    assert [rank for rank, _, _ in rows] == [8, 16, 64]
    for lora_dtype, column in (("auto", 1), ("bfloat16", 2)):
        llm = LLM(str(embedded_model_path), enable_lora=True, max_loras=1, max_lora_rank=8, lora_dtype=lora_dtype,
                  max_model_len=256, kv_cache_memory_bytes=16 << 20)
        storage = llm.llm_engine.lora_manager.storage  # [1, numel]
        assert storage.dtype == (torch.float32 if lora_dtype == "auto" else torch.bfloat16)
        per_rank = storage.numel() * storage.element_size() // 8  # slots grow linearly with max_lora_rank
        assert per_rank * 8 == storage.numel() * storage.element_size()
        assert [row[column] for row in rows] == [per_rank * rank for rank, _, _ in rows]
        assert "305,280 x `max_lora_rank` values" in GUIDE.read_text() and storage.numel() == 305_280 * 8
        del llm, storage
