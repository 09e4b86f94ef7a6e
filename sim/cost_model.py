"""How long one engine step takes, as a function of what the step computes.

    seconds = tokens_curve(batched_tokens) + c * decode_context_tokens + d * prefill_attended_pairs
              + e * sampled_tokens + wake(idle_seconds),  times (1 + light_load_slowdown) in light load

- ``tokens_curve``: the time to push a batch of that many tokens (prefill chunk tokens plus
  one per decoding sequence) through every weight matrix, the vocabulary projection and
  the Python around it. It is piecewise linear between knots at powers of two, not one
  straight line: on a CPU a step of 1-2 rows reads every weight once from memory (34 ms
  for SmolLM2-135M here), 8 rows already cost 90 ms because the BLAS switches kernels, and
  only from a few hundred rows on does the cost grow in proportion to the rows (about
  2.4 ms per token). A straight line fitted through all of that made short prompts
  joining a running batch (TTFT under light load) a quarter too cheap and a burst of 48
  short prompts twice too slow, whatever per-sequence or per-step terms were added.
- ``decode_context_tokens``: the keys the decoding sequences attend to (gathering K/V from
  pages is memory-bound, and so priced per key);
- ``prefill_attended_pairs``: query-key pairs of the prefill chunks (compute-bound);
- ``sampled_tokens``: rows of logits (one per decoding sequence, one per prompt that
  completes): the vocabulary projection (49152 x 576 for SmolLM2, about a millisecond a
  row here) and the sampler run only for them, so a prefill token costs less than a
  decode. Without this term the curve, fitted mostly on decode batches, priced a 20-token
  prompt joining three decodes 25% too high.
- ``wake(idle_seconds)``: the extra time of the first step after the engine sat idle (no
  request to serve) for that long, zero after a step that followed another. On this VM a
  one-sequence decode step took 15.8 ms straight after another step, 16.9 ms after 50 ms
  idle and 17.8 ms after 0.3 s (40 of each, interleaved): caches and the cores' clocks have
  gone cold. Under light load that step is the prefill of the request that just arrived,
  so it is TTFT. Linear in log(idle) between knots (:data:`WAKE_KNOTS_S`), zero below the
  first, flat beyond the last.
- ``light``: every step costs ``light_load_slowdown`` more (3-14% in seven sittings here) while
  the engine serves a light load, that is within ``light_load_window_s`` (8 s) after it idled.
  The same shapes of step, timed in runs that never idled (bursts, a closed loop) and in runs
  that did (Poisson streams), differed by that much, in every sitting: per-step prices fitted
  to both priced the real Poisson run's steps 0.3-7.6% low (1.067, 1.003, 1.042, 1.076 of the
  price in total, 2026-12-02), the bursts' within 3.4%. Neither the time since the last
  prefill nor the share of recent time spent idle told the two apart as well.

The knots' values, the three other prices and the wake-up costs are fitted (:func:`pagedkv.sim.fit.fit`) to steps of the
real engine timed by ``pagedkv sim calibrate`` and saved as a small JSON profile, with the
model's K/V size so that the simulator sizes the pool exactly as the engine would.
Torch-free, and a step costs one bisection: the simulator prices millions of steps.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedkv.scheduler.plan import SchedulerOutput

PROFILES = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = PROFILES / "smollm2-135m-cpu-float32.json"


IDLE_WAIT_S = 0.003
"""A gap between two steps longer than this is the engine idling (waiting for a request); a
shorter one is its own bookkeeping (scheduling, outputs: 0.1-0.4 ms here), which belongs to the
step after it (:class:`pagedkv.sim.calibrate.TimedExecutor`)."""

WAKE_KNOTS_S = (IDLE_WAIT_S, 0.03, 0.3)
"""Idle times (seconds) at which the wake-up cost is fitted; the first is pinned at zero."""

LIGHT_LOAD_WINDOW_S = 8.0
"""How long after an idle wait the engine's steps count as light load (see :class:`CostModel`)."""


class Features(NamedTuple):
    """What a step's cost depends on, from the totals the scheduler keeps (O(1)), and how long
    the engine sat idle before it."""

    tokens: int
    decode_context: int
    prefill_pairs: int
    samples: int
    idle_s: float = 0.0


