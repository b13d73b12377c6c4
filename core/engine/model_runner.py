"""Turns a scheduled batch into one forward pass over the flattened tokens, and owns the KV cache."""

from __future__ import annotations

import torch

from ..kernels import decoder_cpu
from ..models import AttentionMetadata, Model
from ..models.attention import PrefillContext
from ..lora.manager import LoRAManager
from .sampler import PromptLogits
from .scheduler import ScheduledBatch
from .sequence import Sequence


class KVCache:
    """One (key, value) pair of flat slot tensors per layer: slot = block_id * block_size + offset."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        slots = num_blocks * block_size
        self.layers = [
            (torch.zeros(slots, num_kv_heads, head_dim, dtype=dtype, device=device),  # [S, Hkv, D]
             torch.zeros(slots, num_kv_heads, head_dim, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


class ModelRunner:
    def __init__(self, model: Model, kv_cache: KVCache, block_size: int, device: torch.device,
                 dtype: torch.dtype, lora_manager: LoRAManager | None = None) -> None:
        self.model = model
        self.lora_manager = lora_manager
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        # decode attention by the native CPU kernel: block tables and lengths, no masks (see attention)
        self.native_decode = device.type == "cpu" and dtype == torch.float32 and decoder_cpu.available()
        # seq_id -> logits at the prompt positions of the last step, for requests with prompt_logprobs
        self.prompt_logits: dict[int, PromptLogits] = {}

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run the batch; return next-token logits [B, V] in `batch.sampled` order (a prefill
        chunk that does not finish its prompt has no row).

        Prefills that want prompt logprobs also get the logits at their prompt positions, kept
        in `prompt_logits` until the next step.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        prompt_rows: list[tuple[Sequence, int, int]] = []  # (seq, first extra row, number of rows)
        bs = self.block_size
        for seq in batch.prefills:
            end = seq.num_cached_tokens  # the scheduler advanced it to what this step leaves cached
            start = end - batch.chunks[seq]  # tokens before it are cached (earlier chunks, prefix cache)
            first = len(input_ids)
            input_ids.extend(seq.all_token_ids()[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_ids[p // bs] * bs + p % bs for p in range(start, end))
            if _wants_prompt_logits(seq):  # never chunked nor prefix-cached (see the scheduler)
                # positions 0 .. P-2 predict prompt tokens 1 .. P-1 (the last one predicts the first output)
                count = len(seq.prompt_token_ids) - 1
                prompt_rows.append((seq, len(logits_indices), count))
                logits_indices.extend(range(first, first + count))
            if seq not in batch.partial:
                logits_indices.append(len(input_ids) - 1)
        num_prefill_tokens = len(input_ids)
        for seq in batch.decodes:
            p = seq.num_tokens - 1
            input_ids.append(seq.token_at(p))
            positions.append(p)
            slots.append(seq.block_ids[p // bs] * bs + p % bs)
            logits_indices.append(len(input_ids) - 1)

        to = dict(device=self.device, dtype=torch.long)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, **to),
            prefill_lens=[batch.chunks[seq] for seq in batch.prefills],
            num_prefill_tokens=num_prefill_tokens,
            prefill_contexts=[self._prefill_context(seq, batch.chunks[seq]) for seq in batch.prefills],
            decode_blocks=None, decode_mask=None, decode_window_mask=None, decode_unused_rows=None,
            sliding_window=self.model.sliding_window, block_size=self.block_size,
        )
        if batch.decodes:
            self._decode_layout(batch, meta)
        ids = torch.tensor(input_ids, **to)
        inputs_embeds = self._embed_images(batch, ids)  # runs the vision tower first: its own LoRA mapping
        if self.lora_manager is not None:
            self._lora_layout(batch)
        logits = self.model(ids, torch.tensor(positions, **to), self.kv_cache.layers, meta,
                            torch.tensor(logits_indices, **to), inputs_embeds=inputs_embeds)
        self.prompt_logits = {}
        if prompt_rows:
            logits, self.prompt_logits = _split_prompt_logits(logits, prompt_rows)
        return logits

    def _embed_images(self, batch: ScheduledBatch, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The step's input embeddings [T, H] with image embeddings in place of the placeholder
        tokens its prefill chunks hold; None when they hold none.

        Images not encoded yet are encoded together, once each, each with its request's adapter
        (LoRA on the tower and projector); a prompt keeps its images' embeddings until it is
        prefilled, for the chunks still to come.
        """
        chunks = [(seq, seq.num_cached_tokens - batch.chunks[seq], seq.num_cached_tokens) for seq in batch.prefills]
        todo = [(seq, i) for seq, start, end in chunks if seq.multi_modal is not None
                for i, (offset, length) in enumerate(seq.multi_modal.placeholders)
                if offset < end and offset + length > start and i not in seq.multi_modal.features]
        if todo:
            self._encode_images(todo)
        rows: list[int] = []
        pieces: list[torch.Tensor] = []
        first = 0  # the chunk's first row in the flattened batch
        for seq, start, end in chunks:
            images = seq.multi_modal
            if images is not None:
                for i, (offset, length) in enumerate(images.placeholders):
                    low, high = max(start, offset), min(end, offset + length)
                    if low < high:
                        rows.extend(range(first + low - start, first + high - start))
                        pieces.append(images.features[i][low - offset : high - offset])  # [n, H]
                if end >= len(seq.prompt_token_ids):
                    images.features.clear()  # prefilled: the embeddings are in the KV cache now
            first += end - start
        if not rows:
            return None
        return self.model.embed(input_ids, torch.tensor(rows, device=self.device, dtype=torch.long), torch.cat(pieces))

    def _encode_images(self, todo: list[tuple[Sequence, int]]) -> None:
        model = self.model
        if self.lora_manager is not None:
            per_image = model.vision_tower.tokens_per_image
            slots = [self.lora_manager.slot_of(seq.lora_name) for seq, _ in todo]
            self.lora_manager.set_step([slot for slot in slots for _ in range(per_image)], self.device)
        pixels = torch.stack([seq.multi_modal.pixel_values[i] for seq, i in todo]).to(self.device)  # [N, 3, H, W]
        features = model.encode_images(pixels)  # [N, F, H]
        for (seq, i), embeds in zip(todo, features):
            seq.multi_modal.features[i] = embeds

    def _lora_layout(self, batch: ScheduledBatch) -> None:
        manager = self.lora_manager
        token_slots: list[int] = []
        for seq in batch.prefills:
            token_slots.extend([manager.slot_of(seq.lora_name)] * batch.chunks[seq])
        token_slots.extend(manager.slot_of(seq.lora_name) for seq in batch.decodes)
        manager.set_step(token_slots, self.device)

    def _prefill_context(self, seq: Sequence, chunk: int) -> PrefillContext | None:
        """Where a prefill chunk after cached tokens finds their K/V, and its mask; None without
        any (attention then takes the fast path over the chunk's own K/V)."""
        end = seq.num_cached_tokens
        start = end - chunk
        if start == 0:
            return None
        bs = self.block_size
        blocks = torch.tensor(seq.block_ids[:-(-end // bs)], dtype=torch.long)  # [nb]
        query_pos = torch.arange(start, end)[:, None]  # [C, 1]
        key_pos = torch.arange(end)[None, :]  # [1, Lk]
        allowed = key_pos <= query_pos  # [C, Lk] causal, offset by the context
        window = None
        if self.model.sliding_window is not None:
            window = (allowed & (query_pos - key_pos < self.model.sliding_window)).to(self.device)
        return PrefillContext(blocks.to(self.device), end, allowed.to(self.device), window)

    def _decode_layout(self, batch: ScheduledBatch, meta: AttentionMetadata) -> None:
        """Gather indices and masks for decode attention, shared by all layers of the step."""
        bs = self.block_size
        lengths = [seq.num_tokens for seq in batch.decodes]
        max_blocks = -(-max(lengths) // bs)
        table = [seq.block_ids[:max_blocks] + [0] * (max_blocks - len(seq.block_ids[:max_blocks])) for seq in batch.decodes]
        meta.decode_blocks = torch.tensor(table, device=self.device, dtype=torch.long)  # [Bd, nb]
        if self.native_decode:
            meta.decode_context_lens = torch.tensor(lengths, dtype=torch.long)  # [Bd]
            return
        length = max_blocks * bs
        # built on the host: a GPU step then never waits for the nonzero() below
        context = torch.tensor(lengths)[:, None]  # [Bd, 1]
        key_pos = torch.arange(length)[None, :]  # [1, L]
        outside = key_pos >= context  # [Bd, L]
        meta.decode_mask = _additive(outside.to(self.device), self.dtype)
        if meta.sliding_window is not None:
            outside_window = outside | (key_pos <= context - 1 - meta.sliding_window)  # [Bd, L]
            meta.decode_window_mask = _additive(outside_window.to(self.device), self.dtype)
        # the gathered rows past each context, set to zero before attention reads them (see attention)
        meta.decode_unused_rows = outside.view(-1).nonzero().view(-1).to(self.device)  # [U]


def _wants_prompt_logits(seq: Sequence) -> bool:
    # once per request (sample 0), on its first prefill (a preempted sequence has output tokens)
    return seq.params.prompt_logprobs is not None and seq.index == 0 and not seq.output_token_ids


def _split_prompt_logits(logits: torch.Tensor, prompt_rows: list[tuple[Sequence, int, int]]
                         ) -> tuple[torch.Tensor, dict[int, PromptLogits]]:
    """The next-token rows [B, V] and each sequence's prompt rows, out of the model's [B + extra, V]."""
    keep = torch.ones(logits.shape[0], dtype=torch.bool)  # [B + extra]
    prompt = {}
    for seq, first, count in prompt_rows:
        keep[first : first + count] = False
        prompt[seq.seq_id] = PromptLogits(0, logits[first : first + count])
    return logits[keep.to(logits.device)], prompt


def _additive(masked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # masked [Bd, L] bool -> [Bd, 1, 1, L] with -inf where masked
    return torch.zeros(masked.shape, dtype=dtype, device=masked.device).masked_fill_(masked, float("-inf"))[:, None, None, :]
