"""Show results: a table on stdout, a JSON file, and PNG plots (with the ``plots`` extra)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from pagedkv.sim.driver import RunResult
from pagedkv.sim.metrics import Percentiles, Summary, request_columns
from pagedkv.sim.search import metric_value

if TYPE_CHECKING:
    from pagedkv.sim.api import IntervalSummary
    from pagedkv.sim.search import SearchResult

ROWS = [
    ("completed / rejected", lambda s: f"{s.completed} / {s.rejected}"),
    ("throughput (req/s)", lambda s: f"{s.requests_per_s:.3f}"),
    ("output tokens/s", lambda s: f"{s.output_tokens_per_s:.1f}"),
    ("TTFT p50 / p90 / p99 (s)", lambda s: _pct(s.ttft_s)),
    ("TPOT p50 / p90 / p99 (s)", lambda s: _pct(s.tpot_s)),
    ("latency p50 / p90 / p99 (s)", lambda s: _pct(s.e2e_s)),
    ("queueing p50 / p90 / p99 (s)", lambda s: _pct(s.queueing_s)),
    ("latency per output token p50 (s)", lambda s: f"{s.normalized_latency_s.p50:.3f}"),
    ("KV slots holding K/V / held back", lambda s: f"{s.kv_utilization:.1%}"),
    ("KV memory waste", lambda s: f"{s.kv_waste:.1%}"),
    ("KV pool occupancy", lambda s: f"{s.kv_occupancy:.1%}"),
    ("preemptions (by swap)", lambda s: f"{s.preemptions} ({s.preempted_by_swap})"),
    ("prefix hit rate", lambda s: f"{s.prefix_hit_rate:.1%}"),
    ("goodput (req/s in SLO)", lambda s: f"{s.goodput_requests_per_s:.3f}"),
]


def _pct(p: Percentiles) -> str:
    return f"{p.p50:.2f} / {p.p90:.2f} / {p.p99:.2f}"


def table(summaries: Sequence[Summary]) -> str:
    """One column per run, one row per metric."""
    return _render(["metric", *[s.policy for s in summaries]],
                   [[label, *[fmt(s) for s in summaries]] for label, fmt in ROWS])


def _render(head: list[str], body: list[list[str]]) -> str:
    """Columns aligned: the first to the left, the others to the right; a rule under the head."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def interval_table(runs: Sequence[IntervalSummary]) -> str:
    """One column per policy: each metric's median [low, high] over the repeated runs."""
    return _render(["metric", *[f"{r.policy} ({len(r.runs)} runs, {r.level:.0%})" for r in runs]],
                   [[name, *[f"{i.central:.3f} [{i.low:.3f}, {i.high:.3f}]" for i in (r.metrics[name] for r in runs)]]
                    for name in runs[0].metrics])


def search_table(result: SearchResult) -> str:
    """The frontier, cheapest first: each configuration, its rate and the SLO's metrics there."""
    bounds = [b.metric for b in result.slo]
    head = ["KV / replica", "replicas", "block", "max seqs", "token budget", "chunked", "preemption",
            "rate (req/s)", *[f"{m} (s)" for m in bounds]]
    body = []
    for c in result.frontier:
        e = c.engine
        values = [f"{metric_value(c.summary, m):.3f}" if c.summary else "-" for m in bounds]
        body.append([f"{(e.kv_cache_memory_bytes or 0) >> 20} MiB", str(c.replicas), str(e.block_size),
                     str(e.max_num_seqs), str(e.max_num_batched_tokens), "yes" if e.enable_chunked_prefill else "no",
                     e.preemption_mode, f"{c.rate:.3g}", *values])
    return _render(head, body) if body else "no configuration in the space meets the SLO"


def plot_search(result: SearchResult, path: str | Path) -> None:
    """Every configuration's fleet KV memory against its rate, passing or not; the frontier joined."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for meets, marker in ((True, "o"), (False, "x")):
        chosen = [c for c in result.candidates if c.meets == meets]
        ax.scatter([c.cost_bytes / 2**20 for c in chosen], [c.rate for c in chosen], marker=marker,
                   label="meets the SLO" if meets else "does not")
    frontier = result.frontier
    ax.plot([c.cost_bytes / 2**20 for c in frontier], [c.rate for c in frontier], color="black", label="frontier")
    ax.set_xlabel("KV memory of the fleet (MiB)")
    ax.set_ylabel("request rate (req/s)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path)


def write_json(path: str | Path, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


class Progress:
    """A run's progress as a tqdm bar on stderr, called as ``progress(done, total)`` by the
    driver after each step (tqdm itself limits how often the bar is redrawn)."""

    def __init__(self, label: str) -> None:
        self.bar = tqdm(desc=label, unit="req", dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('plots need matplotlib: pip install "pagedkv[plots]"') from e
    return plt


def plot_kv_over_time(results: Sequence[RunResult], path: str | Path) -> None:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for r in results:
        t = np.array(r.steps.end)
        stored, reserved = np.array(r.steps.stored_slots, float), np.array(r.steps.reserved_slots, float)
        top.plot(t, np.divide(stored, reserved, out=np.ones_like(stored), where=reserved > 0), label=r.policy, lw=1)
        bottom.plot(t, reserved / r.capacity_slots, label=r.policy, lw=1)
    top.set_ylabel("slots holding K/V\n/ slots held back")
    bottom.set_ylabel("pool occupancy")
    bottom.set_xlabel("time (s)")
    top.legend()
    top.set_ylim(0, 1.05)
    bottom.set_ylim(0, 1.05)
    fig.suptitle("KV memory over time")
    _save(plt, fig, path)


def plot_latency_cdf(results: Sequence[RunResult], path: str | Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        rec = request_columns(r.records)
        ttft, e2e = rec["first_token"] - rec["arrival"], rec["finish"] - rec["arrival"]
        for ax, values in zip(axes, (ttft, e2e), strict=True):
            values = np.sort(values)
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=r.policy)
    axes[0].set_xlabel("time to first token (s)")
    axes[1].set_xlabel("end-to-end latency (s)")
    for ax in axes:
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend()
    _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rates: Sequence[float], curves: dict[str, list[Summary]], path: str | Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy, summaries in curves.items():
        axes[0].plot(rates, [s.normalized_latency_s.p50 for s in summaries], marker="o", label=policy)
        axes[1].plot(rates, [s.ttft_s.p90 for s in summaries], marker="o", label=policy)
    axes[0].set_ylabel("latency per output token, p50 (s)")
    axes[1].set_ylabel("TTFT p90 (s)")
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    _save(plt, fig, path)
