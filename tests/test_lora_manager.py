"""The LoRA manager through the engine: add / list / remove / pin, the CPU LRU cache, the device
slots and the statistics counters.

Engines are tiny Llamas stepped by hand (`LLMEngine.step`), so every test can look at the
manager between steps: which adapter sits in which slot (`manager.slots`), what the slot buffers
hold (`manager.storage`), the CPU cache order (`manager.cpu_cache`) and `manager.stats`.
Outputs are checked against PEFT wherever requests run.
"""

from __future__ import annotations

import pytest
import torch

from lora_helpers import LOGPROB_ATOL, TinyAdapters, assert_matches_oracle, greedy, lora_engine, step_until_done
from lora_helpers import one_torch_thread  # noqa: F401 (autouse: one intra-op thread for this module)
from loraplex import LoRARequest
from loraplex.errors import LoRAAdapterNotFoundError, LoRAError
from tiny_models import PROMPTS, tiny  # noqa: F401

NAMES = ["A", "B", "C", "D", "E", "F"]


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> TinyAdapters:
    return TinyAdapters(tiny.path("llama"), tmp_path_factory.mktemp("manager_adapters"), NAMES)


@pytest.fixture
def make_engine(tiny):
    return lambda **options: lora_engine(tiny.path("llama"), **options)


def run(engine, adapters: TinyAdapters, names: list[str | None], num_tokens: int = 4, on_step=None) -> None:
    """One request per name (prompts in turn), stepped to the end, each checked against PEFT."""
    ids = []
    for i, name in enumerate(names):
        request_id = f"run-{next(_counter)}"
        engine.add_request(request_id, PROMPTS[i % len(PROMPTS)], greedy(num_tokens),
                           lora_request=adapters.requests[name] if name else None)
        ids.append(request_id)
    finished = step_until_done(engine, on_step=on_step)
    assert_matches_oracle([finished[i] for i in ids], names, adapters.oracle, LOGPROB_ATOL["tiny"])


_counter = iter(range(10**9))


def test_add_list_remove(make_engine, adapters) -> None:
    engine = make_engine(max_loras=2, max_cpu_loras=3)
    manager = engine.lora_manager
    a, b = adapters.requests["A"], adapters.requests["B"]
    assert engine.list_loras() == set()
    assert engine.add_lora(a) is True
    assert engine.add_lora(a) is False  # already there: nothing reloaded
    assert engine.add_lora(b) is True
    assert engine.list_loras() == {a.lora_int_id, b.lora_int_id}
    assert list(manager.cpu_cache) == ["A", "B"]
    assert manager.stats["A"].loads == 1 and manager.stats["B"].loads == 1
    assert manager.slots == [None, None]  # added, not yet activated

    assert engine.remove_lora(a.lora_int_id) is True  # by id
    assert engine.list_loras() == {b.lora_int_id}
    assert "A" not in manager.cpu_cache and "A" not in engine.list_adapters()
    assert engine.remove_lora("A") is False and engine.remove_lora(999) is False
    assert engine.remove_lora("B") is True  # by name
    assert engine.list_loras() == set() and not manager.cpu_cache
    # a removed name may be added again, even with another path and id
    assert engine.add_lora(LoRARequest("A", 7, adapters.requests["C"].lora_path)) is True
    assert engine.list_loras() == {7}


def test_remove_frees_the_cpu_entry_and_clears_the_slot(make_engine, adapters) -> None:
    engine = make_engine(max_loras=2, max_cpu_loras=2)
    manager = engine.lora_manager
    run(engine, adapters, ["A", None, "B"])
    slot = manager.slots.index("A")
    qkv = manager.layers[(0, "qkv_proj")]
    assert manager.storage[slot].abs().sum() > 0 and qkv.lora_a[slot].abs().sum() > 0
    other = manager.storage[1 - slot].clone()

    assert engine.remove_lora("A") is True
    assert manager.slots[slot] is None
    assert torch.count_nonzero(manager.storage[slot]) == 0
    assert torch.count_nonzero(qkv.lora_a[slot]) == 0 and torch.count_nonzero(qkv.lora_b[slot]) == 0
    assert torch.equal(manager.storage[1 - slot], other)  # B's slot untouched
    assert "A" not in manager.cpu_cache and list(manager.cpu_cache) == ["B"]
    # the cleared slot is the one the next adapter gets; everything still exact
    run(engine, adapters, ["C", "B", None])
    assert manager.slots[slot] == "C"


