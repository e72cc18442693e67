"""The examples across real kernel NATs (netlab, root): the driver on hostA (cone NAT), worker
nodes on hostB (cone NAT) and hostC (symmetric NAT) and hostA2 (hostA's LAN), joined through
pub1 (bootstrap, relay, AutoNAT). Each example's run.py runs as a program inside hostA."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import netlab_mesh
from netlab_util import netlab_available

pytestmark = [pytest.mark.netlab, pytest.mark.timeout(300)]

# a prefix of its own: the NAT tests' session-wide lab may use LATTICARAY_NAT_LAB_PREFIX itself
PREFIX = os.environ.get("LATTICARAY_NAT_LAB_PREFIX", f"lrn{os.getpid() % 100000}") + "x"


@pytest.fixture(scope="module")
def lab():
    reason = netlab_available()
    if reason is not None:
        pytest.skip(reason)
    mesh = netlab_mesh.LabMesh(PREFIX, lan_hosts=2)
    try:
        nodes = {
            "hostB": mesh.start_node("hostB", {"lm_stage": 1, "fl_client": 2, "ckpt_solo": 1}),
            "hostC": mesh.start_node("hostC", {"lm_stage": 1, "fl_client": 2, "ckpt_peer": 1}),
            "hostA2": mesh.start_node("hostA2", {"ckpt_peer": 1}),
        }
        for host in ("hostB", "hostC"):  # behind a NAT: reachable through a relay slot
            assert any("p2p-circuit" in a for a in nodes[host]["advertised"]), nodes[host]
        yield mesh, {host: info["node_id"] for host, info in nodes.items()}
    finally:
        mesh.stop()


def test_sharded_inference_across_nats_is_exact(lab):
    mesh, node_of = lab
    report = mesh.run_example(
        "hostA", "sharded_inference",
        ["--stages", "2", "--layers", "4", "--d-model", "128", "--vocab", "256",
         "--requests", "3", "--prompt-len", "8", "--max-new", "16", "--repeat", "1"],
        timeout=240,
    )  # fmt: skip
    (setup,) = report["setups"]
    assert setup["exact"], setup
    # stage 0 on one NATed host, stage 1 on the other: activations cross between the two NATs
    assert sorted(setup["stage_nodes"]) == sorted([node_of["hostB"], node_of["hostC"]])


def test_federated_averaging_across_nats(lab):
    mesh, _ = lab
    report = mesh.run_example(
        "hostA", "federated_averaging",
        ["--clients", "4", "--nodes", "2", "--rounds", "15", "--round-timeout", "3",
         "--stall-client", "3", "--fault-round", "1"],
        timeout=240,
    )  # fmt: skip
    assert report["gap_points"] <= 2.0, report
    assert report["rounds"][1]["timed_out"] == [3]
    assert report["rounds"][-1]["participants"] == [0, 1, 2, 3]


def test_model_distribution_across_nats(lab):
    mesh, node_of = lab
    report = mesh.run_example(
        "hostA", "model_distribution", ["--size-mb", "8", "--peers", "2", "--no-bars"], timeout=240
    )
    one, many = report["runs"]
    assert one["nodes"] == [node_of["hostB"]]
    assert sorted(many["nodes"]) == sorted([node_of["hostC"], node_of["hostA2"]])
    assert all(run["verified"] and run["probe_ok"] for run in (one, many)), report
