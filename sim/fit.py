"""Fitting the cost model's prices to timed steps of the real engine (see
:mod:`pagedkv.sim.cost_model` for the model, :mod:`pagedkv.sim.calibrate` for the timing).

Torch-free, like the model it fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from pagedkv.sim.cost_model import IDLE_WAIT_S, LIGHT_LOAD_WINDOW_S, WAKE_KNOTS_S, Features, hat_basis, wake_basis
from pagedkv.sim.noise import slow_noise


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    n = a.shape[1]
    active, x = np.zeros(n, dtype=bool), np.zeros(n)
    tolerance = 1e-10 * np.abs(a).max() * np.abs(b).max()
    for _ in range(max_iter):
        gradient = a.T @ (b - a @ x)
        if active.all() or (gradient[~active] <= tolerance).all():
            break
        active[np.argmax(np.where(active, -np.inf, gradient))] = True
        while True:
            z = np.zeros(n)
            z[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
            if (z[active] > 0).all():
                x = z
                break
            shrinking = active & (z <= 0)
            alpha = np.min(x[shrinking] / (x[shrinking] - z[shrinking]))
            x = x + alpha * (z - x)
            active &= x > 1e-15
            x[~active] = 0
    return x


class Fit(NamedTuple):
    token_costs_s: list[float]
    per_decode_context_token_s: float
    per_prefill_attended_pair_s: float
    per_sampled_token_s: float
    median_relative_error: float
    step_noise: list[float]
    """Quantiles 0%, 1%, ..., 100% of log(measured / predicted): the residuals, kept for
    simulations with noise (:class:`pagedkv.sim.noise.StepNoise`); with parts, each relative to its
    run's median."""
    run_noise: list[float]
    """Quantiles 0%, 1%, ..., 100% of the runs' offsets (see :func:`fit`); empty with fewer than two parts."""
    wake_costs_s: list[float]
    """The wake-up cost at each of the ``wake_knots`` (the first 0)."""
    slow_share: float
    """How much of the residuals' normal-score variance wanders slowly (:func:`pagedkv.sim.noise.slow_noise`)."""
    corr_s: float
    """The correlation time of that slow part, seconds."""
    light_load_slowdown: float
    """How much longer steps under a light load take (see :class:`pagedkv.sim.cost_model.CostModel`)."""