def test_removing_an_adapter_that_a_request_uses_is_refused(make_engine, adapters) -> None:
    engine = make_engine(max_loras=1, max_cpu_loras=3)
    manager = engine.lora_manager
    engine.add_request("a", PROMPTS[0], greedy(6), lora_request=adapters.requests["A"])
    engine.step()
    assert [s.lora_name for s in engine.scheduler.running] == ["A"]
    with pytest.raises(LoRAError, match=r"LoRA adapter 'A' is in use by 1 running sequence"):
        engine.remove_lora("A")
    with pytest.raises(LoRAError, match=r"'A' is in use"):
        engine.remove_lora(adapters.requests["A"].lora_int_id)
    # B's request waits for the only slot: removing B is refused too (the scheduler would need it)
    engine.add_request("b", PROMPTS[1], greedy(6), lora_request=adapters.requests["B"])
    engine.step()
    assert [s.lora_name for s in engine.scheduler.waiting] == ["B"]
    with pytest.raises(LoRAError, match=r"LoRA adapter 'B' is needed by 1 queued sequence"):
        engine.remove_lora("B")
    assert set(engine.list_adapters()) == {"A", "B"}
    finished = step_until_done(engine)
    assert_matches_oracle([finished["a"], finished["b"]], ["A", "B"], adapters.oracle, LOGPROB_ATOL["tiny"])
    assert engine.remove_lora("A") is True and engine.remove_lora("B") is True

    # an aborted request no longer holds its adapter
    engine.add_request("c", PROMPTS[2], greedy(6), lora_request=adapters.requests["C"])
    engine.step()
    engine.abort_request("c")
    assert not manager.in_use["C"]
    assert engine.remove_lora("C") is True
    run(engine, adapters, [None, "D"])


def test_pin_keeps_an_adapter_in_its_slot(make_engine, adapters) -> None:
    engine = make_engine(max_loras=2, max_cpu_loras=2)
    manager = engine.lora_manager
    for name in NAMES:
        engine.add_lora(adapters.requests[name])
    with pytest.raises(LoRAAdapterNotFoundError, match=r"cannot pin LoRA adapter 'nobody'"):
        engine.pin_lora("nobody")
    assert engine.pin_lora(adapters.requests["A"].lora_int_id) is True  # by id; activates it now
    assert engine.pin_lora("A") is True  # pinning twice is fine
    slot = manager.slots.index("A")
    image = manager.storage[slot].clone()

    def check(_step: int) -> None:
        assert manager.slots[slot] == "A"
        assert torch.equal(manager.storage[slot], image)
        assert "A" in manager.cpu_cache  # pinned adapters stay in the CPU cache too

    # five other adapters, twice over, through the one remaining slot and a 2-entry CPU cache
    for name in ["B", "C", "D", "E", "F", "B", "C", "D", "E", "F"]:
        run(engine, adapters, [name, None], on_step=check)
    run(engine, adapters, ["A", "B", "A"], on_step=check)
    assert manager.stats["A"].activations == 1
    assert sum(manager.stats[n].activations for n in "BCDEF") >= 10


