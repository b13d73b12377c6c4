"""Slot-aware scheduling: at most max_loras distinct adapters in any one step, no starvation, and
every output still PEFT's.

The engine is stepped by hand and `scheduler.schedule` is wrapped to record each step's batch,
so the checks see exactly which sequences ran together.
"""

from __future__ import annotations

import pytest

from lora_helpers import LOGPROB_ATOL, TinyAdapters, assert_matches_oracle, greedy, lora_engine, step_until_done
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex.engine.scheduler import MAX_OVERTAKING_STEPS
from tiny_models import PROMPTS, tiny  # noqa: F401

NAMES = ["A", "B", "C", "D", "E"]


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> TinyAdapters:
    return TinyAdapters(tiny.path("llama"), tmp_path_factory.mktemp("scheduling_adapters"), NAMES)


def record_batches(engine) -> list:
    """Every batch the scheduler hands out from now on, in order."""
    batches = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        if batch:
            batches.append(batch)
        return batch

    engine.scheduler.schedule = recording
    return batches


def check_outputs(finished: dict, names: dict, adapters: TinyAdapters) -> None:
    ids = sorted(finished)
    assert_matches_oracle([finished[i] for i in ids], [names[i] for i in ids], adapters.oracle, LOGPROB_ATOL["tiny"])


@pytest.mark.parametrize("max_loras", [1, 3])
def test_at_most_max_loras_adapters_per_step(tiny, adapters, max_loras: int) -> None:
    engine = lora_engine(tiny.path("llama"), max_loras=max_loras, max_cpu_loras=len(NAMES))
    batches = record_batches(engine)
    lanes = [None, "A", "B", "C", None, "D", "E", "A", "C", None, "E", "B", "D", "A"]
    names = {}
    for i, name in enumerate(lanes):
        rid = f"r{i:02d}"
        names[rid] = name
        engine.add_request(rid, PROMPTS[i % len(PROMPTS)], greedy(2 + i % 5),
                           lora_request=adapters.requests[name] if name else None)

    def check(step: int) -> None:
        in_batch = {s.lora_name for s in batches[-1].sequences} - {None}
        assert len(in_batch) <= max_loras, f"step {step} ran adapters {sorted(in_batch)}"
        running = {s.lora_name for s in engine.scheduler.running} - {None}
        assert len(running) <= max_loras
        assert running <= set(engine.lora_manager.slots)

    finished = step_until_done(engine, on_step=check)
    assert len(finished) == len(lanes)
    check_outputs(finished, names, adapters)
    # slots never limit the base model: every base prompt was admitted in the first step
    assert {s.request_id for s in batches[0].prefills if s.lora_name is None} == {r for r, n in names.items() if n is None}
    # and the limit was actually reached (the test is not vacuous)
    assert max(len({s.lora_name for s in b.sequences} - {None}) for b in batches) == max_loras


def test_each_step_orders_its_sequences_by_slot(tiny, adapters) -> None:
    """Prefills, then decodes, each in slot order with the base model first: the CPU LoRA path then
    batches a decode step's adapters into one GEMM per slice."""
    engine = lora_engine(tiny.path("llama"), max_loras=4, max_cpu_loras=len(NAMES))
    batches = record_batches(engine)
    lanes = ["C", None, "A", "D", "B", None, "A", "C", "D", "B", "E", "A"]
    for i, name in enumerate(lanes):
        engine.add_request(f"r{i:02d}", PROMPTS[i % len(PROMPTS)], greedy(3 + i % 4),
                           lora_request=adapters.requests[name] if name else None)
    orders = []

    def check(step: int) -> None:
        for part in (batches[-1].prefills, batches[-1].decodes):
            slots = [engine.lora_manager.slot_of(s.lora_name) for s in part]
            assert slots == sorted(slots), f"step {step}: slots {slots}"
            orders.append(slots)

    step_until_done(engine, on_step=check)
    assert any(len(set(slots)) >= 3 for slots in orders)  # several adapters shared a step


@pytest.mark.parametrize("max_loras", [1, 2])
def test_no_starvation_under_a_steady_stream_for_other_adapters(tiny, adapters, max_loras: int) -> None:
    """Every step brings a new request for each of max_loras busy adapters, so their slots are never
    idle; one request for another adapter (arriving at step 2) still finishes within a bound."""
    engine = lora_engine(tiny.path("llama"), max_loras=max_loras, max_cpu_loras=max_loras + 1)
    batches = record_batches(engine)
    busy = NAMES[:max_loras]
    stream_tokens, late_tokens, late_arrival, steps = 4, 5, 2, 60
    names = {}
    first_run_step = {}

    def arrive(step: int) -> None:
        if step < steps:
            for name in busy:
                rid = f"{name}-{step:03d}"
                names[rid] = name
                engine.add_request(rid, PROMPTS[step % len(PROMPTS)], greedy(stream_tokens),
                                   lora_request=adapters.requests[name])
        if step == late_arrival:
            names["late"] = "E"
            engine.add_request("late", PROMPTS[1], greedy(late_tokens), lora_request=adapters.requests["E"])

    finish_step = {}

    def on_step(step: int) -> None:
        for seq in batches[-1].sequences:
            first_run_step.setdefault(seq.request_id, step)
        for rid in names:
            if rid not in finish_step and rid not in engine.requests:
                finish_step[rid] = step
        arrive(step + 1)

    arrive(0)
    finished = step_until_done(engine, on_step=on_step)
    assert len(finished) == len(names)

    # without a bound the late request would wait for all 60 steps of the stream
    bound = MAX_OVERTAKING_STEPS + stream_tokens + 2
    waited = first_run_step["late"] - late_arrival
    assert waited <= bound, f"the late adapter waited {waited} steps (bound {bound})"
    assert finish_step["late"] - late_arrival <= bound + late_tokens
    # ... and it did have to wait: the stream kept every slot busy when it arrived
    assert waited > 1
    # the stream resumed after it: busy-adapter requests ran after the late one finished
    assert any(step > finish_step["late"] for rid, step in first_run_step.items() if rid != "late")
    for batch in batches:
        assert len({s.lora_name for s in batch.sequences} - {None}) <= max_loras
    check_outputs(finished, names, adapters)


def test_preempted_lora_sequences_are_recomputed_with_their_adapter(tiny, adapters) -> None:
    """A KV cache of 8 blocks of 16 tokens for 6 sequences growing to ~45 tokens: sequences are
    preempted and recomputed; each keeps its adapter (released on preemption, acquired again)."""
    engine = lora_engine(tiny.path("llama"), max_loras=2, max_cpu_loras=3, max_model_len=64,
                         kv_cache_memory_bytes=8 * 16 * 512)  # 512 bytes per token of tiny Llama
    assert engine.scheduler.pool.num_blocks == 8
    lanes = ["A", "B", None, "A", "C", "B"]
    names = {}
    for i, name in enumerate(lanes):
        rid = f"p{i}"
        names[rid] = name
        engine.add_request(rid, PROMPTS[i % 2], greedy(30), lora_request=adapters.requests[name] if name else None)

    def check(step: int) -> None:
        manager = engine.lora_manager
        running = [s for s in engine.scheduler.running if s.lora_name]
        for name in {s.lora_name for s in running}:
            assert manager.in_use[name] == sum(s.lora_name == name for s in running)
        assert not any(manager.in_use[n] for n in engine.list_adapters() if n not in {s.lora_name for s in running})

    finished = step_until_done(engine, on_step=check)
    assert engine.scheduler.num_preemptions > 0
    check_outputs(finished, names, adapters)
