"""How long one engine step takes, as a linear function of what the step computes.

    seconds = overhead + a * prefill_tokens + b * decode_seqs
                       + c * decode_context_tokens + d * prefill_attended_pairs + e * prefill_seqs

- ``overhead``: per-step cost independent of the batch (on a CPU, mostly reading every
  weight from memory once, plus Python);
- ``prefill_tokens``: tokens in multi-token chunks (matmuls on every token);
- ``decode_seqs``: sequences computing one token (matmuls, vocabulary projection, sampling);
- ``decode_context_tokens``: the keys those decodes attend to (gathering K/V is
  memory-bound: measured at about ten times the cost per key of prefill attention);
- ``prefill_attended_pairs``: query-key pairs of the prefill chunks (compute-bound attention);
- ``prefill_seqs``: prefill chunks in the step. Each is attended on its own, but mostly this
  term prices the jump a prefill causes: a decode-only step multiplies a handful of rows
  through memory-bound matmuls; add a prompt's tokens and the same weights are read for a
  much larger product. Without it, short prompts joining a running batch (TTFT under light
  load) came out 26% too cheap.

The coefficients are fitted (:func:`fit`) to steps of the real engine timed by
``pagedkv sim calibrate`` and saved as a small JSON profile, with the model's K/V size so
that the simulator sizes the pool exactly as the engine would. Torch-free.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scheduler.outputs import SchedulerOutput

PROFILES = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = PROFILES / "smollm2-135m-cpu-float32.json"
def step_features(plan: SchedulerOutput) -> tuple[int, int, int, int, int, int]:
    """The regressors of one step, read from the totals the scheduler keeps (O(1))."""
    decode = plan.num_single_token_seqs
    return (1, plan.num_batched_tokens - decode, decode, plan.num_single_token_context, plan.num_chunk_attended,
            len(plan.scheduled) - decode)


class CostModel(BaseModel):
    """A fitted step-time model plus the facts about the model the simulator needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    overhead_s: float = Field(ge=0)
    per_prefill_token_s: float = Field(ge=0)
    per_decode_seq_s: float = Field(ge=0)
    per_decode_context_token_s: float = Field(ge=0)
    per_prefill_attended_pair_s: float = Field(ge=0)
    per_prefill_seq_s: float = Field(ge=0)
    kv_bytes_per_token: int = Field(ge=1)
    max_model_len: int = Field(ge=1)
    fit_note: str = ""

    @property
    def coefficients(self) -> tuple[float, ...]:
        return (self.overhead_s, self.per_prefill_token_s, self.per_decode_seq_s,
                self.per_decode_context_token_s, self.per_prefill_attended_pair_s, self.per_prefill_seq_s)

    def step_time(self, plan: SchedulerOutput) -> float:
        return sum(c * f for c, f in zip(self.coefficients, step_features(plan)))

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PROFILE) -> CostModel:
        return cls.model_validate_json(Path(path).read_text())

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.model_dump(), indent=2) + "\n")


def fit(features: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares coefficients for ``features`` ([n, k]) that are all non-negative.

    With a handful of regressors, exact non-negative least squares is cheap by enumeration:
    solve on every subset of columns, keep the best solution whose coefficients are all >= 0.
    Returns the coefficients and the median relative error of the fitted step times.
    """
    features, seconds = np.asarray(features, dtype=float), np.asarray(seconds, dtype=float)
    best, best_residual = np.zeros(features.shape[1]), np.inf
    for size in range(1, features.shape[1] + 1):
        for cols in itertools.combinations(range(features.shape[1]), size):
            coef, *_ = np.linalg.lstsq(features[:, cols], seconds, rcond=None)
            if (coef < 0).any():
                continue
            residual = float(np.sum((features[:, cols] @ coef - seconds) ** 2))
            if residual < best_residual:
                best_residual, best = residual, np.zeros(features.shape[1])
                best[list(cols)] = coef
    predicted = features @ best
    return best, float(np.median(np.abs(predicted - seconds) / seconds))