def test_pinning_that_would_leave_no_free_slot_is_refused(make_engine, adapters) -> None:
    engine = make_engine(max_loras=1)
    engine.add_lora(adapters.requests["A"])
    with pytest.raises(LoRAError, match=r"pinning LoRA adapter 'A' would leave no device slot.*max_loras=1"):
        engine.pin_lora("A")
    assert not engine.lora_manager.pinned

    engine = make_engine(max_loras=2, max_cpu_loras=3)
    for name in "ABC":
        engine.add_lora(adapters.requests[name])
    assert engine.pin_lora("A") is True
    with pytest.raises(LoRAError, match=r"pinning LoRA adapter 'B' would leave no device slot.*pinned: \['A'\]"):
        engine.pin_lora("B")
    assert engine.lora_manager.pinned == {"A"}
    run(engine, adapters, ["B", "C", "A", None])  # the free slot still serves everything else
    assert engine.remove_lora("A") is True  # removing a pinned adapter unpins it
    assert engine.pin_lora("B") is True

    # every slot busy with running requests: pinning must wait
    engine = make_engine(max_loras=3, max_cpu_loras=4)
    for i, name in enumerate("ABC"):
        engine.add_request(f"busy-{name}", PROMPTS[i], greedy(4), lora_request=adapters.requests[name])
    engine.add_lora(adapters.requests["D"])
    engine.step()
    with pytest.raises(LoRAError, match=r"cannot pin LoRA adapter 'D' now: every device slot is busy"):
        engine.pin_lora("D")
    step_until_done(engine)
    assert engine.pin_lora("D") is True


def test_cpu_cache_evicts_the_least_recently_used(make_engine, adapters) -> None:
    engine = make_engine(max_loras=1, max_cpu_loras=3)
    manager = engine.lora_manager
    for name in "ABC":
        engine.add_lora(adapters.requests[name])
    assert list(manager.cpu_cache) == ["A", "B", "C"]
    engine.add_lora(adapters.requests["D"])
    assert list(manager.cpu_cache) == ["B", "C", "D"]  # A was least recently used
    assert manager.stats["A"].evictions == 1
    engine.add_lora(adapters.requests["B"])  # known: a use, so B becomes most recent
    assert list(manager.cpu_cache) == ["C", "D", "B"]
    engine.add_lora(adapters.requests["E"])
    assert list(manager.cpu_cache) == ["D", "B", "E"]
    run(engine, adapters, ["D"])  # running D uses it
    assert list(manager.cpu_cache) == ["B", "E", "D"]
    engine.add_lora(adapters.requests["F"])
    assert list(manager.cpu_cache) == ["E", "D", "F"]
    assert all(manager.stats[n].evictions == 1 for n in "ABC")
    # an evicted adapter is still registered (it comes back from disk when a request needs it),
    # but list_loras, as vLLM's, lists only the ids the CPU cache holds
    assert set(engine.list_adapters()) == set(NAMES)
    assert engine.list_loras() == {adapters.requests[n].lora_int_id for n in "EDF"}
    run(engine, adapters, ["A"])
    assert manager.stats["A"].loads == 2 and manager.stats["A"].cache_misses == 1
    assert list(manager.cpu_cache) == ["D", "F", "A"]


def test_statistics_counters(make_engine, adapters) -> None:
    """loads: disk -> CPU; activations: CPU -> slot; cache_hits / cache_misses: found in a slot or the
    CPU cache / not, when a request needs it; evictions: out of the CPU cache or out of a slot."""
    engine = make_engine(max_loras=1, max_cpu_loras=2)
    stats = engine.lora_manager.stats

    def counters(name: str) -> tuple[int, int, int, int, int]:
        s = stats[name]
        return s.loads, s.activations, s.cache_hits, s.cache_misses, s.evictions

    engine.add_lora(adapters.requests["A"])
    engine.add_lora(adapters.requests["B"])
    assert counters("A") == counters("B") == (1, 0, 0, 0, 0)
    run(engine, adapters, ["A"])  # CPU hit, activated
    assert counters("A") == (1, 1, 1, 0, 0)
    run(engine, adapters, ["A"])  # already in its slot: a hit, no copy
    assert counters("A") == (1, 1, 2, 0, 0)
    run(engine, adapters, ["B"])  # takes A's slot
    assert counters("B") == (1, 1, 1, 0, 0)
    assert counters("A") == (1, 1, 2, 0, 1)
    engine.add_lora(adapters.requests["C"])  # CPU cache [A, B] is full: A (least recent) goes
    assert counters("C") == (1, 0, 0, 0, 0)
    assert counters("A") == (1, 1, 2, 0, 2)
    run(engine, adapters, ["A"])  # a miss: reloaded from disk (evicting B from the CPU), then B's slot
    assert counters("A") == (2, 2, 2, 1, 2)
    assert counters("B") == (1, 1, 1, 0, 2)
    assert all(s.load_seconds > 0 for s in stats.values() if s.loads)


