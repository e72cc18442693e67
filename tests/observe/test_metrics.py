"""The metrics registry: families, cheap recorders, and a scrape parsed by prometheus_client."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from latticaray.observe import metrics


def scrape() -> dict:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families, family, name, **labels):
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_every_family_the_issue_lists_is_exported():
    families = scrape()
    for name in (
        "latticaray_tasks_submitted",
        "latticaray_tasks_finished",
        "latticaray_tasks_failed",
        "latticaray_tasks_retried",
        "latticaray_task_queue_depth",
        "latticaray_placement_latency_seconds",
        "latticaray_object_store_bytes",
        "latticaray_object_store_evictions",
        "latticaray_bytes_moved",
        "latticaray_connections",
        "latticaray_relay_reservations",
        "latticaray_dht_operations",
        "latticaray_rpc_latency_seconds",
    ):
        assert name in families, name
    assert families["latticaray_tasks_submitted"].type == "counter"
    assert families["latticaray_rpc_latency_seconds"].type == "histogram"
    assert families["latticaray_connections"].type == "gauge"
    assert "process_cpu_seconds" in families


def test_tallies_timings_and_samples_show_in_a_scrape():
    before = sample(scrape(), "latticaray_bytes_moved", "latticaray_bytes_moved_total",
                    path="relayed", direction="out") or 0  # fmt: skip
    metrics.BYTES_MOVED.labels("relayed", "out").add(1350)
    metrics.BYTES_MOVED.labels("relayed", "out").add(650)
    rpc = metrics.RPC_LATENCY.labels("/test/scrape/1")
    for seconds in (0.0004, 0.003, 0.003, 2.0):
        rpc.observe(seconds)
    unregister = metrics.CONNECTIONS.register(lambda: [(("punched",), 2), (("relayed",), 1)])
    also = metrics.CONNECTIONS.register(lambda: [(("punched",), 1)])
    broken = metrics.CONNECTIONS.register(lambda: 1 / 0)
    try:
        families = scrape()
        moved = sample(families, "latticaray_bytes_moved", "latticaray_bytes_moved_total",
                       path="relayed", direction="out")  # fmt: skip
        assert moved - before == 2000
        h = "latticaray_rpc_latency_seconds"
        assert sample(families, h, h + "_count", protocol="/test/scrape/1") == 4
        assert sample(families, h, h + "_sum", protocol="/test/scrape/1") == pytest.approx(2.0064)
        assert sample(families, h, h + "_bucket", protocol="/test/scrape/1", le="0.0005") == 1
        assert sample(families, h, h + "_bucket", protocol="/test/scrape/1", le="0.005") == 3
        assert sample(families, h, h + "_bucket", protocol="/test/scrape/1", le="+Inf") == 4
        c = "latticaray_connections"
        assert sample(families, c, c, path="punched") == 3  # two sources add up
        assert sample(families, c, c, path="relayed") == 1
    finally:
        unregister()
        also()
        broken()
    assert sample(scrape(), "latticaray_connections", "latticaray_connections",
                  path="punched") is None  # fmt: skip


def test_label_sets_are_bounded_and_checked(monkeypatch):
    family = metrics.Tally("test_bounded", "a test family", ("peer",))
    monkeypatch.setattr(metrics, "MAX_CHILDREN", 3)
    for i in range(10):
        family.labels(f"p{i}").add()
    values = {k[0]: v for k, v in family.values().items()}
    assert len(values) == 4 and values["other"] == 7
    with pytest.raises(ValueError, match="takes labels"):
        family.labels("a", "b")
    with pytest.raises(ValueError, match="bad metric name"):
        metrics.Tally("bad name", "x")
    with pytest.raises(ValueError, match="buckets"):
        metrics.Timing("t", "x", buckets=(2.0, 1.0))


def test_timing_ignores_nan():
    child = metrics.Timing("test_nan", "x").labels()
    child.observe(float("nan"))
    assert child.count == 0