def step_features(plan: SchedulerOutput, idle_s: float = 0.0) -> Features:
    return Features(plan.num_batched_tokens, plan.num_single_token_context, plan.num_chunk_attended, plan.num_samples,
                    idle_s)


def power_of_two_knots(max_tokens: int) -> list[int]:
    """1, 2, 4, ... up to the first power of two >= ``max_tokens``."""
    knots = [1]
    while knots[-1] < max_tokens:
        knots.append(knots[-1] * 2)
    return knots if len(knots) > 1 else [1, 2]


def hat_basis(tokens: np.ndarray, knots: list[int]) -> np.ndarray:
    """[n, len(knots)] weights such that ``basis @ values`` interpolates ``values`` (given at
    ``knots``) linearly at ``tokens``, extrapolating the last segment beyond the last knot."""
    x = np.asarray(tokens, dtype=float)
    k = np.asarray(knots, dtype=float)
    segment = np.clip(np.searchsorted(k, x, side="right") - 1, 0, len(k) - 2)
    t = (x - k[segment]) / (k[segment + 1] - k[segment])
    basis = np.zeros((len(x), len(k)))
    rows = np.arange(len(x))
    basis[rows, segment] = 1 - t
    basis[rows, segment + 1] = t
    return basis


def wake_basis(idle_s: np.ndarray, knots: Sequence[float]) -> np.ndarray:
    """[n, len(knots) - 1] weights such that ``basis @ costs[1:]`` is the wake-up cost at
    ``idle_s`` (costs given at ``knots``, the first pinned at zero): linear in log(idle)
    between knots, zero below the first, flat beyond the last."""
    x = np.log(np.clip(np.asarray(idle_s, dtype=float), knots[0], knots[-1]))
    return hat_basis(x, list(np.log(knots)))[:, 1:]


