"""DCUtR between js-libp2p and our MeshNode, each behind its own kernel NAT (netlab).

Lab (a netlab of our own prefix, always torn down): our MeshNode serves circuit relay v2 on pub1
(public); the js-libp2p peer runs inside hostA (behind natA, a cone NAT) under
``ip netns exec``; our MeshNode runs inside hostB (behind natB, a cone NAT) on a namespace
thread. Our node reserves a slot on the relay; js dials it through the relay; our node, having
accepted the relayed connection, starts DCUtR (CONNECT, CONNECT, SYNC); after SYNC both sides
dial over QUIC and the two NATs open to each other, so js's QUIC connection reaches our node
directly. The test then pings over that direct connection from both ends.

What the lab needs from js, and why (js-libp2p 2.10, @libp2p/dcutr 2.0.38):

* @libp2p/dcutr sends and dials public addresses only (``@libp2p/utils/private-ip`` lists
  netlab's 198.18.0.0/15 as private), and identify drops an observed address it counts as
  private. A ``/dns4/`` address counts as public, so our node advertises natB's mapping as
  ``/dns4/b.lab/udp/PORT/quic-v1`` and js resolves that name from a static table
  (``INTEROP_HOSTS``, a resolver given to its connection manager).
* js's QUIC transport dials from one client socket of its own (bound at start, not the
  listener's), so the hole natA opens is for that socket's port, not js's listen port. natA
  keeps source ports (a cone NAT), so the mapping is natA's address with that port; the test
  reads the port with ``ss`` in hostA and js takes that address as confirmed (``confirmAddr``,
  what AutoNAT would do), so it is in js's CONNECT and our node punches it.
* TCP cannot be punched with js behind a NAT: Node's ``net.connect`` has no port reuse, so
  js's TCP SYN leaves from an ephemeral port it never tells anyone, and netlab's NATs filter
  inbound packets by address and port (``test_js_tcp_dial_leaves_from_a_port_it_never_announced``
  shows the port it dials from is not one js announces).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest

from latticaray.mesh.libp2p.dcutr import DcutrRole
from latticaray.mesh.nat.libp2p_relay import Libp2pRelayService
from latticaray.mesh.node import MeshConfig, MeshNode

from .jspeer import JsPeer, node_available

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netlab_util import NamespaceLoop, lab, netlab_available

pytestmark = pytest.mark.netlab

LAB_PREFIX = os.environ.get("LATTICARAY_NAT_LAB_PREFIX", f"lrj{os.getpid() % 100000}")
RELAY_IP = "198.18.0.11"  # pub1
NAT_A = "198.18.0.101"  # natA's WAN address (js behind it, in hostA)
NAT_B = "198.18.0.102"  # natB's WAN address (our node behind it, in hostB)
HOST_B = "198.19.2.10"
RELAY_PORT = 4101
OUR_PORT = 4102  # natB keeps it (a cone NAT keeps free source ports)
JS_PORT = 4103
B_NAME = "b.lab"
PUB2 = "198.18.0.12"
PUB2_NAME = "pub2.lab"


@pytest.fixture(
    scope="module",
    params=[(), ("--wan-delay-ms", "25", "--wan-loss-pct", "0.5")],
    ids=["ideal-wan", "wan-25ms-0.5pct-loss"],
)
def dcutr_lab(request):
    """The lab, once with netlab's ideal WAN and once with 25 ms each way and 0.5% loss."""
    if not node_available():
        if os.environ.get("CI"):
            pytest.fail("node is not installed: the js-libp2p interop tests need it")
        pytest.skip("node is not installed on this machine")
    reason = netlab_available()  # raises where LATTICARAY_REQUIRE_NETLAB=1
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"netlab cannot run here: {reason}")
        pytest.skip(reason)
    with lab(LAB_PREFIX, *request.param) as status:
        yield LAB_PREFIX, status


class _Side:
    """A MeshNode on its own namespace loop."""

    def __init__(self, prefix: str, host: str) -> None:
        self.loop = NamespaceLoop(prefix, host)
        self.node: MeshNode | None = None
        self.relay: Libp2pRelayService | None = None

    def run(self, coro, timeout: float = 30.0):
        return self.loop.run(coro, timeout)

    def stop(self) -> None:
        async def stop():
            if self.relay is not None:
                await self.relay.stop()
            if self.node is not None:
                await self.node.stop()

        try:
            self.run(stop())
        finally:
            self.loop.stop()


async def _start_node(ip: str, port: int) -> MeshNode:
    node = MeshNode(
        MeshConfig(
            listen=[f"/ip4/{ip}/udp/{port}/quic-v1", f"/ip4/{ip}/tcp/{port}"],
            transports=("tcp", "quic"),
        )
    )
    return await node.start()


