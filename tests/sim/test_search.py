"""Capacity search: SLO strings parse (or are refused by name), the binary searches find what
the full grid would, with fewer simulations, and a real search's choice meets its SLO."""

from __future__ import annotations

import itertools
import math

import pytest

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler import EngineConfig
from pagedkv.sim import CostModel, WorkloadConfig, capacity_search, simulate
from pagedkv.sim.metrics import SLO, Percentiles, Summary
from pagedkv.sim.search import Bound, SearchSpace, meets, parse_slo, search

PROFILE = CostModel(
    name="test", token_knots=[1, 2, 1026], token_costs_s=[0.024, 0.03, 1.054],
    per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6,
    kv_bytes_per_token=1024, max_model_len=4096,
)
MiB = 2**20


def summary(ttft_p90: float, completed: int = 10, rejected: int = 0) -> Summary:
    p = Percentiles(mean=ttft_p90, p50=ttft_p90, p90=ttft_p90, p99=ttft_p90)
    q = Percentiles(mean=0.01, p50=0.01, p90=0.01, p99=0.01)
    return Summary(policy="paged", completed=completed, rejected=rejected, duration_s=1.0, requests_per_s=1.0,
                   output_tokens_per_s=1.0, ttft_s=p, tpot_s=q, e2e_s=p, queueing_s=q, normalized_latency_s=q,
                   kv_utilization=1.0, kv_waste=0.0, kv_occupancy=0.5, preemptions=0, prefix_hit_rate=0.0,
                   goodput_requests_per_s=1.0, slo=SLO())


def test_slo_strings() -> None:
    assert parse_slo("ttft_p90<2s, tpot_p50<100ms,e2e_p99<30") == [
        Bound(metric="ttft_p90", seconds=2.0), Bound(metric="tpot_p50", seconds=0.1),
        Bound(metric="e2e_p99", seconds=30),
    ]
    for bad in ("ttft_p95<2s", "ttft<2s", "ttft_p90>2s", "ttft_p90<0s", "ttft_p90<2h"):
        with pytest.raises(InvalidRequestError) as error:
            parse_slo(bad)
        assert error.value.param == "slo"


def test_meeting_an_slo_takes_every_request_and_every_bound() -> None:
    bounds = parse_slo("ttft_p90<1s")
    assert meets(summary(0.5), bounds)
    assert not meets(summary(1.5), bounds)
    assert not meets(summary(0.5, rejected=1), bounds)  # a rejected request fails the SLO
    assert not meets(summary(math.nan, completed=0), bounds)  # nothing completed: NaN, never a pass


# A synthetic system: TTFT p90 = rate * 1 GiB / (memory * replicas * (budget / 512)). With a
# bound of 1 s it sustains exactly memory * replicas * budget / (512 GiB) requests per second.
def synthetic(engine: EngineConfig, replicas: int, rate: float) -> Summary:
    capacity = (engine.kv_cache_memory_bytes or 0) * replicas * engine.max_num_batched_tokens / 512 / 2**30
    return summary(rate / capacity)


SPACE = SearchSpace(kv_cache_memory_bytes=[64 * MiB, 128 * MiB, 256 * MiB, 512 * MiB, 1024 * MiB],
                    max_num_batched_tokens=[512, 1024], max_num_seqs=[128], replicas=[1, 2, 4])


def test_at_a_rate_each_combination_gets_the_cheapest_memory_the_grid_would_give() -> None:
    bounds = parse_slo("ttft_p90<1s")
    result = search(SPACE, bounds, synthetic, rate=0.5)
    chosen: dict[tuple[int, int], int] = {}
    for c in result.frontier:  # cheapest first: the first of a combination is its choice
        chosen.setdefault((c.engine.max_num_batched_tokens, c.replicas), c.engine.kv_cache_memory_bytes or 0)
    for budget, replicas in itertools.product([512, 1024], [1, 2, 4]):
        grid = [m for m in sorted(SPACE.kv_cache_memory_bytes)
                if meets(synthetic(EngineConfig(kv_cache_memory_bytes=m, max_num_batched_tokens=budget), replicas, 0.5),
                         bounds)]
        assert chosen.get((budget, replicas)) == (grid[0] if grid else None)
    assert result.simulations < 5 * 6  # fewer than the grid's 30
    costs = [c.cost_bytes for c in result.frontier]
    assert costs == sorted(costs) and costs[0] == 256 * MiB  # cheapest first: 256 MiB x 1 at budget 1024


def test_without_a_rate_each_configuration_gets_its_sustained_rate_to_the_precision() -> None:
    result = search(SPACE, parse_slo("ttft_p90<1s"), synthetic, rate_range=(0.01, 100.0), precision=0.05)
    for c in result.candidates:
        exact = (c.engine.kv_cache_memory_bytes or 0) * c.replicas * c.engine.max_num_batched_tokens / 512 / 2**30
        if exact < 0.01:
            assert not c.meets
            continue
        assert c.meets and exact / 1.05 <= c.rate <= exact, (c.rate, exact)
    frontier = result.frontier
    assert [c.rate for c in frontier] == sorted(c.rate for c in frontier)  # more cost buys more rate
    assert len({c.cost_bytes for c in frontier}) == len(frontier)


def test_a_real_search_chooses_a_configuration_that_meets_its_slo() -> None:
    workload = WorkloadConfig(num_requests=150, preset="alpaca", rate=3.0, seed=4)
    space = SearchSpace(kv_cache_memory_bytes=[MiB, 4 * MiB, 16 * MiB], max_num_seqs=[8, 64],
                        max_num_batched_tokens=[512], replicas=[1, 2])
    result = capacity_search(workload, "ttft_p90<1s,tpot_p50<100ms", space, rate=3.0, profile=PROFILE)
    assert result.frontier, "some configuration of this space meets the SLO"
    best = result.frontier[0]
    if best.replicas == 1:  # run it again on its own: the same verdict
        _, again = simulate(workload, best.engine.model_copy(update={"max_model_len": 2048}), profile=PROFILE)
        assert again.ttft_s.p90 < 1 and again.tpot_s.p50 < 0.1 and again.rejected == 0


def test_what_a_search_refuses() -> None:
    closed = WorkloadConfig(num_requests=10, arrival="closed", concurrency=2)
    with pytest.raises(InvalidRequestError) as error:
        capacity_search(closed, "ttft_p90<1s", profile=PROFILE)
    assert error.value.param == "arrival"
    with pytest.raises(InvalidRequestError) as error:
        search(SPACE, parse_slo("ttft_p90<1s"), synthetic, rate=-1.0)
    assert error.value.param == "rate"