class CostModel(BaseModel):
    """A fitted step-time model plus the facts about the model the simulator needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    token_knots: list[int] = Field(min_length=2, description="batch sizes in tokens, increasing")
    token_costs_s: list[float] = Field(min_length=2, description="step seconds at each knot, attention aside")
    per_decode_context_token_s: float = Field(ge=0)
    per_prefill_attended_pair_s: float = Field(ge=0)
    per_sampled_token_s: float = Field(0.0, ge=0)
    kv_bytes_per_token: int = Field(ge=1)
    max_model_len: int = Field(ge=1)
    swap_bytes_per_s: float = Field(
        10e9, gt=0, description="copy rate between the pool and the swap space (assumed, not fitted: memcpy or PCIe)"
    )
    wake_knots_s: list[float] = Field(default_factory=list, description=(
        "idle seconds, increasing, at which wake_costs_s are given; empty: no wake-up cost"))
    wake_costs_s: list[float] = Field(default_factory=list, description=(
        "extra seconds of the first step after the engine idled that long (the first is 0)"))
    fit_note: str = ""
    step_noise: list[float] = Field(default_factory=list, description=(
        "quantiles (0% to 100%, evenly spaced) of log(measured / predicted) over the fitted steps, "
        "each taken relative to its calibration run's median when run_noise is recorded: what a "
        "simulation with noise draws each step's time from; empty: none recorded"))
    run_noise: list[float] = Field(default_factory=list, description=(
        "quantiles (0% to 100%, evenly spaced) of the calibration runs' offsets (a run: one workload in "
        "one part; its median log(measured / predicted) less its workload's median run's): how the "
        "machine's speed moved whole runs, drawn once per simulation with noise; "
        "empty: none recorded (a calibration in one part)"))
    noise_slow_share: float = Field(0.0, ge=0, le=1, description=(
        "how much of the step noise (its normal scores' variance) wanders with the machine's speed over "
        "seconds instead of each step's own: steps noise_corr_s apart correlate noise_slow_share / e"))
    noise_corr_s: float = Field(1.0, gt=0, description="the correlation time of that slow part, seconds")
    light_load_slowdown: float = Field(0.0, ge=0, description=(
        "how much longer every step takes (0.05: 5%) while the engine serves a light load: one that "
        "starts within light_load_window_s after the engine idled (a gap over IDLE_WAIT_S)"))
    light_load_window_s: float = Field(LIGHT_LOAD_WINDOW_S, gt=0)

    @model_validator(mode="after")
    def _check_curve(self) -> CostModel:
        for name, quantiles in (("step_noise", self.step_noise), ("run_noise", self.run_noise)):
            if len(quantiles) == 1 or any(b < a for a, b in pairwise(quantiles)):
                raise ValueError(f"{name} must be empty or at least two quantiles in increasing order")
        if len(self.wake_knots_s) != len(self.wake_costs_s) or len(self.wake_knots_s) == 1:
            raise ValueError("wake_knots_s and wake_costs_s must have the same length, 0 or at least 2")
        if self.wake_knots_s and (self.wake_knots_s[0] <= 0 or any(b <= a for a, b in pairwise(self.wake_knots_s))):
            raise ValueError("wake_knots_s must be positive and strictly increasing")
        if self.wake_costs_s and (self.wake_costs_s[0] != 0 or min(self.wake_costs_s) < 0):
            raise ValueError("wake_costs_s must be >= 0, the first 0")
        if len(self.token_knots) != len(self.token_costs_s):
            raise ValueError("token_knots and token_costs_s must have the same length")
        if self.token_knots[0] < 1 or any(b <= a for a, b in pairwise(self.token_knots)):
            raise ValueError("token_knots must be positive and strictly increasing")
        if min(self.token_costs_s) < 0:
            raise ValueError("token_costs_s must be >= 0")
        return self

    def tokens_time(self, tokens: int) -> float:
        """The curve at ``tokens``: linear between knots, the last segment extended beyond."""
        knots, costs = self.token_knots, self.token_costs_s
        i = min(max(bisect.bisect_right(knots, tokens) - 1, 0), len(knots) - 2)
        t = (tokens - knots[i]) / (knots[i + 1] - knots[i])
        return max(costs[i] + t * (costs[i + 1] - costs[i]), 0.0)

    def wake_time(self, idle_s: float) -> float:
        """The extra seconds of a step after ``idle_s`` of the engine idle (0.0 below the first knot)."""
        knots = self.wake_knots_s
        if not knots or idle_s <= knots[0]:
            return 0.0
        if idle_s >= knots[-1]:
            return self.wake_costs_s[-1]
        i = bisect.bisect_right(knots, idle_s) - 1
        t = math.log(idle_s / knots[i]) / math.log(knots[i + 1] / knots[i])
        return self.wake_costs_s[i] + t * (self.wake_costs_s[i + 1] - self.wake_costs_s[i])

    def step_time(self, plan: SchedulerOutput, idle_s: float = 0.0) -> float:
        """The seconds of ``plan``'s step, taken after ``idle_s`` of the engine idle."""
        return self.time_of(*step_features(plan, idle_s))

    def time_of(self, tokens: int, context: int, pairs: int, samples: int, idle_s: float = 0.0) -> float:
        """A step's seconds from its :func:`step_features`."""
        return self._priced(self.tokens_time(tokens), context, pairs, samples) + self.wake_time(idle_s)

    def decode_times(self, num_seqs: int, context: int, steps: int) -> Iterator[float]:
        """The seconds of consecutive steps that each decode one token of ``num_seqs``
        sequences, the first attending ``context`` keys: each exactly :meth:`time_of`
        its features, with the curve looked up once."""
        curve, per_key = self.tokens_time(num_seqs), self.per_decode_context_token_s
        sampled = self.per_sampled_token_s * num_seqs
        # _priced(curve, keys, 0, num_seqs) with its zero pairs term dropped: adding 0.0 to a
        # non-negative sum changes no bit, so each step's price is the same float.
        for keys in range(context, context + steps * num_seqs, num_seqs):
            yield curve + per_key * keys + sampled

    def _priced(self, curve: float, context: int, pairs: int, samples: int) -> float:
        return (curve + self.per_decode_context_token_s * context + self.per_prefill_attended_pair_s * pairs
                + self.per_sampled_token_s * samples)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PROFILE) -> CostModel:
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.model_dump(), indent=2) + "\n")
