"""NAT traversal on real kernel NATs (netlab): reachability, relay, hole punching, birthday probing.

Lab: pub1 (relay, AutoNAT, observer), pub2 (AutoNAT, observer), hostA/hostB behind cone NATs,
hostC behind a symmetric NAT, hostD public behind a stateful firewall.
"""

import socket

import pytest

from latticaray.mesh.nat import autonat, wire
from latticaray.mesh.nat.autonat import Reachability
from latticaray.mesh.nat.control import MAGIC
from latticaray.mesh.nat.errors import NO_RESERVATION, RESOURCE_LIMIT_EXCEEDED, RelayRefused
from latticaray.mesh.nat.nattype import NatType
from latticaray.mesh.nat.relay import RelayConfig
from latticaray.mesh.nat.service import PING_SERVICE

from .labnodes import IPS, LabMesh

pytestmark = pytest.mark.netlab

HOSTS = ["pub2", "hostA", "hostB", "hostC", "hostD"]
PRIVATE = ["hostA", "hostB", "hostC", "hostD"]
SECRET = b"lattica-secret-payload-0123456789abcdef" * 8


@pytest.fixture(scope="module")
def mesh(nat_lab):
    prefix, _ = nat_lab
    m = LabMesh(prefix, HOSTS, quic_port=4001, relay_port=4002)
    try:
        m.start()
        m.discovery = m.discover()
        m.reserve_all(PRIVATE)
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def relay_only_mesh(nat_lab):
    prefix, _ = nat_lab
    m = LabMesh(
        prefix,
        HOSTS,
        quic_port=4201,
        relay_port=4202,
        hole_punching=False,
        relay_capture=True,
        relay_config=RelayConfig(max_reservations=4),
    )
    try:
        m.start()
        m.discovery = m.discover()
        m.reserve_all(PRIVATE)
        yield m
    finally:
        m.stop()


def test_reachability_and_nat_type_of_each_lab_host(mesh):
    expected = {
        "pub1": (NatType.NO_NAT, Reachability.PUBLIC),
        "pub2": (NatType.NO_NAT, Reachability.PUBLIC),
        "hostA": (NatType.ENDPOINT_INDEPENDENT, Reachability.PRIVATE),
        "hostB": (NatType.ENDPOINT_INDEPENDENT, Reachability.PRIVATE),
        "hostC": (NatType.ENDPOINT_DEPENDENT, Reachability.PRIVATE),
        "hostD": (NatType.NO_NAT, Reachability.PRIVATE),
    }  # firewall drops dial-backs
    got = {h: (report.nat_type, reach) for h, (report, reach) in mesh.discovery.items()}
    assert got == expected
    assert mesh.discovery["hostA"][0].mapped == (("198.18.0.101", 4001),)
    assert mesh.discovery["hostA"][0].port_preserving is True
    assert (
        mesh.nodes["hostA"]
        .circuit_address()
        .endswith(
            f"/p2p/{mesh.nodes['pub1'].peer_id}/p2p-circuit/p2p/{mesh.nodes['hostA'].peer_id}"
        )
    )


def test_forged_and_garbage_datagrams_are_dropped(mesh):
    """A forged dial-back cannot make hostA's address look public; garbage never crashes a node."""
    node = mesh.nodes["hostA"]
    before = node.stats.get("control_rejected", 0)

    async def attack():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.sendto(MAGIC + autonat.encode_dial_back(b"\x42" * 16), ("198.19.1.10", 4001))
            sock.sendto(MAGIC + b"\xc1\xc1 not msgpack", ("198.19.1.10", 4001))
            sock.sendto(
                MAGIC + wire.encode("dial", id=1, a=[["198.18.0.12", 53]], n=[b"x" * 16]),
                ("198.19.1.10", 4001),
            )  # hostA serves no AutoNAT
        finally:
            sock.close()

    # natA shares hostA's LAN segment, so it can reach hostA's private address directly
    from netlab_util import NamespaceLoop

    attacker = NamespaceLoop(mesh.prefix, "natA")
    try:
        attacker.run(attack(), 10)
    finally:
        attacker.stop()

    async def wait_rejected():
        import asyncio

        for _ in range(200):
            if node.stats.get("control_rejected", 0) >= before + 3:
                return True
            await asyncio.sleep(0.01)
        return False

    assert mesh.loops["hostA"].run(wait_rejected(), 10)
    assert mesh.nodes["hostA"].autonat_client.reachability() is Reachability.PRIVATE
    mesh.connect("hostA", "pub2")
    assert mesh.call("hostA", "pub2", PING_SERVICE, b"still alive") == b"still alive"


