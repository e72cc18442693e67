"""Circuit relay v2 (libp2p's hop/stop) between MeshNodes: relay, target and dialer all ours.

The js-libp2p side of both roles is in tests/interop/test_node_relay.py; these check what a js
peer cannot show cheaply: the RPC path over a circuit, the data limit, members' limits, refusals.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from latticaray.mesh.libp2p.relay import HopMessage, HopType, RelayLimit, RelayPeer, RelayStatus
from latticaray.mesh.nat.errors import RelayRefused
from latticaray.mesh.nat.libp2p_relay import Libp2pRelayConfig, Libp2pRelayService
from latticaray.mesh.nat.relay import RelayConfig
from latticaray.mesh.node import MeshConfig, MeshNode

SINK = "/x/sink/1"


async def _node() -> MeshNode:
    node = MeshNode(MeshConfig(listen=["/ip4/127.0.0.1/tcp/0"], transports=("tcp",)))
    return await node.start()


@pytest.fixture
async def trio():
    """Relay, target, dialer; DCUtR off (these tests need the circuit to stay the path) unless
    a test turns it on."""
    nodes = [await _node() for _ in range(3)]
    for node in nodes:
        node.circuits.dcutr.enabled = False
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def _wait_closed(conn, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not conn.closed:
        if loop.time() > deadline:
            raise AssertionError("the relayed connection stayed open")
        await asyncio.sleep(0.02)


async def test_rpc_call_ping_and_identify_over_a_circuit(trio):
    relay, target, dialer = trio
    service = Libp2pRelayService(relay)
    service.start()
    try:
        reservation = await target.circuits.reserve(relay.listen_addrs[0])
        assert reservation.relay == relay.peer_id
        assert reservation.limit == service.config.public_limit
        assert reservation.circuit_addr in target.advertised_addrs

        async def echo(_ctx, payload: bytes) -> bytes:
            return b"echo:" + bytes(payload)

        target.register_unary("/x/echo/1", echo)
        peer = await dialer.connect(reservation.circuit_addr, timeout=10)
        assert peer == target.peer_id
        conn = dialer.connection_to(peer)
        assert conn is not None and conn.transport == "relay" and conn.relayed
        assert await dialer.call(peer, "/x/echo/1", b"hi", timeout=5) == b"echo:hi"
        assert await dialer.ping(peer) >= 0
        info = await dialer.identify(peer)
        assert info.peer_id == target.peer_id
    finally:
        await service.stop()


async def test_data_limit_closes_the_circuit(trio):
    relay, target, dialer = trio
    limit = RelayLimit(duration=60, data=64 * 1024)
    service = Libp2pRelayService(relay, Libp2pRelayConfig(public_limit=limit))
    service.start()
    received = bytearray()

    async def sink(stream) -> None:
        while True:
            chunk = await stream.read(65536, timeout=10)
            if not chunk:
                return
            received.extend(chunk)

    target.register_stream(SINK, sink)
    try:
        reservation = await target.circuits.reserve(relay.listen_addrs[0])
        peer = await dialer.connect(reservation.circuit_addr, timeout=10)
        conn = dialer.connection_to(peer)
        assert conn is not None and conn.transport == "relay"
        stream = await dialer.open_stream(peer, SINK, timeout=10)
        with pytest.raises(Exception):  # the circuit is reset under the writer
            for _ in range(64):
                await stream.write(b"x" * 16384, timeout=5)
                await asyncio.sleep(0)
        await _wait_closed(conn)
        assert len(received) < 64 * 1024
        assert any("data limit of 65536 bytes" in line for line in service.closed_circuits)
        assert not service.core.circuits
    finally:
        await service.stop()


async def test_members_get_the_relays_own_limits_others_the_public_ones(trio):
    relay, member, stranger = trio
    config = Libp2pRelayConfig(
        relay=RelayConfig(circuit_max_bytes=1 << 30, circuit_max_duration=3600.0)
    )
    service = Libp2pRelayService(relay, config, is_member=lambda peer: peer == member.peer_id)
    service.start()
    try:
        mine = await member.circuits.reserve(relay.listen_addrs[0])
        assert mine.limit == RelayLimit(3600, 1 << 30)
        theirs = await stranger.circuits.reserve(relay.listen_addrs[0])
        assert theirs.limit == config.public_limit
    finally:
        await service.stop()


async def test_a_members_only_relay_refuses_strangers(trio):
    relay, member, stranger = trio
    config = Libp2pRelayConfig(public=False)
    service = Libp2pRelayService(relay, config, is_member=lambda peer: peer == member.peer_id)
    service.start()
    try:
        with pytest.raises(RelayRefused) as refused:
            await stranger.circuits.reserve(relay.listen_addrs[0])
        assert refused.value.code == "PERMISSION_DENIED"
        reservation = await member.circuits.reserve(relay.listen_addrs[0])
        with pytest.raises(RelayRefused) as refused:
            await stranger.connect(reservation.circuit_addr, timeout=10)
        assert refused.value.code == "PERMISSION_DENIED"
    finally:
        await service.stop()


async def test_connect_without_reservation_and_bad_requests_are_refused(trio):
    relay, _target, dialer = trio
    service = Libp2pRelayService(relay)
    service.start()
    try:
        nobody = MeshNode().peer_id
        circuit = relay.listen_addrs[0].encapsulate(f"/p2p-circuit/p2p/{nobody}")
        with pytest.raises(RelayRefused) as refused:
            await dialer.connect(circuit, timeout=10)
        assert refused.value.code == "NO_RESERVATION"
        # a CONNECT naming no peer, and a STATUS sent as a request
        for request, status in (
            (HopMessage(HopType.CONNECT), RelayStatus.MALFORMED_MESSAGE),
            (
                HopMessage(HopType.CONNECT, peer=RelayPeer(b"\x00junk")),
                RelayStatus.MALFORMED_MESSAGE,
            ),
            (HopMessage(HopType.STATUS), RelayStatus.UNEXPECTED_MESSAGE),
        ):
            stream = await dialer.open_stream(relay.peer_id, "/libp2p/circuit/relay/0.2.0/hop")
            await stream.write_message(request.encode())
            answer = HopMessage.decode(await stream.read_message(4096, timeout=5) or b"")
            assert answer.status is status
        assert not service.core.circuits
    finally:
        await service.stop()


async def test_a_circuit_is_refused_from_a_relay_we_hold_no_reservation_on(trio):
    relay, target, dialer = trio
    service = Libp2pRelayService(relay)
    service.start()
    try:
        reservation = await target.circuits.reserve(relay.listen_addrs[0])
        target.circuits.cancel(relay.peer_id)
        assert reservation.circuit_addr not in target.advertised_addrs
        with pytest.raises(RelayRefused) as refused:
            await dialer.connect(reservation.circuit_addr, timeout=10)
        assert refused.value.code == "CONNECTION_FAILED"
    finally:
        await service.stop()


async def test_serve_relay_serves_the_hop_too_members_only_over_quic():
    """``NatConfig(serve_relay=True)`` on a MeshNatService starts the libp2p relay beside the
    mesh's own (``public_relay=False``: members only); circuits run over QUIC relay legs too."""
    from latticaray.mesh.nat.addresses import AddressPolicy
    from latticaray.mesh.nat.config import NatConfig
    from latticaray.mesh.nat.mesh_service import MeshNatService

    quic = ["/ip4/127.0.0.1/udp/0/quic-v1"]
    relay = await MeshNode(MeshConfig(listen=quic, transports=("quic",))).start()
    others = [await MeshNode(MeshConfig(listen=quic, transports=("quic",))).start() for _ in "abc"]
    member, dialer, stranger = others
    members = {member.peer_id, dialer.peer_id}
    nat = MeshNatService(
        relay,
        NatConfig(
            listen_host="127.0.0.1",
            policy=AddressPolicy(allow_loopback=True),
            serve_relay=True,
            public_relay=False,
            hole_punching=False,
        ),
        is_member=lambda peer: peer in members,
    )
    await nat.start()
    try:
        assert nat.libp2p_relay is not None
        assert "/libp2p/circuit/relay/0.2.0/hop" in relay.streams.protocols
        relay_addr = relay.listen_addrs[0]
        assert relay_addr.transport == "quic"
        with pytest.raises(RelayRefused) as refused:
            await stranger.circuits.reserve(relay_addr)
        assert refused.value.code == "PERMISSION_DENIED"
        reservation = await member.circuits.reserve(relay_addr)
        cfg = nat.config.relay_config
        assert reservation.limit == RelayLimit(int(cfg.circuit_max_duration), cfg.circuit_max_bytes)
        peer = await dialer.connect(reservation.circuit_addr, timeout=10)
        assert peer == member.peer_id
        assert await dialer.ping(peer) >= 0
    finally:
        await nat.stop()
        assert "/libp2p/circuit/relay/0.2.0/hop" not in relay.streams.protocols
        for node in (*others, relay):
            await node.stop()


