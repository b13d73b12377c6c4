"""Attention over a paged KV cache, in plain torch (runs on CPU and GPU alike).

A step's tokens are flattened into one batch ordered as [prefill tokens..., decode tokens...].
Prefill sequences attend causally to their own new tokens (the engine recomputes whole prompts,
so a prefill never has a cached prefix); decode tokens attend to their sequence's cached keys,
gathered from the block pool with indices computed once per step and shared by all layers.

A decode gathers whole blocks: the padding entries of the block table (block 0) and the tail of
a sequence's last block come along, holding whatever an earlier or concurrent request left
there, NaN and Inf included. Masking them by arithmetic alone (-inf scores, zero weights) lets
such values through (0 * NaN = NaN), so those rows of the gathered copies are first set to zero
(index_fill_: selection, not multiplication); no stale value can reach another request. Filling
just those rows (indices built once per step) costs a small fraction of the gather, where a
masked_fill_ over the whole copy doubled the cost of decode attention on CPU. Keys inside the
context but outside a sliding window are the sequence's own and are masked by -inf as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step layout of the flattened batch; built by the model runner, read by every layer."""

    slot_mapping: torch.Tensor  # [T] flat cache slot where each token's K/V is written
    prefill_lens: list[int]  # new tokens of each prefill sequence, in batch order
    num_prefill_tokens: int
    decode_blocks: torch.Tensor | None  # [Bd, nb] block table of each decode sequence (padded with block 0)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, L] additive mask: 0 inside the context, -inf after
    decode_window_mask: torch.Tensor | None  # [Bd, 1, 1, L] same, also masking keys outside the sliding window
    decode_unused_rows: torch.Tensor | None  # [U] rows of the gathered [Bd * L] keys past their sequence's context
    sliding_window: int | None
    block_size: int

    @property
    def num_decode_tokens(self) -> int:
        return 0 if self.decode_blocks is None else self.decode_blocks.shape[0]


class PagedAttention:
    """Stateless attention kernel of one layer; the layer's cache tensors are passed in."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding: bool) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sliding = sliding
        self.scale = head_dim**-0.5

    def __call__(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_slots, Hkv, D]
        v_cache: torch.Tensor,  # [num_slots, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq * D]
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D], contiguous
        p = meta.num_prefill_tokens
        if p:
            self._prefill(q[:p], k[:p], v[:p], out[:p], meta)
        if meta.num_decode_tokens:
            self._decode(q[p:], k_cache, v_cache, out[p:], meta)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def _prefill(self, q, k, v, out, meta: AttentionMetadata) -> None:
        window = meta.sliding_window if self.sliding else None
        start = 0
        for length in meta.prefill_lens:
            end = start + length
            qs = q[start:end].transpose(0, 1)  # [Hq, L, D]
            ks = k[start:end].transpose(0, 1)  # [Hkv, L, D]
            vs = v[start:end].transpose(0, 1)  # [Hkv, L, D]
            if window is not None and window < length:
                mask = _sliding_causal_mask(length, window, q.device)  # [L, L]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
            out[start:end] = o.transpose(0, 1)
            start = end

    def _decode(self, q, k_cache, v_cache, out, meta: AttentionMetadata) -> None:
        bd, num_blocks = meta.decode_blocks.shape
        length = num_blocks * meta.block_size
        blocks = meta.decode_blocks.reshape(-1)  # [Bd * nb]
        # gather whole blocks (contiguous runs of block_size tokens), far cheaper than token rows
        keys = k_cache.view(-1, meta.block_size * self.num_kv_heads * self.head_dim).index_select(0, blocks)
        values = v_cache.view(-1, meta.block_size * self.num_kv_heads * self.head_dim).index_select(0, blocks)
        keys = keys.view(bd, length, self.num_kv_heads, self.head_dim)  # [Bd, L, Hkv, D]
        values = values.view(bd, length, self.num_kv_heads, self.head_dim)
        # stale rows become exact zeros (in the gathered copies): finite scores, which -inf then masks
        keys.view(bd * length, -1).index_fill_(0, meta.decode_unused_rows, 0.0)
        values.view(bd * length, -1).index_fill_(0, meta.decode_unused_rows, 0.0)
        mask = meta.decode_window_mask if self.sliding and meta.decode_window_mask is not None else meta.decode_mask
        # the query heads sharing a KV head become that head's "query positions": no K/V repeat
        group = self.num_heads // self.num_kv_heads
        o = F.scaled_dot_product_attention(
            q.reshape(bd, self.num_kv_heads, group, self.head_dim),  # [Bd, Hkv, G, D]
            keys.transpose(1, 2),  # [Bd, Hkv, L, D]
            values.transpose(1, 2),
            attn_mask=mask,  # [Bd, 1, 1, L]: the same for every query head of a sequence
            scale=self.scale,
        )  # [Bd, Hkv, G, D]
        out.copy_(o.view(bd, self.num_heads, self.head_dim))


def _sliding_causal_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]  # [L, L] query minus key position
    return (distance >= 0) & (distance < window)  # True = may attend
