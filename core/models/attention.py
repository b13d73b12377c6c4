"""Attention over a paged KV cache, in plain torch (runs on CPU and GPU alike).

A step's tokens are flattened into one batch ordered as [prefill tokens..., decode tokens...].
A prefill chunk with nothing cached before it attends causally to its own new tokens (the fast
path). One that follows cached tokens (earlier chunks of a chunked prefill, blocks found in the
prefix cache) gathers its sequence's blocks from the cache, its own new K/V included (written
before any attention reads), keeps exactly the rows of its context and attends to them with the
causal mask offset by the context length: no row past its context is read at all. Decode tokens
attend to their sequence's cached keys, gathered from the block pool with indices computed once
per step and shared by all layers.

A decode gathers whole blocks: the padding entries of the block table (block 0) and the tail of
a sequence's last block come along, holding whatever an earlier or concurrent request left
there, NaN and Inf included. Masking them by arithmetic alone (-inf scores, zero weights) lets
such values through (0 * NaN = NaN), so those rows of the gathered copies are first set to zero
(index_fill_: selection, not multiplication); no stale value can reach another request. Filling
just those rows (indices built once per step) costs a small fraction of the gather, where a
masked_fill_ over the whole copy doubled the cost of decode attention on CPU. Keys inside the
context but outside a sliding window are the sequence's own and are masked by -inf as before.

On a CPU in float32 with the native kernels built (loraplex.kernels.decoder_cpu), decode reads
each sequence's keys and values in place through its block table instead, and only the rows of
its context (and window): no gathered copy, no masks, no stale row read at all. The model
runner then builds `decode_context_lens` and no masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import decoder_cpu


@dataclass
class PrefillContext:
    """A prefill chunk that follows cached tokens: where its sequence's K/V are, and its masks."""

    blocks: torch.Tensor  # [nb] the sequence's blocks holding positions 0 .. length-1
    length: int  # context through the chunk's last token: the keys it may see
    mask: torch.Tensor  # [C, length] bool, True = may attend: causal, offset by the cached tokens
    window_mask: torch.Tensor | None  # [C, length] the same, also inside the sliding window (None: no window)


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
    prefill_contexts: list[PrefillContext | None] | None = None  # per prefill; None: no cached tokens before any
    decode_context_lens: torch.Tensor | None = None  # [Bd] int64, for the native kernel (then no masks)

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
            self._prefill(q[:p], k[:p], v[:p], k_cache, v_cache, out[:p], meta)
        if meta.num_decode_tokens:
            self._decode(q[p:], k_cache, v_cache, out[p:], meta)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def _prefill(self, q, k, v, k_cache, v_cache, out, meta: AttentionMetadata) -> None:
        window = meta.sliding_window if self.sliding else None
        contexts = meta.prefill_contexts or [None] * len(meta.prefill_lens)
        start = 0
        for length, context in zip(meta.prefill_lens, contexts):
            end = start + length
            if context is not None:
                out[start:end] = self._prefill_after_cache(q[start:end], k_cache, v_cache, context, window, meta)
                start = end
                continue
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

    def _prefill_after_cache(self, q, k_cache, v_cache, context: PrefillContext, window: int | None,
                             meta: AttentionMetadata) -> torch.Tensor:  # [C, Hq, D]
        row = meta.block_size * self.num_kv_heads * self.head_dim
        # whole blocks gathered, then cut to the context: every row kept is this sequence's own
        keys = k_cache.view(-1, row).index_select(0, context.blocks).view(-1, self.num_kv_heads, self.head_dim)
        values = v_cache.view(-1, row).index_select(0, context.blocks).view(-1, self.num_kv_heads, self.head_dim)
        mask = context.window_mask if window is not None else context.mask  # [C, Lk]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [Hq, C, D]
            keys[:context.length].transpose(0, 1),  # [Hkv, Lk, D]
            values[:context.length].transpose(0, 1),
            attn_mask=mask, scale=self.scale, enable_gqa=True,
        )  # [Hq, C, D]
        return o.transpose(0, 1)

    def _decode(self, q, k_cache, v_cache, out, meta: AttentionMetadata) -> None:
        if meta.decode_context_lens is not None:
            decoder_cpu.decode_attention(q, k_cache, v_cache, meta.decode_blocks, meta.decode_context_lens,
                                         meta.block_size, meta.sliding_window if self.sliding else None, self.scale, out)
            return
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
