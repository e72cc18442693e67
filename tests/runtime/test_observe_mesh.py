"""Observability on a real mesh: this process as the driver, two node processes.

Worker `print` lines from other nodes reach the driver with their prefix; the state API and
`latticaray status`/`list` (attached to a node process) show every node, the links and the
tasks; `/metrics` of `init(dashboard=True)` parses and counts what ran.
"""

import json
import subprocess
import sys
import time
import urllib.request

import pytest
from meshutil import driver_with_nodes, wait_for
from prometheus_client.parser import text_string_to_metric_families

import latticaray as lattica
from latticaray.util import state

WORDS = ("alpha", "beta", "gamma")  # lines differing in digits only would be deduplicated


@lattica.remote
def shout(i):
    import os
    import sys

    print(f"line {WORDS[i]} from this worker")
    print(f"err {WORDS[i]}", file=sys.stderr)
    os.write(1, f"fd {WORDS[i]}\n".encode())
    return lattica.get_runtime_context().node_id


@lattica.remote
class Greeter:
    def __init__(self):
        print("greeter ready")

    def hello(self, who):
        print(f"hello {who}")
        return who


def on(node):
    return lattica.NodeAffinitySchedulingStrategy(node, soft=False)


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(2) as m:
        yield m


def test_worker_prints_from_other_nodes_reach_the_driver(mesh, capfd):
    nodes = [n.node_id for n in mesh["nodes"]]
    ran = lattica.get([shout.options(scheduling_strategy=on(n)).remote(i)
                       for i, n in enumerate(nodes)], timeout=60)  # fmt: skip
    assert ran == nodes
    greeter = Greeter.options(scheduling_strategy=on(nodes[1])).remote()
    assert lattica.get(greeter.hello.remote("mesh"), timeout=60) == "mesh"
    seen = {"out": "", "err": ""}

    def arrived():
        got = capfd.readouterr()
        seen["out"] += got.out
        seen["err"] += got.err
        return all(f"line {WORDS[i]} from" in seen["out"] for i in range(2)) and (
            "hello mesh" in seen["out"] and "greeter ready" in seen["out"]
        ) and all(f"err {WORDS[i]}" in seen["err"] for i in range(2))  # fmt: skip

    try:
        wait_for(arrived, 30, "worker output at the driver")
    except AssertionError:
        raise AssertionError(f"seen at the driver: {seen}") from None
    lines = seen["out"].splitlines()
    pids = set()
    for i in range(2):
        line = next(x for x in lines if f"line {WORDS[i]} from" in x)
        assert line.startswith("(shout pid=") and ", node=" in line, line
        pids.add(line.split("pid=")[1].split(",")[0])
        assert any(x.startswith("(shout pid=") and x.endswith(f"fd {WORDS[i]}") for x in lines)
    assert len(pids) == 2  # two worker processes, one on each node
    assert any(x.startswith("(Greeter pid=") and x.endswith("hello mesh") for x in lines)
    errors = seen["err"].splitlines()
    assert any(x.startswith("(shout pid=") and x.endswith("err alpha") for x in errors)


def test_state_api_sees_every_node_its_links_and_tasks(mesh):
    nodes = [n.node_id for n in mesh["nodes"]]
    lattica.get([shout.options(scheduling_strategy=on(n)).remote(2) for n in nodes], timeout=60)
    rows = state.list_nodes()
    by_id = {r.node_id: r for r in rows}
    assert set(nodes) | {mesh["driver"]} <= set(by_id)
    assert by_id[mesh["driver"]].role == "driver" and by_id[mesh["driver"]].is_self
    for n in nodes:
        assert by_id[n].state == "ALIVE" and not by_id[n].stale
        assert by_id[n].resources_total["CPU"] == 1.0
        assert by_id[n].tasks_finished >= 1
    links = state.list_links(filters=[("src", "=", mesh["driver"])])
    assert {lk.dst for lk in links} >= set(nodes)
    assert all(lk.path in ("unix", "direct") and lk.rtt_ms is not None for lk in links)
    shouted = state.list_tasks(filters=[("name", "=", "shout"), ("state", "=", "FINISHED")])
    assert {t.node_id for t in shouted} >= set(nodes)
    assert all(t.owner_node_id == mesh["driver"] for t in shouted)


def test_cli_status_and_list_attached_to_a_node_process(mesh):
    node = mesh["nodes"][0]
    address = node.info["driver_address"]
    cli = [sys.executable, "-m", "latticaray"]
    status = subprocess.run([*cli, "status", "--address", address],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    out = status.stdout
    assert f"mesh seen from {node.node_id}" in out
    assert mesh["driver"][:15] in out and mesh["nodes"][1].node_id[:15] in out
    listed = subprocess.run([*cli, "list", "nodes", "--format", "json", "--address", address],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    ids = {r["node_id"] for r in json.loads(listed.stdout)}
    assert ids >= {n.node_id for n in mesh["nodes"]} | {mesh["driver"]}


def test_metrics_scrape_counts_what_ran(mesh):
    from latticaray.runtime import api

    url = api._runtime.start_dashboard("127.0.0.1", 0)
    try:
        before = time.time()
        nodes = [n.node_id for n in mesh["nodes"]]
        lattica.get([shout.options(scheduling_strategy=on(n)).remote(1) for n in nodes],
                    timeout=60)  # fmt: skip
        with urllib.request.urlopen(url + "metrics", timeout=30) as response:
            body = response.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        submitted = sum(s.value for s in families["latticaray_tasks_submitted"].samples
                        if s.name.endswith("_total"))  # fmt: skip
        assert submitted >= 2
        placement = families["latticaray_placement_latency_seconds"].samples
        assert any(s.name.endswith("_count") and s.labels["where"] == "remote" and s.value >= 2
                   for s in placement)  # fmt: skip
        connections = {
            s.labels["path"]: s.value for s in families["latticaray_connections"].samples
        }
        assert sum(connections.values()) >= 2, connections
        assert families["latticaray_object_store_capacity_bytes"].samples[0].value > 0
        assert time.time() - before < 60
        with urllib.request.urlopen(url + "api/snapshot", timeout=30) as response:
            snap = json.loads(response.read())
        assert {n["node_id"] for n in snap["nodes"]} >= set(nodes)
    finally:
        import asyncio

        asyncio.run_coroutine_threadsafe(api._runtime.dashboard.stop(), api._runtime.loop).result(
            30
        )
        api._runtime.dashboard = None
