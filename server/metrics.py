"""The server's ``/metrics``, in Prometheus' text format, rendered by ``prometheus-client``.

Each app renders its own :class:`~prometheus_client.CollectorRegistry` (see
:class:`MetricsPage`), never the library's global one: two servers in one process (tests, a
notebook, :class:`~pagedkv.server.background.BackgroundServer`) would otherwise clash on
their metric names.

The metrics, and their nearest vLLM equivalents for porting dashboards:

=====================================  =========  ==============================================
pagedkv                                type       vLLM
=====================================  =========  ==============================================
pagedkv_requests_running               gauge      vllm:num_requests_running
pagedkv_requests_waiting               gauge      vllm:num_requests_waiting
pagedkv_kv_blocks_used                 gauge      vllm:kv_cache_usage_perc (vllm:gpu_cache_usage_perc
pagedkv_kv_blocks_total                gauge        before V1) is used / total, a fraction in 0–1
pagedkv_kv_blocks_cached               gauge      (none: pages kept by the prefix cache)
pagedkv_preemptions_total              counter    vllm:num_preemptions_total
pagedkv_prefix_cache_hit_rate          gauge      rate(vllm:prefix_cache_hits_total) /
                                                    rate(vllm:prefix_cache_queries_total), but
                                                    ours is over the whole run, not a window
pagedkv_generated_tokens_total         counter    vllm:generation_tokens_total
pagedkv_prompt_tokens_total            counter    vllm:prompt_tokens_total
pagedkv_steps_total                    counter    (none: engine steps)
pagedkv_time_to_first_token_seconds    histogram  vllm:time_to_first_token_seconds
pagedkv_inter_token_latency_seconds    histogram  vllm:inter_token_latency_seconds (older
                                                    releases: vllm:time_per_output_token_seconds)
=====================================  =========  ==============================================

vLLM labels every series with ``model_name``; pagedkv serves one model and adds no labels, so
a ported query drops its ``{model_name=...}`` selector. The histograms' buckets
(:data:`LATENCY_BUCKETS_S`) differ from vLLM's, so quantiles agree only roughly. The
library also adds each histogram's ``_created`` gauge (when it was made, Unix seconds).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedkv.scheduler.outputs import EngineStats

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# (name, family, help, EngineStats field). A CounterMetricFamily drops a name's ``_total``
# and the exposition appends it again, so the page shows these names exactly.
_ENGINE_METRICS: tuple[tuple[str, type[GaugeMetricFamily] | type[CounterMetricFamily], str, str], ...] = (
    ("pagedkv_requests_running", GaugeMetricFamily, "Sequences running.", "num_running"),
    ("pagedkv_requests_waiting", GaugeMetricFamily, "Sequences waiting to be admitted.", "num_waiting"),
    ("pagedkv_kv_blocks_used", GaugeMetricFamily, "KV cache pages in use.", "kv_blocks_used"),
    ("pagedkv_kv_blocks_total", GaugeMetricFamily, "KV cache pages in the pool.", "kv_blocks_total"),
    ("pagedkv_kv_blocks_cached", GaugeMetricFamily, "Pages in the prefix cache.", "kv_blocks_cached"),
    ("pagedkv_preemptions_total", CounterMetricFamily, "Preemptions so far.", "num_preemptions"),
    ("pagedkv_prefix_cache_hit_rate", GaugeMetricFamily,
     "Prompt tokens served from the prefix cache / prompt tokens.", "prefix_hit_rate"),
    ("pagedkv_generated_tokens_total", CounterMetricFamily, "Tokens generated.", "num_generated_tokens"),
    ("pagedkv_prompt_tokens_total", CounterMetricFamily, "Prompt tokens admitted.", "num_prompt_tokens"),
    ("pagedkv_steps_total", CounterMetricFamily, "Engine steps.", "num_steps"),
)


def latency_histograms() -> tuple[Histogram, Histogram]:
    """The time to first token and the inter-token latency, for the engine to observe.
    They belong to no registry yet (``registry=None``): each app that serves the engine
    registers them on its own, so a second engine in the process is no duplicate."""
    return (
        Histogram("pagedkv_time_to_first_token_seconds", "Arrival to first token.", buckets=LATENCY_BUCKETS_S,
                  registry=None),
        Histogram("pagedkv_inter_token_latency_seconds", "Time between two outputs of a request.",
                  buckets=LATENCY_BUCKETS_S, registry=None),
    )


class EngineStatsCollector(Collector):
    """The engine's gauges and counters, read from the :class:`EngineStats` snapshot in
    :attr:`snapshot` rather than from the engine: a scrape must not read the engine while a
    step mutates it in its worker thread, so the snapshot is taken between steps
    (``AsyncLLMEngine.stats``) and handed over by :meth:`MetricsPage.render`. Until then the
    families have no samples."""

    def __init__(self) -> None:
        self.snapshot: EngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        return self._families(self.snapshot)

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so the registry can refuse a collector that
        repeats one of these names."""
        return self._families(None)

    @staticmethod
    def _families(stats: EngineStats | None) -> Iterator[Metric]:
        for name, family, help_text, field in _ENGINE_METRICS:
            yield family(name, help_text, value=None if stats is None else getattr(stats, field))


class MetricsPage:
    """One app's ``/metrics``: its own registry, with the engine's stats and the latency
    histograms it observes."""

    def __init__(self, histograms: Iterable[Histogram]) -> None:
        self.registry = CollectorRegistry()
        self._stats = EngineStatsCollector()
        self.registry.register(self._stats)
        for histogram in histograms:
            self.registry.register(histogram)

    def render(self, stats: EngineStats) -> bytes:
        """The page, with the gauges and counters from ``stats``. Setting the snapshot and
        rendering are one synchronous call, so on the event loop no other scrape can slip
        between them: each page shows the snapshot its own scrape awaited."""
        self._stats.snapshot = stats
        return generate_latest(self.registry)
