"""``/metrics`` rendered by prometheus-client: the same names and types as the hand-written
page had, values from the snapshot it is handed, one registry per page, so that two servers in
one process do not clash, and over HTTP histograms and counters that grow with the requests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from httpx import Client

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from prometheus_client.registry import DuplicateTimeseries  # noqa: E402

from pagedkv.models import ModelRunner  # noqa: E402
from pagedkv.scheduler import EngineConfig, EngineStats, LLMEngine  # noqa: E402
from pagedkv.server.metrics import LATENCY_BUCKETS_S, EngineStatsCollector, MetricsPage, latency_histograms  # noqa: E402
from tests.helpers import assert_drained  # noqa: E402

# Every name and type the page exposes, as the Prometheus server reads them off the TYPE lines.
EXPOSED = {
    "pagedkv_requests_running": "gauge",
    "pagedkv_requests_waiting": "gauge",
    "pagedkv_kv_blocks_used": "gauge",
    "pagedkv_kv_blocks_total": "gauge",
    "pagedkv_kv_blocks_cached": "gauge",
    "pagedkv_preemptions_total": "counter",
    "pagedkv_prefix_cache_hit_rate": "gauge",
    "pagedkv_generated_tokens_total": "counter",
    "pagedkv_prompt_tokens_total": "counter",
    "pagedkv_steps_total": "counter",
    "pagedkv_time_to_first_token_seconds": "histogram",
    "pagedkv_inter_token_latency_seconds": "histogram",
}


def stats(**changes: int) -> EngineStats:
    fields = dict(num_running=3, num_waiting=4, kv_blocks_used=10, kv_blocks_free=54, kv_blocks_total=64,
                  kv_blocks_peak=12, num_preemptions=2, num_steps=17, num_tokens_computed=90,
                  num_generated_tokens=40, num_prompt_tokens=50, num_prefix_hit_tokens=20, kv_blocks_cached=5)
    return EngineStats(**(fields | changes))


def types(page: str) -> dict[str, str]:
    """``{name: type}`` from the page's ``# TYPE`` lines, the names exactly as exposed."""
    return dict(line.split()[2:4] for line in page.splitlines() if line.startswith("# TYPE "))


def samples(page: str) -> dict[str, float]:
    """Every unlabelled sample by name, and the histograms' ``+Inf`` buckets as written."""
    out = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if not s.labels or s.labels == {"le": "+Inf"}:
                out[s.name + ('{le="+Inf"}' if s.labels else "")] = s.value
    return out


def test_the_page_has_every_name_with_its_type_and_the_snapshots_values():
    ttft, itl = latency_histograms()
    page = MetricsPage((ttft, itl))
    ttft.observe(0.3)
    ttft.observe(100.0)  # past the last bucket: only +Inf counts it
    itl.observe(0.02)
    text = page.render(stats()).decode()
    assert {n: t for n, t in types(text).items() if not n.endswith("_created")} == EXPOSED
    got = samples(text)
    assert {name: got[name] for name in EXPOSED if name in got} == {
        "pagedkv_requests_running": 3, "pagedkv_requests_waiting": 4, "pagedkv_kv_blocks_used": 10,
        "pagedkv_kv_blocks_total": 64, "pagedkv_kv_blocks_cached": 5, "pagedkv_preemptions_total": 2,
        "pagedkv_prefix_cache_hit_rate": 0.4, "pagedkv_generated_tokens_total": 40, "pagedkv_prompt_tokens_total": 50,
        "pagedkv_steps_total": 17}
    assert got["pagedkv_time_to_first_token_seconds_count"] == 2
    assert got["pagedkv_time_to_first_token_seconds_sum"] == pytest.approx(100.3)
    assert got["pagedkv_inter_token_latency_seconds_count"] == 1
    buckets = [s for f in text_string_to_metric_families(text) if f.name == "pagedkv_time_to_first_token_seconds"
               for s in f.samples if s.name.endswith("_bucket")]
    assert [float(s.labels["le"]) for s in buckets] == [*LATENCY_BUCKETS_S, float("inf")]
    assert [s.value for s in buckets] == [0] * 6 + [1] * 7 + [2]  # cumulative: 0.3 s falls in le=0.5
    # The next render shows the next snapshot, not the first.
    assert samples(page.render(stats(num_running=0, num_steps=18)).decode())["pagedkv_steps_total"] == 18


def test_each_page_has_its_own_registry():
    first, second = latency_histograms(), latency_histograms()  # two engines' histograms
    pages = [MetricsPage(first), MetricsPage(second), MetricsPage(first)]  # the third: another app, same engine
    assert len({id(p.registry) for p in pages}) == 3
    assert prometheus_client.REGISTRY.get_sample_value("pagedkv_steps_total") is None, "not the global registry"
    first[0].observe(1.0)
    counts = [samples(p.render(stats()).decode())["pagedkv_time_to_first_token_seconds_count"] for p in pages]
    assert counts == [1, 0, 1]
    # A registry does refuse names it already has: separate registries are what keeps apps apart.
    with pytest.raises(DuplicateTimeseries):
        pages[0].registry.register(EngineStatsCollector())
    with pytest.raises(DuplicateTimeseries):
        pages[1].registry.register(first[1])


def test_two_servers_in_one_process_each_count_their_own_requests(tiny_model):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from pagedkv.server.background import BackgroundServer

    config = EngineConfig(block_size=4, num_blocks=64)
    servers = [BackgroundServer(LLMEngine(ModelRunner(tiny_model), config), "tiny") for _ in range(2)]
    try:
        with httpx.Client(base_url=servers[0].url, timeout=60) as a, httpx.Client(base_url=servers[1].url,
                                                                                  timeout=60) as b:
            def scrape(client: Client) -> dict[str, float]:
                r = client.get("/metrics")
                assert r.status_code == 200 and r.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
                assert {n: t for n, t in types(r.text).items() if not n.endswith("_created")} == EXPOSED
                return samples(r.text)

            before = scrape(a)
            body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
            assert a.post("/v1/completions", json=body).status_code == 200
            after, other = scrape(a), scrape(b)
    finally:
        for server in servers:
            server.stop()
    grew = {name: after[name] - before[name] for name in after}
    assert grew["pagedkv_time_to_first_token_seconds_count"] == 1
    assert grew['pagedkv_time_to_first_token_seconds_bucket{le="+Inf"}'] == 1
    assert grew["pagedkv_inter_token_latency_seconds_count"] == 4  # one per token after the first
    assert grew["pagedkv_generated_tokens_total"] == 5 and grew["pagedkv_prompt_tokens_total"] == 3
    assert grew["pagedkv_steps_total"] >= 5
    assert after["pagedkv_requests_running"] == after["pagedkv_kv_blocks_used"] == 0
    assert other["pagedkv_time_to_first_token_seconds_count"] == other["pagedkv_steps_total"] == 0
    assert other["pagedkv_kv_blocks_total"] == 64
    for server in servers:
        assert_drained(server.async_engine.engine)