@pytest.mark.parametrize("max_loras", [1, 2])
def test_an_adapter_in_use_is_never_evicted_from_its_slot(make_engine, adapters, max_loras: int) -> None:
    """Requests for four adapters (and the base model) arrive over time; after every step each
    running sequence's adapter is in the slot it started in, with the slot's weights unchanged."""
    engine = make_engine(max_loras=max_loras, max_cpu_loras=max_loras + 1)
    manager = engine.lora_manager
    arrivals = {}  # step -> [(request id, adapter name, max_tokens)]
    lanes = ["A", "B", None, "C", "D", "A", "C", None, "B", "D", "A", "B"]
    for i, name in enumerate(lanes):
        arrivals.setdefault(i // 2, []).append((f"r{i}", name, 3 + (i * 5) % 7))
    names = {rid: name for batch in arrivals.values() for rid, name, _ in batch}
    seen: dict[int, tuple[int, torch.Tensor]] = {}  # seq id -> (its slot, the slot's contents)

    def add_arrivals(step: int) -> None:
        for j, (rid, name, n) in enumerate(arrivals.get(step, [])):
            engine.add_request(rid, PROMPTS[(step + j) % len(PROMPTS)], greedy(n),
                               lora_request=adapters.requests[name] if name else None)

    def check(step: int) -> None:
        running = [s for s in engine.scheduler.running if s.lora_name is not None]
        for seq in running:
            slot = manager.slot_of(seq.lora_name)
            if seq.seq_id not in seen:
                seen[seq.seq_id] = (slot, manager.storage[slot].clone())
            first_slot, contents = seen[seq.seq_id]
            assert slot == first_slot, f"step {step}: {seq.lora_name} moved from slot {first_slot} to {slot}"
            assert torch.equal(manager.storage[slot], contents), f"step {step}: slot {slot} was overwritten"
        for name in set(s.lora_name for s in running):
            assert manager.in_use[name] == sum(s.lora_name == name for s in running)
        assert len({s.lora_name for s in running}) <= max_loras
        add_arrivals(step + 1)

    add_arrivals(0)
    finished = step_until_done(engine, on_step=check)
    assert len(finished) == len(lanes)
    assert sum(s.evictions for s in manager.stats.values()) > 0  # slots did change hands
    ids = sorted(finished)
    assert_matches_oracle([finished[i] for i in ids], [names[i] for i in ids], adapters.oracle, LOGPROB_ATOL["tiny"])
    assert not any(manager.in_use.values())


def test_adapter_unloadable_at_activation_aborts_only_its_request(make_engine, adapters, tmp_path) -> None:
    """An adapter evicted from the CPU cache whose files vanish before it gets a slot ends its own
    request with "abort"; the engine keeps serving the others exactly."""
    import shutil

    engine = make_engine(max_loras=1, max_cpu_loras=1)
    copies = {name: tmp_path / name for name in ("A", "B")}
    for name, path in copies.items():
        shutil.copytree(adapters.paths[name], path)
    engine.add_request("gone", PROMPTS[0], greedy(4), lora_request=LoRARequest("A", 1, str(copies["A"])))
    engine.add_request("kept", PROMPTS[1], greedy(4), lora_request=LoRARequest("B", 2, str(copies["B"])))
    engine.add_request("base", PROMPTS[2], greedy(4))
    assert list(engine.lora_manager.cpu_cache) == ["B"]  # A was evicted when B arrived
    shutil.rmtree(copies["A"])
    finished = step_until_done(engine)
    assert finished["gone"].outputs[0].finish_reason == "abort"
    assert finished["gone"].outputs[0].token_ids == []
    assert_matches_oracle([finished["kept"], finished["base"]], ["B", None], adapters.oracle, LOGPROB_ATOL["tiny"])
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks
    assert not engine.lora_manager.in_use["A"]
