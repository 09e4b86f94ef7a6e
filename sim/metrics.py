"""Turn a run's records into the numbers people compare: throughput, latency percentiles,
memory utilization, preemptions, prefix hits, goodput under an SLO."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pagedkv.scheduler.validation import InputModel
from pagedkv.sim.driver import RequestRecord, RunResult


class Percentiles(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: np.ndarray) -> Percentiles:
        if len(values) == 0:
            return cls(mean=float("nan"), p50=float("nan"), p90=float("nan"), p99=float("nan"))
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(mean=float(values.mean()), p50=float(p50), p90=float(p90), p99=float(p99))


class SLO(InputModel):
    """A request is *good* if its first token and its pace both meet these bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_s: float = Field(10.0, gt=0)
    """Time to first token, seconds."""
    tpot_s: float = Field(0.5, gt=0)
    """Time per output token after the first, seconds."""


class Summary(BaseModel):
    model_config = ConfigDict(frozen=True)

    policy: str
    completed: int
    rejected: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_s: Percentiles
    tpot_s: Percentiles
    e2e_s: Percentiles
    queueing_s: Percentiles
    normalized_latency_s: Percentiles  # end-to-end latency per output token
    kv_utilization: float  # slots holding K/V / slots held back, time-weighted
    kv_waste: float  # 1 - kv_utilization
    kv_occupancy: float  # slots held back / pool capacity, time-weighted
    preemptions: int
    preempted_by_swap: int = 0  # of those, how many kept their K/V in the swap space
    prefix_hit_rate: float
    goodput_requests_per_s: float
    slo: SLO


def request_columns(records: Sequence[RequestRecord]) -> dict[str, np.ndarray]:
    """The records' fields as float columns, by name (``first_token`` is NaN for a request
    that failed before its first token)."""
    r = np.array(records, dtype=float).reshape(-1, len(RequestRecord._fields))
    return dict(zip(RequestRecord._fields, r.T, strict=True))


def summarize(result: RunResult, slo: SLO | None = None) -> Summary:
    slo = slo or SLO()
    stats = result.stats
    if stats is None:
        raise ValueError("the run has not finished: it has no stats yet")
    r = request_columns(result.records)
    arrival, scheduled, first, finish = r["arrival"], r["first_scheduled"], r["first_token"], r["finish"]
    output, preemptions = r["output_len"], r["preemptions"]
    completed = len(result.records)
    duration = float(finish.max() - arrival.min()) if completed else 0.0
    tpot = np.where(output > 1, (finish - first) / np.maximum(output - 1, 1), 0.0)
    ttft = first - arrival
    good = (ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)

    dt = np.array(result.steps.duration)
    stored = np.array(result.steps.stored_slots, dtype=float)
    reserved = np.array(result.steps.reserved_slots, dtype=float)
    busy = reserved > 0
    weight = dt[busy].sum()
    utilization = float((dt[busy] * stored[busy] / reserved[busy]).sum() / weight) if weight > 0 else 1.0
    occupancy = float((dt * reserved).sum() / (dt.sum() * result.capacity_slots)) if dt.sum() > 0 else 0.0
    return Summary(
        policy=result.policy,
        completed=completed,
        rejected=result.rejected,
        duration_s=duration,
        requests_per_s=completed / duration if duration else 0.0,
        output_tokens_per_s=float(output.sum()) / duration if duration else 0.0,
        ttft_s=Percentiles.of(ttft),
        tpot_s=Percentiles.of(tpot),
        e2e_s=Percentiles.of(finish - arrival),
        queueing_s=Percentiles.of(scheduled - arrival),
        normalized_latency_s=Percentiles.of((finish - arrival) / output),
        kv_utilization=utilization,
        kv_waste=1.0 - utilization,
        kv_occupancy=occupancy,
        preemptions=int(preemptions.sum()),
        preempted_by_swap=stats.num_swapped_out,
        prefix_hit_rate=stats.prefix_hit_rate,
        goodput_requests_per_s=float(good.sum()) / duration if duration else 0.0,
        slo=slo,
    )