def _js_udp_ports(prefix: str, pid: int) -> set[int]:
    """The IPv4 UDP ports the js process holds in hostA (its listener and its QUIC client)."""
    out = subprocess.run(
        ["ip", "netns", "exec", f"{prefix}-hostA", "ss", "-Huanp"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    ports = set()
    for line in out.splitlines():
        m = re.search(r"\s0\.0\.0\.0:(\d+)\s.*pid=(\d+),", line)
        if m and int(m.group(2)) == pid:
            ports.add(int(m.group(1)))
    return ports


@pytest.fixture(scope="module")
def js_in_hostA(dcutr_lab):
    prefix, _ = dcutr_lab
    peer = JsPeer(
        wrap=("ip", "netns", "exec", f"{prefix}-hostA"),
        env={
            "INTEROP_DCUTR": "1",
            "INTEROP_LISTEN": f"/ip4/0.0.0.0/tcp/{JS_PORT},/ip4/0.0.0.0/udp/{JS_PORT}/quic-v1",
            "INTEROP_HOSTS": json.dumps({B_NAME: NAT_B, PUB2_NAME: PUB2}),
        },
    )
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def sides(dcutr_lab):
    prefix, _ = dcutr_lab
    relay = _Side(prefix, "pub1")
    ours = _Side(prefix, "hostB")
    try:
        relay.node = relay.run(_start_node(RELAY_IP, RELAY_PORT))

        async def serve():
            assert relay.node is not None
            service = Libp2pRelayService(relay.node)
            service.start()
            return service

        relay.relay = relay.run(serve())
        ours.node = ours.run(_start_node(HOST_B, OUR_PORT))
        yield relay, ours
    finally:
        ours.stop()
        relay.stop()


async def _direct_up(node: MeshNode, js_peer: str, timeout: float = 30.0):
    """Our node's direct QUIC connection to js and the DCUtR record that saw it up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        upgrades = [u for u in node.circuits.dcutr.upgrades if u.direct]
        for conn in node.connections.connections():
            if str(conn.peer_id) == js_peer and conn.transport == "quic" and upgrades:
                return conn, conn.peer_id, upgrades[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no direct connection with js: upgrades {node.circuits.dcutr.upgrades}")


def _js_client_addr(prefix: str, js: JsPeer) -> tuple[int, str]:
    """natA's mapping of js's QUIC client socket (natA keeps the port), confirmed on js."""
    client_ports = _js_udp_ports(prefix, js.proc.pid) - {JS_PORT}
    assert len(client_ports) == 1, client_ports  # js's QUIC client socket
    (client_port,) = client_ports
    js_public = f"/ip4/{NAT_A}/udp/{client_port}/quic-v1"
    assert any(js_public in a for a in js.call_sync("confirmAddr", addr=js_public))
    return client_port, js_public


def test_dcutr_js_dials_our_node_through_the_relay_then_direct(dcutr_lab, js_in_hostA, sides):
    prefix, _ = dcutr_lab
    relay, ours = sides
    js = js_in_hostA
    node = ours.node
    assert node is not None and relay.node is not None
    # natB's mapping of our QUIC socket, in the form js takes as public
    node.add_advertised_addrs([f"/dns4/{B_NAME}/udp/{OUR_PORT}/quic-v1"])
    client_port, _ = _js_client_addr(prefix, js)

    relay_addr = f"/ip4/{RELAY_IP}/tcp/{RELAY_PORT}/p2p/{relay.node.peer_id}"
    reservation = ours.run(node.circuits.reserve(relay_addr))
    circuit = str(reservation.circuit_addr)
    # js reaches our node through the relay: we accepted the relayed connection, so we are
    # DCUtR's B (initiator); js answers as A
    assert js.call_sync("ping", addr=circuit) >= 0

    conn, peer, upgrade = ours.run(_direct_up(node, js.peer_id))
    # js dialed natB's mapping from its client socket: natA's mapping of that socket
    assert str(conn.remote_addr).startswith(f"/ip4/{NAT_A}/udp/{client_port}/quic-v1")
    assert upgrade.role is DcutrRole.INITIATOR and upgrade.rtt is not None

    async def ping_direct():
        primary = node.connection_to(peer)
        assert primary is not None and primary.transport == "quic"
        return await node.ping(peer)

    assert ours.run(ping_direct()) >= 0
    js_conns = [c for c in js.call_sync("connections") if c["remotePeer"] == str(node.peer_id)]
    direct = [c for c in js_conns if "/p2p-circuit" not in c["remoteAddr"]]
    assert direct and not direct[0]["limited"] and direct[0]["direction"] == "outbound", js_conns
    # js's ping picks the direct, unlimited connection
    assert js.call_sync("pingPeer", peer=str(node.peer_id)) >= 0


def test_dcutr_our_node_dials_js_through_the_relay_then_direct(dcutr_lab, js_in_hostA, sides):
    """The other roles: js reserves on our relay and accepts our node's relayed connection, so
    js is B (it first tries our identify addresses alone, which natB drops, then runs
    CONNECT/SYNC) and our node answers as A, dialing js's addresses as SYNC arrives."""
    prefix, _ = dcutr_lab
    relay, ours = sides
    js = js_in_hostA
    assert relay.node is not None
    _, js_public = _js_client_addr(prefix, js)
    relay_addr = f"/ip4/{RELAY_IP}/tcp/{RELAY_PORT}/p2p/{relay.node.peer_id}"
    addrs = js.call_sync("reserve", addr=relay_addr)
    assert any(str(relay.node.peer_id) in a for a in addrs), addrs
    circuit = f"{relay_addr}/p2p-circuit/p2p/{js.peer_id}"
    # a second node of ours in hostB on another port: natB holds no mapping for it yet
    node = ours.run(_start_node(HOST_B, OUR_PORT + 10))
    try:
        node.add_advertised_addrs([f"/dns4/{B_NAME}/udp/{OUR_PORT + 10}/quic-v1"])
        peer = ours.run(node.connect(circuit, timeout=15))
        assert str(peer) == js.peer_id
        conn, peer, upgrade = ours.run(_direct_up(node, js.peer_id))
        assert upgrade.role is DcutrRole.RESPONDER
        assert str(conn.remote_addr).startswith(js_public), conn.remote_addr

        async def ping_direct():
            primary = node.connection_to(peer)
            assert primary is not None and primary.transport == "quic"
            return await node.ping(peer)

        assert ours.run(ping_direct()) >= 0
        js_conns = [c for c in js.call_sync("connections") if c["remotePeer"] == str(node.peer_id)]
        assert any("/p2p-circuit" not in c["remoteAddr"] and not c["limited"] for c in js_conns)
        assert js.call_sync("pingPeer", peer=str(node.peer_id)) >= 0
    finally:
        try:
            js.call_sync("hangup", peer=str(node.peer_id), timeout=10)
        finally:
            ours.run(node.stop())


def test_dcutr_over_tcp_js_behind_a_nat_our_node_public(dcutr_lab, js_in_hostA, sides):
    """What TCP can do with js: our node public (pub2), js behind natA. js reaches our node
    through the relay, our node (B) runs DCUtR with its TCP address (as a /dns4/ name js takes
    as public), and js's TCP dial after SYNC leaves natA like any outbound connection."""
    prefix, _ = dcutr_lab
    relay, _ = sides
    js = js_in_hostA
    assert relay.node is not None
    public = _Side(prefix, "pub2")
    try:
        node = public.node = public.run(_start_node(PUB2, OUR_PORT))
        node.add_advertised_addrs([f"/dns4/{PUB2_NAME}/tcp/{OUR_PORT}"])
        relay_addr = f"/ip4/{RELAY_IP}/tcp/{RELAY_PORT}/p2p/{relay.node.peer_id}"
        reservation = public.run(node.circuits.reserve(relay_addr))
        assert js.call_sync("ping", addr=str(reservation.circuit_addr)) >= 0

        async def direct_tcp(timeout: float = 30.0):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                done = [u for u in node.circuits.dcutr.upgrades if u.direct]
                for conn in node.connections.connections():
                    if str(conn.peer_id) == js.peer_id and conn.transport == "tcp" and done:
                        return conn, done[0]
                await asyncio.sleep(0.05)
            raise AssertionError(f"no direct TCP connection: {node.circuits.dcutr.upgrades}")

        conn, upgrade = public.run(direct_tcp())
        assert upgrade.role is DcutrRole.INITIATOR and not conn.outbound
        assert str(conn.remote_addr).startswith(f"/ip4/{NAT_A}/tcp/"), conn.remote_addr

        async def ping_direct():
            primary = node.connection_to(conn.peer_id)
            assert primary is not None and primary.transport == "tcp"
            return await node.ping(conn.peer_id)

        assert public.run(ping_direct()) >= 0
        assert js.call_sync("pingPeer", peer=str(node.peer_id)) >= 0
    finally:
        try:
            if public.node is not None:
                js.call_sync("hangup", peer=str(public.node.peer_id), timeout=10)
        finally:
            public.stop()


def test_js_tcp_dial_leaves_from_a_port_it_never_announced(js_in_hostA, sides):
    """Why the js cell is QUIC: a TCP punch needs the peer to dial from the port it announced
    (port reuse); js's TCP dial to the public relay arrives from natA with another port, one
    js's own addresses never name, so nobody behind a NAT could aim at it."""
    relay, _ = sides
    js = js_in_hostA
    assert relay.node is not None
    relay_addr = f"/ip4/{RELAY_IP}/tcp/{RELAY_PORT}/p2p/{relay.node.peer_id}"
    assert js.call_sync("ping", addr=relay_addr) >= 0

    async def js_tcp_port() -> int:
        for conn in relay.node.connections.connections():
            if str(conn.peer_id) == js.peer_id and conn.transport == "tcp":
                addr = str(conn.remote_addr)
                assert addr.startswith(f"/ip4/{NAT_A}/tcp/"), addr
                return int(addr.split("/")[4])
        raise AssertionError("the relay has no TCP connection from js")

    port = relay.run(js_tcp_port())
    announced = js.call_sync("info")["addrs"]
    assert port != JS_PORT
    assert not any(f"/tcp/{port}/" in a for a in announced), (port, announced)
