"""Identify record codec: round trip, refusal of records speaking for another peer, fuzzing."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.errors import ProtocolViolation
from latticaray.mesh.identify import IdentifyInfo
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.multiaddr import Multiaddr

ME = KeyPair.generate().peer_id
OTHER = KeyPair.generate().peer_id


def sample():
    return IdentifyInfo(
        peer_id=ME,
        listen_addrs=[
            Multiaddr.parse("/ip4/127.0.0.1/udp/4001/quic-v1"),
            Multiaddr.parse("/ip6/::1/tcp/4001"),
        ],
        observed_addr=Multiaddr.parse("/ip4/198.18.0.7/udp/5555/quic-v1"),
        protocols=["/latticaray/identify/1", "/latticaray/dht/1"],
        agent_version="latticaray/0.1.0",
    )


def test_round_trip():
    info = IdentifyInfo.decode(sample().encode(), expected_peer=ME)
    assert info == sample()


def test_record_for_another_peer_is_refused():
    with pytest.raises(ProtocolViolation, match="claims peer"):
        IdentifyInfo.decode(sample().encode(), expected_peer=OTHER)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"id": "text"}), "type str"),
        (msgpack.packb({"id": b"\x00\x01"}), "identify record"),
        (msgpack.packb({"id": ME.to_bytes(), "la": [b"\xff\xff"]}), "identify record"),
        (b"\x00" * 70_000, "over"),
    ],
)
def test_malformed_records(data, fragment):
    with pytest.raises(ProtocolViolation, match=fragment):
        IdentifyInfo.decode(data)


def test_oversized_lists_are_truncated_not_trusted():
    info = sample()
    info.listen_addrs = info.listen_addrs * 100
    decoded = IdentifyInfo.decode(info.encode())
    assert len(decoded.listen_addrs) == 64


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    try:
        IdentifyInfo.decode(data)
    except ProtocolViolation:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "id", "la", "oa", "p", "av", "x"]),
        st.one_of(
            st.none(),
            st.integers(-(2**63), 2**63 - 1),
            st.binary(max_size=40),
            st.text(max_size=20),
            st.lists(st.binary(max_size=20), max_size=4),
        ),
    )
)
def test_random_maps_never_crash(record):
    try:
        IdentifyInfo.decode(msgpack.packb(record, use_bin_type=True))
    except ProtocolViolation:
        pass


class _StubConn:
    def __init__(self, transport, remote):
        self.transport = transport
        self.remote_addr = Multiaddr.parse(remote) if remote else None


class _StubNode:
    def __init__(self, conn):
        self._conn = conn

    def register_unary(self, *_):
        pass

    def connection_to(self, _peer):
        return self._conn


def test_loopback_and_unix_addresses_of_a_remote_host_are_not_kept():
    from latticaray.mesh.identify import IdentifyService

    addrs = [
        Multiaddr.parse("/ip4/127.0.0.1/udp/1/quic-v1"),
        Multiaddr.parse("/unix/%2Ftmp%2Fa.sock"),
        Multiaddr.parse("/ip4/203.0.113.5/udp/1/quic-v1"),
    ]
    remote = IdentifyService(_StubNode(_StubConn("quic", "/ip4/203.0.113.5/udp/1/quic-v1")))
    assert remote._dialable_from_here(OTHER, addrs) == addrs[2:]
    local = IdentifyService(_StubNode(_StubConn("quic", "/ip4/127.0.0.1/udp/9/quic-v1")))
    assert local._dialable_from_here(OTHER, addrs) == addrs
