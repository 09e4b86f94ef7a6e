"""Prometheus text exposition for the server's ``/metrics``: the engine's gauges and
counters, and latency histograms, without a client library."""

from __future__ import annotations

import bisect

from pagedkv.scheduler.outputs import EngineStats

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative-bucket histogram of seconds, in Prometheus' format."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts):
            total += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]
        return lines


def render(stats: EngineStats, histograms: list[Histogram]) -> str:
    """The whole ``/metrics`` page."""
    metrics = [
        ("pagedkv_requests_running", "gauge", "Sequences running.", stats.num_running),
        ("pagedkv_requests_waiting", "gauge", "Sequences waiting to be admitted.", stats.num_waiting),
        ("pagedkv_kv_blocks_used", "gauge", "KV cache pages in use.", stats.kv_blocks_used),
        ("pagedkv_kv_blocks_total", "gauge", "KV cache pages in the pool.", stats.kv_blocks_total),
        ("pagedkv_kv_blocks_cached", "gauge", "Pages in the prefix cache.", stats.kv_blocks_cached),
        ("pagedkv_preemptions_total", "counter", "Preemptions so far.", stats.num_preemptions),
        ("pagedkv_prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / prompt tokens.",
         stats.prefix_hit_rate),
        ("pagedkv_generated_tokens_total", "counter", "Tokens generated.", stats.num_generated_tokens),
        ("pagedkv_prompt_tokens_total", "counter", "Prompt tokens admitted.", stats.num_prompt_tokens),
        ("pagedkv_steps_total", "counter", "Engine steps.", stats.num_steps),
    ]
    lines = []
    for name, kind, help_text, value in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    for h in histograms:
        lines += h.render()
    return "\n".join(lines) + "\n"
