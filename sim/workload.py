"""Workloads: when requests arrive, how long their prompts and outputs are, what they share.

Everything is drawn from one seeded numpy generator, so a workload is a pure function of
its :class:`WorkloadConfig`. Lengths are clipped so that prompt + output fits the model.

Length presets are log-normal, with means set to the dataset averages the vLLM paper
reports (ShareGPT: 161 prompt / 338 output tokens; Alpaca: 19 / 58). The paper gives the
means and histograms, not the spread; the ``sigma`` values are our reading of those
histograms (ShareGPT long-tailed, Alpaca narrow).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from pagedkv.scheduler.validation import InputModel

TRACES = Path(__file__).parent / "traces"


T = TypeVar("T")


class RequestSpec(NamedTuple):
    """One request of a workload. ``prompt_token_ids`` is set when the tokens matter
    (shared prefixes, a trace that carries them); otherwise only the length does."""

    arrival_time: float
    prompt_len: int
    output_len: int
    prompt_token_ids: tuple[int, ...] | None = None
    prefix_group: int | None = None
    priority: int = 0


class LengthDist(InputModel):
    """``fixed`` (value), ``uniform`` (low..high inclusive) or ``lognormal`` (mean, sigma)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fixed", "uniform", "lognormal"]
    value: int | None = Field(None, ge=1)
    low: int | None = Field(None, ge=1)
    high: int | None = Field(None, ge=1)
    mean: float | None = Field(None, gt=0)
    sigma: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _params(self) -> LengthDist:
        need = {"fixed": ("value",), "uniform": ("low", "high"), "lognormal": ("mean", "sigma")}[self.kind]
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"a {self.kind} length needs {', '.join(missing)}")
        if self.kind == "uniform" and _given(self.low) > _given(self.high):
            raise ValueError(f"uniform length: low ({self.low}) > high ({self.high})")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, _given(self.value), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(_given(self.low), _given(self.high) + 1, n)
        mean, sigma = _given(self.mean), _given(self.sigma)
        mu = np.log(mean) - sigma**2 / 2  # so that E[X] = mean
        return np.maximum(1, np.rint(rng.lognormal(mu, sigma, n))).astype(np.int64)


def _given(value: T | None) -> T:
    """A parameter that the validator has checked is present for this kind."""
    if value is None:
        raise ValueError("a length distribution is missing a parameter its kind needs")
    return value


PRESETS: dict[str, tuple[LengthDist, LengthDist]] = {
    "sharegpt": (LengthDist(kind="lognormal", mean=161, sigma=1.0), LengthDist(kind="lognormal", mean=338, sigma=0.9)),
    "alpaca": (LengthDist(kind="lognormal", mean=19, sigma=0.6), LengthDist(kind="lognormal", mean=58, sigma=0.8)),
}


class WorkloadConfig(InputModel):
    """A synthetic workload, or a trace to replay (``trace``), plus how requests arrive.

    Arrivals: ``poisson`` at ``rate`` requests/s; ``gamma`` at ``rate`` with coefficient of
    variation ``cv`` (1 is Poisson, more is burstier); ``offline``, all at time zero;
    ``closed``, ``concurrency`` clients that each send their next request as soon as the
    previous one finishes. Lengths: a ``preset`` (ShareGPT's by default), or ``prompt`` and
    ``output`` distributions, which replace the default preset (a preset and distributions
    given together are refused).
    ``prefix_groups`` > 0 gives every request one of that many shared ``prefix_len``-token
    prefixes in front of its own prompt.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    num_requests: int = Field(1000, ge=1)
    """Requests in the workload."""
    arrival: Literal["poisson", "gamma", "offline", "closed"] = "poisson"
    """How requests arrive: poisson, gamma (bursty), offline (all at once) or closed (a closed loop)."""
    rate: float = Field(1.0, gt=0)
    """Requests per second (poisson, gamma)."""
    cv: float = Field(1.0, gt=0)
    """Burstiness of gamma arrivals: the coefficient of variation of the gaps (1 = poisson)."""
    concurrency: int = Field(8, ge=1)
    """Clients of a closed loop."""
    preset: Literal["sharegpt", "alpaca"] | None = "sharegpt"
    """Prompt and output lengths like this data set's."""
    prompt: LengthDist | None = None
    """Prompt lengths instead of a preset: fixed:N, uniform:LO-HI or lognormal:MEAN,SIGMA."""
    output: LengthDist | None = None
    """Output lengths instead of a preset, in the same forms."""
    prefix_groups: int = Field(0, ge=0)
    """Number of shared prefixes; each request starts with one of them."""
    prefix_len: int = Field(0, ge=0)
    """Tokens in each shared prefix."""
    vocab_size: int = Field(32000, ge=2)
    """Token ids are drawn below this."""
    max_model_len: int = Field(2048, ge=2)
    """Longest prompt + output: lengths are clipped to it, and the engine serves this context."""
    trace: Path | None = None
    """Replay this JSONL trace instead of drawing requests."""
    seed: int = Field(0, ge=0)
    """Seed of the arrivals and lengths."""

    @model_validator(mode="before")
    @classmethod
    def _distributions_replace_the_default_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and "preset" not in data and ({"prompt", "output"} & data.keys()):
            return {**data, "preset": None}
        return data

    @model_validator(mode="after")
    def _lengths(self) -> WorkloadConfig:
        if self.preset is not None and (self.prompt is not None or self.output is not None):
            raise ValueError(f"give a length preset ({self.preset}) or prompt/output distributions, not both")
        if self.trace is None and self.preset is None and (self.prompt is None or self.output is None):
            raise ValueError("give a length preset, or both prompt and output distributions (or a trace)")
        if self.prefix_groups and not self.prefix_len:
            raise ValueError("prefix_groups needs prefix_len > 0")
        if self.prefix_len >= self.max_model_len - 1:
            raise ValueError(f"prefix_len ({self.prefix_len}) leaves no room in max_model_len ({self.max_model_len})")
        return self

    @property
    def closed_loop(self) -> bool:
        return self.arrival == "closed"


