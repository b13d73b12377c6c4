"""The paged KV cache's block allocator: ref-counted blocks, and the prefix cache over them.

A block is handed out with one reference; a sequence that reuses a cached block takes another.
With prefix caching, a full block is registered under the hash of its content (see
`block_hash`); when its last reference goes it stays cached, evictable, and is handed out again
only when no never-cached block is left, least recently released first. So allocation never
fails while evictable blocks exist, and a later request with the same prefix finds them.

A released block is not cleared: its K/V stay until the next owner overwrites them. That is safe
because attention never lets a position a sequence has not written (or found cached under its
own hash) reach it (see models/attention), whatever the position holds, NaN and Inf included.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError

BlockHash = bytes


def block_hash(parent: BlockHash | None, adapter: Hashable, token_ids: Sequence[int],
               extra: tuple[bytes, ...] = ()) -> BlockHash:
    """The key of a full block: its tokens, everything before them (the parent's hash), the
    weights that computed its K/V (`adapter`: None for the base model, else (name, version)) and
    `extra`: the content hashes of the images whose placeholder tokens it holds (placeholder
    tokens are the same for every image; the K/V are not).

    SHA-256 over an exact serialisation, not Python's hash(): a collision would serve one
    request another's K/V, so the key must be collision-resistant across adapters too."""
    key = (parent, adapter, tuple(token_ids), extra) if extra else (parent, adapter, tuple(token_ids))
    return hashlib.sha256(pickle.dumps(key, protocol=5)).digest()


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache, and how many of them were found."""

    queries: int = 0
    hits: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ConfigError("the KV cache holds no block at all; raise kv_cache_memory_bytes")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # never cached: a stack, pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest release first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, BlockHash] = {}  # block -> its registered hash
        self._cached: dict[BlockHash, int] = {}  # hash -> block

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now: never-cached ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (in use or evictable)."""
        return len(self._cached)

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        """Blocks still to allocate so that `num_tokens` fit, given `have` blocks already."""
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} KV blocks with {self.num_free} free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently released cached block
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, block_ids: list[int]) -> None:
        # in reverse: a sequence's tail blocks (shared by fewest prefixes) are evicted first
        for block in reversed(block_ids):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_ids.clear()

    # ---- the prefix cache ------------------------------------------------------------------------

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (no reference taken)."""
        if not self.enable_caching:
            return []
        blocks = []
        for key in hashes:
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_evictable(self, block_ids: Sequence[int]) -> int:
        """How many of these cached blocks sit unreferenced (taking them lowers num_free)."""
        return sum(1 for block in block_ids if self._refs[block] == 0)

    def take(self, block_ids: Sequence[int]) -> None:
        """Take a reference to cached blocks found by `lookup`."""
        for block in block_ids:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1

    def cache(self, block: int, key: BlockHash) -> None:
        """Register a full block, whose K/V are computed by the current step at the latest."""
        if not self.enable_caching or block in self._hash_of or key in self._cached:
            return  # same content computed twice (e.g. two samples decoding alike): the first is kept
        self._hash_of[block] = key
        self._cached[key] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their K/V are no longer trusted); blocks in use stay in use."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._hash_of.clear()
        self._cached.clear()