async def test_dcutr_upgrades_a_circuit_to_a_direct_connection(trio):
    """Both DCUtR roles on loopback: the target (B) that accepted the circuit initiates and
    times the RTT, the dialer (A) answers; after SYNC both dial and a direct TCP connection
    becomes the primary path."""
    from latticaray.mesh.libp2p.dcutr import DcutrRole

    relay, target, dialer = trio
    target.circuits.dcutr.enabled = True
    service = Libp2pRelayService(relay)
    service.start()
    try:
        reservation = await target.circuits.reserve(relay.listen_addrs[0])
        peer = await dialer.connect(reservation.circuit_addr, timeout=10)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while True:
            a = dialer.connection_to(peer)
            b = target.connection_to(dialer.peer_id)
            done = [u for u in target.circuits.dcutr.upgrades if u.direct]
            if a and b and a.transport == "tcp" and b.transport == "tcp" and done:
                break
            assert loop.time() < deadline, (target.circuits.dcutr.upgrades, a, b)
            await asyncio.sleep(0.05)
        initiated = done[0]
        assert initiated.role is DcutrRole.INITIATOR and initiated.peer == dialer.peer_id
        assert initiated.rtt is not None and initiated.rtt > 0
        answered = [u for u in dialer.circuits.dcutr.upgrades if u.peer == target.peer_id]
        assert answered and answered[0].role is DcutrRole.RESPONDER and not answered[0].error
        assert await dialer.ping(peer) >= 0
    finally:
        await service.stop()


async def test_a_kept_reservation_is_renewed_and_circuits_work_after_its_first_expiry(trio):
    relay, target, dialer = trio
    service = Libp2pRelayService(relay, Libp2pRelayConfig(relay=RelayConfig(reservation_ttl=2.0)))
    service.start()
    try:
        first = await target.circuits.reserve(relay.listen_addrs[0], keep=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while target.circuits.reservations[relay.peer_id].expire <= first.expire + 1:
            assert loop.time() < deadline, "the reservation was not renewed"
            await asyncio.sleep(0.1)
        await asyncio.sleep(max(0.0, first.expire + 0.5 - time.time()))
        # past the first reservation's expiry: the relay (which drops expired reservations
        # before every CONNECT) still takes a circuit to the target
        peer = await dialer.connect(first.circuit_addr, timeout=10)
        assert peer == target.peer_id and await dialer.ping(peer) >= 0
        target.circuits.cancel(relay.peer_id)
        assert relay.peer_id not in target.circuits.reservations
    finally:
        await service.stop()
