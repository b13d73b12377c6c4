"""The native CPU decoder kernels against the torch formulations the model uses elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import decoder_cpu
from loraplex.models.layers import apply_rotary
from tiny_models import PROMPTS, tiny  # noqa: F401

pytestmark = pytest.mark.skipif(not decoder_cpu.available(), reason="no C++ compiler for the native CPU kernels")


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 80])
def test_rms_norm_with_and_without_the_residual(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, 576, generator=gen), torch.randn(rows, 576, generator=gen)
    weight = torch.rand(576, generator=gen) + 0.5
    close(decoder_cpu.rms_norm(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5))
    expected_sum = x + residual
    out = decoder_cpu.rms_norm(x, weight, 1e-5, residual=residual)
    close(residual, expected_sum)  # added in place
    close(out, F.rms_norm(expected_sum, (576,), weight, 1e-5))


def test_rms_norm_of_a_strided_view() -> None:
    x = torch.randn(4, 2, 64)[:, 1]  # [4, 64], rows 128 apart
    weight = torch.rand(64)
    close(decoder_cpu.rms_norm(x, weight, 1e-6), F.rms_norm(x, (64,), weight, 1e-6))


@pytest.mark.parametrize("tokens", [1, 70])
def test_rotary_in_place_on_a_view_of_the_fused_projection(tokens: int) -> None:
    qkv = torch.randn(tokens, 15 * 64)  # q (9 heads), k (3), v (3)
    qk = qkv[:, : 12 * 64].view(tokens, 12, 64)  # token stride 15 * 64
    cos, sin = torch.randn(tokens, 1, 64), torch.randn(tokens, 1, 64)
    expected = apply_rotary(qk.clone(), cos, sin)
    v_before = qkv[:, 12 * 64 :].clone()
    decoder_cpu.rotary_(qk, cos, sin)
    close(qk, expected)
    assert torch.equal(qkv[:, 12 * 64 :], v_before)  # nothing past q and k written


@pytest.mark.parametrize("tokens", [1, 40])
def test_silu_and_mul(tokens: int) -> None:
    gate_up = torch.randn(tokens, 2 * 1536) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    close(decoder_cpu.silu_and_mul(gate_up), F.silu(gate) * up)


def test_silu_and_mul_is_exact_to_a_few_ulp_over_the_whole_range() -> None:
    """The vectorised exp saturates to 0 and inf as expf does, and is ~1 ulp in between."""
    gate = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([-1e30, 1e30, 0.0, -0.0, 88.5, -88.5])])
    out = decoder_cpu.silu_and_mul(torch.cat([gate, torch.ones_like(gate)])[None])[0]
    expected = F.silu(gate)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-30)


def reference_decode(q, k_cache, v_cache, tables, lens, block_size, window, scale):
    """Each sequence's keys gathered position by position, then plain softmax attention (fp64)."""
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(lens[b])
        lo = max(0, n - window) if window else 0
        slots = [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(lo, n)]
        keys = k_cache[slots].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        values = v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), values).float()
    return out


@pytest.mark.parametrize("copies", [1, 3])  # 3 sequences: a work item per KV head; 9: per sequence
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_reads_only_each_context_through_the_block_table(window: int | None, copies: int) -> None:
    gen = torch.Generator().manual_seed(0)
    block_size, num_blocks, hkv, hq, d = 4, 12, 3, 9, 64
    k_cache = torch.randn(num_blocks * block_size, hkv, d, generator=gen)
    v_cache = torch.randn(num_blocks * block_size, hkv, d, generator=gen)
    tables = torch.tensor([[7, 2, 9, 0], [3, 0, 0, 0], [11, 5, 1, 8]] * copies)  # padded with block 0
    lens = torch.tensor([10, 1, 16] * copies)
    # everything outside the contexts is poison: no NaN may reach an output
    used = {int(tables[b, p // block_size]) * block_size + p % block_size for b in range(len(lens)) for p in range(lens[b])}
    for slot in set(range(num_blocks * block_size)) - used:
        k_cache[slot], v_cache[slot] = float("nan"), float("inf")
    q = torch.randn(len(lens), hq, d, generator=gen)
    out = torch.empty_like(q)
    decoder_cpu.decode_attention(q, k_cache, v_cache, tables, lens, block_size, window, d**-0.5, out)
    assert torch.isfinite(out).all()
    close(out, reference_decode(q, k_cache, v_cache, tables, lens, block_size, window, d**-0.5))


def test_decode_attention_refuses_int32_tables() -> None:
    q = torch.randn(1, 9, 64)
    cache = torch.zeros(8, 3, 64)
    with pytest.raises(ValueError, match="int64 block_tables"):
        decoder_cpu.decode_attention(q, cache, cache, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3]), 4,
                                     None, 0.125, torch.empty_like(q))


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen3"])
def test_the_engine_decodes_alike_with_and_without_the_kernels(tiny, variant: str, monkeypatch) -> None:  # noqa: F811
    """Native decode (and its GEMV, norms, rotary) against the torch path, on ragged batches whose
    contexts cross blocks: the same greedy tokens and log-probabilities."""
    from loraplex import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, min_tokens=20, max_tokens=20, logprobs=3)
    prompts = [PROMPTS[0], PROMPTS[1] * 3, PROMPTS[2]]

    def run() -> list:
        llm = LLM(str(tiny.path(variant)), block_size=16)
        batched = llm.generate(prompts, params, use_tqdm=False)
        solo = llm.generate(prompts[1:2], params, use_tqdm=False)  # batch 1: the GEMV path
        return [o.outputs[0] for o in batched + solo]

    native = run()
    monkeypatch.setattr(decoder_cpu, "available", lambda: False)
    reference = run()
    for a, b in zip(native, reference):
        assert a.token_ids == b.token_ids
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            for token, lp in step_b.items():
                assert abs(step_a[token].logprob - lp.logprob) < 1e-4
