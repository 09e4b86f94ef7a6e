"""A fleet of simulated replicas behind a router: one replica is exactly the single-engine
simulation, every request is accounted for per replica, each router sends requests where it
says, and prefix-aware routing turns shared prefixes into cache hits."""

from __future__ import annotations

import json

import pytest

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler import EngineConfig
from pagedkv.sim import CostModel, WorkloadConfig, generate, simulate, simulate_fleet
from pagedkv.sim.fleet import run_fleet

PROFILE = CostModel(
    name="test", token_knots=[1, 2, 1026], token_costs_s=[0.024, 0.03, 1.054],
    per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6,
    kv_bytes_per_token=1024, max_model_len=4096,
)
ENGINE = EngineConfig(block_size=16, kv_cache_memory_bytes=8 * 2**20, max_model_len=2048, max_num_batched_tokens=512,
                      enable_prefix_caching=True)
# 24 prefixes of 8 blocks: all of them (192 blocks) do not fit one replica's 128-block pool, a third do
SHARED = WorkloadConfig(num_requests=240, preset="alpaca", rate=4.0, prefix_groups=24, prefix_len=128, seed=7)
SMALL = ENGINE.model_copy(update={"kv_cache_memory_bytes": 2 * 2**20})


def test_one_replica_is_the_single_engine_simulation() -> None:
    workload = WorkloadConfig(num_requests=150, preset="sharegpt", rate=1.0, seed=3)
    _, single = simulate(workload, ENGINE, profile=PROFILE)
    for router in ("round-robin", "least-outstanding", "prefix-aware"):
        _, fleet = simulate_fleet(workload, ENGINE, 1, router, profile=PROFILE)
        assert fleet.replicas[0].model_dump_json() == single.model_dump_json()
        assert fleet.fleet.model_dump_json() == single.model_dump_json()


@pytest.mark.parametrize("router", ["round-robin", "least-outstanding", "prefix-aware"])
def test_every_request_is_accounted_for_per_replica_and_in_all(router: str) -> None:
    """Arrived == finished + rejected on each replica; here reserve-max-len rejects the requests
    whose whole context cannot be reserved, so both terms are non-zero."""
    workload = WorkloadConfig(num_requests=200, preset="sharegpt", rate=3.0, seed=2)
    engine = ENGINE.model_copy(update={"kv_cache_memory_bytes": 1 * 2**20, "max_model_len": 1200})
    result = run_fleet(generate(workload), engine, PROFILE, 3, router, "reserve-max-len")  # type: ignore[arg-type]
    assert sum(result.routed) == 200
    for routed, replica in zip(result.routed, result.replicas, strict=True):
        assert routed == len(replica.records) + replica.rejected
    merged = result.merged()
    assert merged.rejected > 0 and len(merged.records) + merged.rejected == 200


def test_round_robin_deals_requests_in_turn() -> None:
    result = run_fleet(generate(SHARED), ENGINE, PROFILE, 4, "round-robin")
    assert result.routed == [60, 60, 60, 60]


def test_least_outstanding_spreads_a_burst_evenly() -> None:
    burst = WorkloadConfig(num_requests=90, preset="alpaca", arrival="offline", seed=1)  # all at time 0
    result = run_fleet(generate(burst), ENGINE, PROFILE, 3, "least-outstanding")
    assert result.routed == [30, 30, 30]


def test_prefix_aware_routing_turns_shared_prefixes_into_cache_hits() -> None:
    """Round-robin sends every prefix to every replica, whose pool cannot keep them all;
    prefix-aware routing gives each prefix a home, so its blocks stay cached there."""
    _, round_robin = simulate_fleet(SHARED, SMALL, 3, "round-robin", profile=PROFILE)
    result, prefix = simulate_fleet(SHARED, SMALL, 3, "prefix-aware", profile=PROFILE)
    assert prefix.fleet.prefix_hit_rate > round_robin.fleet.prefix_hit_rate + 0.3
    assert prefix.fleet.ttft_s.p50 < round_robin.fleet.ttft_s.p50 / 2
    assert all(n > 0 for n in result.routed)
    assert prefix.fleet.completed == round_robin.fleet.completed == 240


def test_what_a_fleet_refuses() -> None:
    closed = WorkloadConfig(num_requests=10, arrival="closed", concurrency=2)
    with pytest.raises(InvalidRequestError, match="open-loop") as error:
        simulate_fleet(closed, ENGINE, 2, profile=PROFILE)
    assert error.value.param == "arrival"
    with pytest.raises(InvalidRequestError, match="at least 1") as error:
        simulate_fleet(SHARED, ENGINE, 0, profile=PROFILE)
    assert error.value.param == "replicas"
    with pytest.raises(InvalidRequestError, match="router must be one of") as error:
        simulate_fleet(SHARED, ENGINE, 2, "random", profile=PROFILE)  # type: ignore[arg-type]
    assert error.value.param == "router"


def test_fleet_summary_round_trips_through_json() -> None:
    _, summary = simulate_fleet(SHARED, ENGINE, 2, "prefix-aware", profile=PROFILE)
    payload = json.loads(summary.model_dump_json())
    assert payload["router"] == "prefix-aware" and len(payload["replicas"]) == 2 and sum(payload["routed"]) == 240
