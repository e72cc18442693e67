"""Zero-flag join on real kernel NATs: nodes given only pub1's address find their reachability,
two relays and each other (MeshNode + MeshNatService in auto mode + DHT, no runtime).

Lab: pub1 and pub2 public (relay + AutoNAT), hostA and hostB behind cone NATs, hostC behind a
symmetric NAT. No observer, relay or address policy is given to any node: the policy comes from
``LATTICARAY_LAB=1``, exactly as a laptop's comes from its (empty) environment.
"""

import asyncio
import contextlib
import os
import time

import pytest

from latticaray.mesh.nat.errors import NotReachable

from .labnodes import AutoLab

pytestmark = pytest.mark.netlab

PRIVATE = ["hostA", "hostB", "hostC"]


async def echo(ctx, payload):
    return bytes(payload) + b"|" + ctx.transport.encode()


@contextlib.contextmanager
def lab_environment():
    before = os.environ.get("LATTICARAY_LAB")
    os.environ["LATTICARAY_LAB"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LATTICARAY_LAB", None)
        else:
            os.environ["LATTICARAY_LAB"] = before


@pytest.fixture(scope="module")
def auto_lab(nat_lab):
    lab = AutoLab(nat_lab[0], ["pub2", *PRIVATE], quic_port=4801, relay_port=4802)
    with lab_environment():
        try:
            lab.start()
            for host in lab.hosts:
                lab.nodes[host].register_unary("/test/echo/1", echo)
            yield lab
        finally:
            lab.stop()


def verdict(lab, host, timeout=15.0):
    """The node's status once AutoNAT has a verdict (dial-backs take a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        status = lab.status(host)
        if status["reachability"] != "unknown" or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_each_node_learns_its_reachability_and_holds_two_relays(auto_lab):
    lab = auto_lab
    for host in ("pub1", "pub2"):
        status = verdict(lab, host)
        assert status["reachability"] == "public", (host, status)
        assert status["needs_relay"] is False and status["reserved"] == []
    expected_nat = {
        "hostA": "endpoint-independent",
        "hostB": "endpoint-independent",
        "hostC": "endpoint-dependent",
    }
    relays = {str(lab.nodes[h].peer_id) for h in ("pub1", "pub2")}
    for host, nat_type in expected_nat.items():
        status = verdict(lab, host)
        assert status["nat_type"] == nat_type, (host, status)
        assert status["reachability"] == "private", (host, status)
        assert set(status["reserved"]) == relays, (host, status)
        assert len(status["circuit_addrs"]) == 2
        assert set(status["autonat_servers"]) == relays
    print("zero-flag join, s:", {h: round(s, 2) for h, s in lab.join_s.items()})
    assert all(s < 10.0 for s in lab.join_s.values()), lab.join_s


def path_to(lab, host, peer_host) -> str:
    """How ``host``'s NAT service got its direct path to ``peer_host`` ("none": it has none)."""

    async def read() -> str:
        link = lab.nats[host].links.get(lab.nodes[peer_host].peer_id)
        return link.metrics.path if link is not None else "none"

    return lab.loops[host].run(read(), 10)


@pytest.mark.parametrize(
    ("src", "dst", "path"),
    [("hostA", "hostB", "punched"), ("hostA", "hostC", "birthday"), ("hostC", "hostB", "birthday")],
)
def test_nodes_reach_each_other_directly_after_hole_punching(auto_lab, src, dst, path):
    """Whoever dialed first (the test, or the DHT's own traffic between the two), the pair ends
    on a direct QUIC connection that hole punching opened (birthday probing with hostC)."""
    lab = auto_lab
    node, dht = lab.nodes[src], lab.dhts[src]
    target = lab.nodes[dst].peer_id

    async def reach() -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        if node.connection_to(target) is None:  # find it: its circuit addresses are in the DHT
            while not any(a.transport == "circuit" for a in await dht.find_peer(target)):
                assert loop.time() < deadline, "the DHT never gave the target's circuit address"
                await asyncio.sleep(0.2)
        first = await node.call(target, "/test/echo/1", b"hello", timeout=20)
        while node.connection_to(target).transport != "quic":
            assert loop.time() < deadline, ("never direct", node.connections.connections(target))
            await asyncio.sleep(0.05)
        return first + b" " + await node.call(target, "/test/echo/1", b"direct", timeout=20)

    replies = lab.loops[src].run(reach(), 120)
    assert replies.startswith(b"hello|") and replies.endswith(b" direct|quic"), replies
    assert path in {path_to(lab, src, dst), path_to(lab, dst, src)}


def test_behind_a_symmetric_nat_with_no_relay_in_the_mesh_the_error_says_so(nat_lab):
    lab = AutoLab(
        nat_lab[0], ["hostC"], quic_port=4811, relay_port=4812, serve_relay=False, no_relay_grace=1
    )
    with lab_environment():
        try:
            lab.start()
            nat = lab.nats["hostC"]
            with pytest.raises(NotReachable) as info:
                lab.loops["hostC"].run(nat.wait_reachable(4.0), 10)
        finally:
            lab.stop()
    message = str(info.value)
    assert "symmetric" in message and "holds no relay reservation" in message, message
    assert "--relay" in message