def arrival_times(config: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    n = config.num_requests
    if config.arrival in ("offline", "closed"):
        return np.zeros(n)
    if config.arrival == "poisson":
        gaps = rng.exponential(1.0 / config.rate, n)
    else:  # gamma: shape 1/cv^2 keeps the mean gap at 1/rate
        shape = 1.0 / config.cv**2
        gaps = rng.gamma(shape, 1.0 / (config.rate * shape), n)
    return np.cumsum(gaps) - gaps[0]  # the first request arrives at time zero


def generate(config: WorkloadConfig) -> list[RequestSpec]:
    """The workload's requests in arrival order."""
    if config.trace is not None:
        return load_trace(config.trace, config.max_model_len)
    rng = np.random.default_rng(config.seed)
    if config.preset:
        prompt_dist, output_dist = PRESETS[config.preset]
    else:
        prompt_dist, output_dist = _given(config.prompt), _given(config.output)
    n = config.num_requests
    times = arrival_times(config, rng)
    room = config.max_model_len - config.prefix_len
    prompts = np.minimum(prompt_dist.sample(rng, n), room - 1)
    outputs = np.clip(output_dist.sample(rng, n), 1, room - prompts)
    if not config.prefix_groups:
        return [RequestSpec(float(t), int(p), int(o)) for t, p, o in zip(times, prompts, outputs, strict=True)]
    prefixes = rng.integers(0, config.vocab_size, (config.prefix_groups, config.prefix_len))
    groups = rng.integers(0, config.prefix_groups, n)
    specs = []
    for t, p, o, g in zip(times, prompts, outputs, groups, strict=True):
        ids = (*prefixes[g].tolist(), *rng.integers(0, config.vocab_size, p).tolist())
        specs.append(RequestSpec(float(t), len(ids), int(o), ids, int(g)))
    return specs


def load_trace(path: str | Path, max_model_len: int | None = None) -> list[RequestSpec]:
    """Read a JSONL trace: one request per line with ``arrival_time``, ``output_len``, and
    ``prompt_len`` or ``prompt_token_ids``; optional ``prefix_group`` and ``priority``."""
    specs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids = tuple(row["prompt_token_ids"]) if "prompt_token_ids" in row else None
            prompt_len = len(ids) if ids is not None else int(row["prompt_len"])
            output_len = int(row["output_len"])
            if prompt_len < 1 or output_len < 1:
                raise ValueError("prompt and output lengths must be >= 1")
            if max_model_len is not None and prompt_len + output_len > max_model_len:
                raise ValueError(f"prompt + output = {prompt_len + output_len} exceeds max_model_len {max_model_len}")
            specs.append(RequestSpec(float(row["arrival_time"]), prompt_len, output_len, ids,
                                     row.get("prefix_group"), int(row.get("priority", 0))))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}, line {number}: {e}") from None
    return sorted(specs, key=lambda s: s.arrival_time)


def save_trace(specs: list[RequestSpec], path: str | Path) -> None:
    lines = []
    for s in specs:
        row: dict = {"arrival_time": round(s.arrival_time, 6), "output_len": s.output_len}
        if s.prompt_token_ids is not None:
            row["prompt_token_ids"] = list(s.prompt_token_ids)
        else:
            row["prompt_len"] = s.prompt_len
        if s.prefix_group is not None:
            row["prefix_group"] = s.prefix_group
        if s.priority:
            row["priority"] = s.priority
        lines.append(json.dumps(row))
    Path(path).write_text("\n".join(lines) + "\n")
