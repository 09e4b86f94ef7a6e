"""Scheduling policy, observed through a fake executor (no model, no torch)."""

from __future__ import annotations

import subprocess
import sys

from pagedkv.scheduler import SamplingParams
from tests.helpers import drain

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_budget_and_max_num_seqs_are_never_exceeded(engine_with):
    engine, executor = engine_with(block_size=4, num_blocks=40, max_num_batched_tokens=10, max_num_seqs=3)
    for i in range(8):
        engine.add_request(f"r{i}", [2] * (3 + 5 * i % 17), PARAMS)
    drain(engine)
    assert all(0 < p.num_batched_tokens <= 10 for p in executor.plans)
    assert all(len(p.scheduled) <= 3 for p in executor.plans)


def test_long_prompt_is_prefilled_in_chunks_without_stalling_decodes(engine_with):
    engine, executor = engine_with(block_size=4, num_blocks=64, max_num_batched_tokens=8)
    engine.add_request("chat", [2, 3], PARAMS)
    engine.step()  # chat prefilled, now decoding
    engine.add_request("long", [2] * 30, PARAMS)
    for _ in range(5):
        engine.step()
    for plan in executor.plans[1:]:
        assert plan.scheduled[0].request.request_id == "chat" and plan.scheduled[0].num_new_tokens == 1
    chunks = [(p.scheduled[1].request.request_id, p.scheduled[1].num_new_tokens) for p in executor.plans[1:]]
    assert chunks == [("long", 7)] * 4 + [("long", 2)]
    drain(engine)


def test_admission_is_first_come_first_served(engine_with):
    engine, executor = engine_with(block_size=4, num_blocks=64, max_num_seqs=1)
    for rid in ["c", "a", "b"]:
        engine.add_request(rid, [2, 2], PARAMS)
    drain(engine)
    admitted: list[str] = []
    for plan in executor.plans:
        rid = plan.scheduled[0].request.request_id
        if not admitted or admitted[-1] != rid:
            admitted.append(rid)
    assert admitted == ["c", "a", "b"]


def test_preemption_takes_the_newest_and_keeps_its_place_in_line(engine_with):
    engine, executor = engine_with(block_size=2, num_blocks=6)  # room for exactly the first three
    for token, rid in enumerate(["old", "mid", "new"], start=2):  # different prompts: nothing shared
        engine.add_request(rid, [token] * 3, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add_request("later", [5], PARAMS)
    while not any(p.preempted for p in executor.plans):
        engine.step()
    assert executor.plans[-1].preempted == ["new"]
    assert [r.request_id for r in engine.scheduler.waiting][:2] == ["new", "later"]
    assert [r.request_id for r in engine.scheduler.running] == ["old", "mid"]
    last = executor.plans[-1].scheduled
    assert all(s.request.request_id != "later" for s in last), "no admission in a step that preempts"
    drain(engine)


def test_a_request_can_preempt_itself_when_it_is_the_newest(engine_with):
    engine, executor = engine_with(block_size=1, num_blocks=6)
    engine.add_request("a", [2] * 3, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("b", [2] * 2, SamplingParams(max_tokens=4, ignore_eos=True))
    while not any(p.preempted for p in executor.plans):
        engine.step()
    assert executor.plans[-1].preempted == ["b"]
    assert [s.request.request_id for s in executor.plans[-1].scheduled] == ["a"]
    drain(engine)
    assert engine.kv_manager.pool.num_free == 6


def test_nothing_schedulable_gives_an_empty_plan(engine_with):
    engine, executor = engine_with(block_size=4, num_blocks=4)
    assert engine.step() == [] and executor.plans[-1].is_empty


def test_scheduler_and_allocator_import_no_torch():
    code = "import sys, paged, scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
