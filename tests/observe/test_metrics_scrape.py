"""`latticaray start --metrics-port`: a scrape after real work shows the mesh's counters moved.

Two node processes on loopback (same-host copies off, so objects cross the QUIC connection): three
20 MiB files are put through node A (`latticaray put`) and got by CID through node B, whose
32 MiB store must evict the first copies to take the last. Both nodes' /metrics are then scraped
and parsed: bytes moved on the direct path (out at A, in at B), connections per path, DHT
operations, unary RPC latency and store evictions at B.
"""

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from meshutil import NodeProcess

MiB = 1 << 20
CLI = [sys.executable, "-m", "latticaray"]


def scrape(node) -> dict:
    with urllib.request.urlopen(node.info["metrics"], timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        body = response.read().decode()
    return {f.name: f for f in text_string_to_metric_families(body)}


def total(families, family, suffix="", **labels) -> float:
    return sum(
        s.value
        for s in families[family].samples
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("LATTICARAY_PROGRESS", None)
    proc = subprocess.run([*CLI, *args], capture_output=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def nodes():
    common = ("--metrics-port", "0", "--no-same-host-path")
    a = NodeProcess(None, None, extra_args=common)
    started = [a]
    try:
        bootstrap = next(x for x in a.info["addrs"] if "/udp/" in x)
        b = NodeProcess(
            bootstrap,
            a.info["invite"],
            extra_args=(*common, "--object-store-memory", str(32 * MiB)),
        )
        started.append(b)
        yield a, b
    finally:
        for node in started:
            node.stop()


def test_a_scrape_after_real_work_shows_the_counters_moved(nodes, tmp_path):
    a, b = nodes
    assert a.info["metrics"].startswith("http://127.0.0.1:")
    before_a, before_b = scrape(a), scrape(b)
    cids = []
    blobs = []
    for i in range(3):
        path = tmp_path / f"part{i}.bin"
        blobs.append(os.urandom(20 * MiB))
        path.write_bytes(blobs[-1])
        cids.append(cli("put", str(path), "--address", a.info["driver_address"]).decode().strip())
    for cid, blob in zip(cids, blobs):
        got = cli("get", cid, "-o", "-", "--address", b.info["driver_address"])
        assert got == blob
    after_a, after_b = scrape(a), scrape(b)

    def moved(families, direction):
        return total(families, "latticaray_bytes_moved", "_total", path="direct",
                     direction=direction)  # fmt: skip

    sent = moved(after_a, "out") - moved(before_a, "out")
    received = moved(after_b, "in") - moved(before_b, "in")
    assert sent >= 60 * MiB and received >= 60 * MiB, (sent, received)
    for families in (after_a, after_b):
        assert total(families, "latticaray_connections", path="direct") >= 1
        assert total(families, "latticaray_dht_operations", "_total") >= 1
        assert total(families, "latticaray_rpc_latency_seconds", "_count") >= 1
        buckets = [s for s in families["latticaray_rpc_latency_seconds"].samples
                   if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]  # fmt: skip
        assert buckets and all(s.value >= 0 for s in buckets)
    evicted = total(after_b, "latticaray_object_store_evictions", "_total") - total(
        before_b, "latticaray_object_store_evictions", "_total"
    )
    assert evicted >= 1  # 60 MiB fetched into a 32 MiB store
    assert total(after_b, "latticaray_object_store_capacity_bytes") == 32 * MiB
    # the DHT of B looked up and announced what it fetched
    ops = {
        (s.labels["op"], s.labels["outcome"]) for s in after_b["latticaray_dht_operations"].samples
    }
    assert any(op in ("store", "get_providers", "find_node") for op, _ in ops), ops
