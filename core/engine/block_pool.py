"""The paged KV cache's block allocator: fixed-size blocks handed out and returned by id.

A released block is not cleared: its K/V stay until the next owner overwrites them. That is safe
because attention never lets a position a sequence has not written reach it (see
models/attention), whatever the position holds, NaN and Inf included.
"""

from __future__ import annotations

from ..errors import ConfigError


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ConfigError("the KV cache holds no block at all; raise kv_cache_memory_bytes")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        """Blocks still to allocate so that `num_tokens` fit, given `have` blocks already."""
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks with {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))
        block_ids.clear()