def fit(features: np.ndarray, seconds: np.ndarray, knots: list[int], parts: np.ndarray | None = None,
        workloads: np.ndarray | None = None, wake_knots: Sequence[float] = WAKE_KNOTS_S,
        light_window_s: float = LIGHT_LOAD_WINDOW_S) -> Fit:
    """Non-negative fit of the curve's values at ``knots``, the three other prices and the
    wake-up costs at ``wake_knots``, and the light-load slowdown: the ratio of what the steps
    taken within ``light_window_s`` after an idle wait measured to what the prices (fitted to
    every step, those steps divided by the slowdown) make of them, in rounds until it settles.
    The steps of each run (one workload in one part, see below) are taken as one time series in
    the order given; unlabelled steps as a single one.

    ``features`` is [n, 5] rows of :class:`Features`. Residuals are weighted by
    1/sqrt(predicted seconds), between an absolute fit (which serves the long steps that decide
    throughput) and a relative one (which serves the short steps that decide latency). The
    weights come from the prediction, not the measurement (a first fit weighted by the measured
    seconds, then reweighted twice by its own predictions): step times here are skewed (a few
    steps run 1.3-2x slow), and weights from the measured seconds favour the steps that happened
    to run fast, so that fit priced the steps of a calibration 1.6% below what they measured in
    all (2.2% on average per step). Weighted by the prediction, the fit is unbiased for the mean
    step, which is what a run's duration and TPOT add up.

    ``parts`` labels each step with the calibration part it was timed in (parts taken minutes
    apart). This machine's speed drifts by 10-20% over minutes and moves every step of a run
    together, which independent per-step noise averages away over a run's hundreds of steps: so
    the residuals are split into each run's offset (the run-level factor, ``run_noise``) and the
    scatter around it (``step_noise``), and the prices are refitted to each workload's median
    run's speed. A run is one workload (``workloads`` labels each step's) in one part: its offset
    is log(its steps' measured total / their priced total) less the median of that workload's
    runs', from the workloads timed in two parts or more (0 for the others, whose speed cannot be
    told from the price of their shapes). A run's speed is its total, as the prices are the mean
    step's: taken as its median residual, a run with a few slow stretches passed for a typical
    one, and on the 10:51 sitting's saved steps the bursts were priced 3.3% under their median
    run. So a workload the curve prices a little high or low does not pass for the machine's
    speed, and one run in a slow minute (a burst's steps 18% slower than its part's streams, in
    one sitting) does not price its batch shapes.
    """
    features, seconds = np.asarray(features, dtype=float), np.asarray(seconds, dtype=float)
    if features.ndim != 2 or features.shape[1] != len(Features._fields):
        raise ValueError(f"features must be [n, {len(Features._fields)}] rows of Features, got {features.shape}")
    design = np.column_stack([hat_basis(features[:, 0], knots), features[:, 1:4],
                              wake_basis(features[:, 4], wake_knots)])

    def solve(target: np.ndarray) -> np.ndarray:
        weight, floor = 1 / np.sqrt(target), 0.01 * np.median(target)
        for _ in range(3):
            coef = nnls(design * weight[:, None], target * weight)
            weight = 1 / np.sqrt(np.maximum(design @ coef, floor))
        return coef

    zeros = np.zeros(len(seconds))
    labels = np.column_stack([(zeros if parts is None else parts).astype(str),
                              (zeros if workloads is None else workloads).astype(str)])
    runs, run_of_step = np.unique(labels, axis=0, return_inverse=True)
    run_of_step = run_of_step.ravel()
    with_parts = parts is not None and len(np.unique(parts)) >= 2
    starts = _step_starts(seconds, features[:, 4], run_of_step)
    light = _light_load(starts, features[:, 4] > IDLE_WAIT_S, run_of_step, light_window_s)

    def prices(base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The prices and each run's offset, fitted to steps that took ``base`` seconds."""
        coef = solve(base)
        if not with_parts:
            return coef, np.zeros(len(runs))
        # Fitted to every run as timed, the prices describe a machine of the runs' mean speed;
        # refitted with each run's steps scaled by its offset, they describe the median run's,
        # which is what a simulation's central value should predict: the median real run.
        coef = solve(base * np.exp(-_run_offsets(base, design @ coef, runs[:, 1], run_of_step)[run_of_step]))
        return coef, _run_offsets(base, design @ coef, runs[:, 1], run_of_step)

    # Told apart from the prices only by steps of both kinds: all light (one Poisson run fitted on
    # its own) or none, it is left at 0.
    identifiable = bool(light.any() and not light.all())
    slowdown = 0.0
    for _ in range(_LIGHT_ROUNDS):
        base = seconds / (1 + slowdown * light)  # the steps as they would have run under a heavy load
        coef, offsets = prices(base)
        if not identifiable:
            break
        at_speed = design @ coef * np.exp(offsets[run_of_step])
        updated = max(float(seconds[light].sum() / at_speed[light].sum()) - 1.0, 0.0)
        if abs(updated - slowdown) < _LIGHT_TOLERANCE:
            break
        slowdown = updated
    predicted = design @ coef
    residuals = np.log(base / np.maximum(predicted, 1e-12)) - offsets[run_of_step]
    error = float(np.median(np.abs(predicted * (1 + slowdown * light) - seconds) / seconds))
    slow_share, corr_s = slow_noise(residuals, starts, run_of_step)
    levels = np.linspace(0, 1, 101)
    run_noise = [float(q) for q in np.quantile(offsets, levels)] if with_parts else []
    k = len(knots)
    return Fit([float(c) for c in coef[:k]], float(coef[k]), float(coef[k + 1]), float(coef[k + 2]), error,
               [float(q) for q in np.quantile(residuals, levels)], run_noise, [0.0, *map(float, coef[k + 3:])],
               slow_share, corr_s, slowdown)


_LIGHT_ROUNDS, _LIGHT_TOLERANCE = 50, 1e-4
"""The fit alternates the prices and the light-load slowdown until the slowdown moves by less
than the tolerance: the light steps pull the prices too, so each round closes part of the gap
(on a synthetic calibration whose light steps ran 6% slow: 0.053 after four rounds, 0.062 after
eight, 0.0622 after thirty)."""


def _light_load(starts: np.ndarray, woke: np.ndarray, runs: np.ndarray, window_s: float) -> np.ndarray:
    """Which steps start within ``window_s`` after their run's latest idle wait (``woke``: the step
    came after one; ``starts`` as :func:`_step_starts` gives them)."""
    light = np.zeros(len(starts), dtype=bool)
    for run in np.unique(runs):
        mine = np.flatnonzero(runs == run)
        woke_at = np.maximum.accumulate(np.where(woke[mine], starts[mine], -np.inf))
        light[mine] = starts[mine] - woke_at < window_s
    return light


def _step_starts(seconds: np.ndarray, idle: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """When each step started, in seconds since its run's first step (steps in time order within
    each run): the steps and idle waits before it (a step's seconds include the engine's
    bookkeeping before it, as :class:`pagedkv.sim.calibrate.TimedExecutor` times them)."""
    starts = np.zeros(len(seconds))
    for run in np.unique(runs):
        mine = np.flatnonzero(runs == run)
        elapsed = np.cumsum(seconds[mine] + idle[mine])
        starts[mine] = elapsed - seconds[mine] - elapsed[0] + seconds[mine][0]
    return starts


def _run_offsets(seconds: np.ndarray, priced: np.ndarray, kind_of_run: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Each run's log(measured total / priced total) less the median of its workload's runs'; 0
    for a workload timed in one run (see :func:`fit`). ``index`` maps each step to its run."""
    priced = np.maximum(priced, 1e-12)
    speeds = np.array([np.log(seconds[index == run].sum() / priced[index == run].sum())
                       for run in range(len(kind_of_run))])
    offsets = np.zeros(len(kind_of_run))
    for kind in np.unique(kind_of_run):
        mine = kind_of_run == kind
        if mine.sum() >= 2:
            offsets[mine] = speeds[mine] - np.median(speeds[mine])
    return offsets
