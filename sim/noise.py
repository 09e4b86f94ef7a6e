"""Step-time noise for simulations: multipliers drawn from a profile's recorded residuals, and
how much of that noise is the machine's speed wandering over seconds rather than each step's own.

On this VM the residuals of steps a few tens of milliseconds apart correlate about 0.65 (normal
scores), and the correlation fades over a second or two (measured on 2026-12-02's calibration and
real runs). Drawn independently per step, that noise averages out over the 50-100 steps of one
request, so every simulated request decoded at the same pace while the real ones did not: the
simulated Poisson TPOT p90 ran 12-17% short even when priced by the real runs' own steps. So a
draw is a Gaussian copula: a normal score that is ``slow_share`` of an Ornstein-Uhlenbeck process
in virtual time (correlation exp(-dt / corr_s)) and the rest independent, mapped through the
residuals' quantiles: each step's multiplier keeps the recorded distribution, and steps close in
time move together.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

_NORMAL = NormalDist()


class StepNoise:
    """Multipliers for simulated step times, drawn from a profile's recorded residuals
    (``CostModel.step_noise``, inverse-transform sampling between its quantiles) with a seed
    of its own: a simulation with noise takes millions of steps, so independent draws come a few
    thousand at a time. With ``run_noise`` quantiles, every multiplier is also scaled by one
    factor drawn from them for the whole run (``run_factor``): the machine's speed that run. With
    ``slow_share`` > 0, draws at nearby times correlate (see the module's docstring)."""

    def __init__(self, quantiles: list[float], seed: int, run_noise: list[float] | None = None,
                 slow_share: float = 0.0, corr_s: float = 1.0) -> None:
        self._levels, self._quantiles = np.linspace(0, 1, len(quantiles)), np.asarray(quantiles)
        self._rng = np.random.default_rng(seed)
        self.run_factor = 1.0
        if run_noise:
            draw = np.random.default_rng([seed, 1]).random()  # its own stream: step draws stay as they were
            self.run_factor = float(np.exp(np.interp(draw, np.linspace(0, 1, len(run_noise)), run_noise)))
        self._batch: list[float] = []
        self._slow, self._fast = math.sqrt(slow_share), math.sqrt(1.0 - slow_share)
        self._corr_s = corr_s
        self._state: float | None = None  # the slow process's normal score at ``_last``
        self._last = 0.0
        self._normals: list[float] = []
        self._q = [float(q) for q in quantiles]  # evenly spaced levels: interpolated by hand, per step

    def __call__(self, now: float) -> float:
        """The multiplier of a step starting at virtual time ``now`` (non-decreasing)."""
        if self._slow == 0.0:
            if not self._batch:
                draws = np.interp(self._rng.random(4096), self._levels, self._quantiles)
                self._batch = (np.exp(draws) * self.run_factor).tolist()
            return self._batch.pop()
        if len(self._normals) < 2:
            self._normals = self._rng.standard_normal(8192).tolist()
        if self._state is None:
            self._state = self._normals.pop()
        else:
            keep = math.exp(-max(now - self._last, 0.0) / self._corr_s)
            self._state = keep * self._state + math.sqrt(1.0 - keep * keep) * self._normals.pop()
        self._last = now
        score = self._slow * self._state + self._fast * self._normals.pop()
        position = min(max(_NORMAL.cdf(score), 0.0), 1.0) * (len(self._q) - 1)
        i = min(int(position), len(self._q) - 2)
        q = self._q[i] + (position - i) * (self._q[i + 1] - self._q[i])
        return math.exp(q) * self.run_factor


def slow_noise(residuals: np.ndarray, times: np.ndarray, runs: np.ndarray, max_lag: int = 64) -> tuple[float, float]:
    """``(slow_share, corr_s)`` fitted to the residuals' normal scores: the correlation of two
    steps of one run ``dt`` seconds apart (step starts, ``times``) modelled as
    slow_share * exp(-dt / corr_s), from pairs of steps at most ``max_lag`` steps apart, binned by
    dt from 10 ms to 3 s. Calibration runs last seconds and their residuals are taken about each
    run's median, which pulls long-lag correlations down: so corr_s is, if anything, short."""
    ranks = np.argsort(np.argsort(residuals))
    scores = np.array([_NORMAL.inv_cdf((r + 0.5) / len(residuals)) for r in ranks])
    edges = np.geomspace(0.01, 3.0, 13)
    sums, counts = np.zeros(len(edges) + 1), np.zeros(len(edges) + 1)
    for run in np.unique(runs):
        mine = np.flatnonzero(runs == run)
        s, t = scores[mine], times[mine]
        for lag in range(1, min(max_lag, len(mine) - 1) + 1):
            b = np.searchsorted(edges, t[lag:] - t[:-lag])
            np.add.at(sums, b, s[lag:] * s[:-lag])
            np.add.at(counts, b, 1)
    inner = counts[1:-1] >= 20  # the bins between the edges, with enough pairs to say anything
    if not inner.any():
        return 0.0, 1.0
    dt = np.sqrt(edges[:-1] * edges[1:])[inner]
    corr, weight = (sums[1:-1] / np.maximum(counts[1:-1], 1))[inner], counts[1:-1][inner]
    best = (np.inf, 0.0, 1.0)
    for corr_s in np.geomspace(0.02, 20.0, 61):
        shape = np.exp(-dt / corr_s)
        share = float(np.clip((weight * shape * corr).sum() / (weight * shape * shape).sum(), 0.0, 1.0))
        error = float((weight * (corr - share * shape) ** 2).sum())
        if error < best[0]:
            best = (error, share, float(corr_s))
    return best[1], best[2]