def test_punching_disabled_every_pair_works_over_the_relay_which_sees_only_ciphertext(
    relay_only_mesh,
):
    m = relay_only_mesh
    relay = m.nodes["pub1"].relay_server
    for src in PRIVATE:
        for dst in PRIVATE:
            if src == dst:
                continue
            m.connect(src, dst)
            payload = SECRET + f"{src}->{dst}".encode()
            assert m.call(src, dst, PING_SERVICE, payload) == payload
            assert m.nodes[src].path_of(m.nodes[dst].peer_id) == "relayed"
    assert relay.bytes_relayed > 12 * len(SECRET)
    assert SECRET[:32] not in bytes(relay.captured)
    assert not any("lattica-secret" in line for line in relay.log_lines)


def test_relay_reservation_limits_and_unreserved_targets_are_refused(relay_only_mesh):
    m = relay_only_mesh
    relay = m.nodes["pub1"]
    with pytest.raises(RelayRefused) as info:  # 4 slots, all taken by hostA..hostD
        m.loops["pub2"].run(
            m.nodes["pub2"].reserve_relay(relay.peer_id, IPS["pub1"], m.relay_port), 20
        )
    assert info.value.code == RESOURCE_LIMIT_EXCEEDED

    async def connect_unreserved():
        return await m.nodes["hostA"].relay_client.connect(
            relay.peer_id, IPS["pub1"], m.relay_port, m.nodes["pub2"].peer_id
        )

    with pytest.raises(RelayRefused) as info:
        m.loops["hostA"].run(connect_unreserved(), 20)
    assert info.value.code == NO_RESERVATION


def test_cone_to_cone_is_punched_direct(mesh):
    for src, dst in (("hostA", "hostB"), ("hostD", "hostB")):
        link = mesh.connect(src, dst)
        assert mesh.call(src, dst, PING_SERVICE, b"first") == b"first"
        assert mesh.wait_upgrade(src, dst) == "punched", link.metrics.events
        assert link.metrics.upgraded_at is not None
        assert mesh.call(src, dst, PING_SERVICE, b"direct") == b"direct"


def test_cone_to_symmetric_uses_birthday_probing(mesh):
    link = mesh.connect("hostA", "hostC")
    assert mesh.call("hostA", "hostC", PING_SERVICE, b"x") == b"x"
    assert mesh.wait_upgrade("hostA", "hostC") == "birthday", link.metrics.events
    assert link.metrics.punch_attempts <= 3
    assert mesh.call("hostA", "hostC", PING_SERVICE, b"via birthday") == b"via birthday"


def test_tcp_simultaneous_open_between_cone_nats(nat_lab):
    prefix, _ = nat_lab
    m = LabMesh(
        prefix,
        ["pub2", "hostA", "hostB"],
        quic_port=4601,
        relay_port=4602,
        punch_protocol="tcp",
        tcp_port=4603,
    )
    try:
        m.start()
        m.discover()
        m.reserve_all(["hostA", "hostB"])
        link = m.connect("hostA", "hostB")
        assert m.wait_upgrade("hostA", "hostB") == "tcp-punched", link.metrics.events
        assert m.call("hostA", "hostB", PING_SERVICE, b"over tcp") == b"over tcp"
        back = m.nodes["hostB"].links[m.nodes["hostA"].peer_id]
        assert back.path == "tcp-punched"
    finally:
        m.stop()


def test_punched_connection_survives_the_relay_going_away(mesh):
    link = mesh.connect("hostB", "hostA")
    assert mesh.wait_upgrade("hostB", "hostA") == "punched", link.metrics.events
    relay_node = mesh.nodes["pub1"]
    mesh.loops["pub1"].run(relay_node.relay_server.stop(), 20)
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (link.relayed is not None and link.relayed.closed):
        time.sleep(0.05)
    assert link.relayed.closed  # the relay really is gone
    assert mesh.call("hostB", "hostA", PING_SERVICE, b"after relay") == b"after relay"
    assert link.path == "punched"
