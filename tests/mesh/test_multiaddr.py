"""Multiaddr parsing, formatting, binary form, accessors and precise errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.errors import MultiaddrError
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.multiaddr import Multiaddr

PID = KeyPair.from_private_bytes(bytes(range(32))).peer_id
RELAY = KeyPair.from_private_bytes(bytes(range(1, 33))).peer_id


def test_quic_addr_accessors():
    a = Multiaddr.parse(f"/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{PID}")
    assert str(a) == f"/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{PID}"
    assert (a.host, a.port, a.transport, a.peer_id) == ("127.0.0.1", 4001, "quic", PID)
    assert a.without_peer() == Multiaddr.parse("/ip4/127.0.0.1/udp/4001/quic-v1")
    assert a.without_peer().with_peer(PID) == a
    assert a.with_peer(RELAY).peer_id == RELAY
    assert Multiaddr.from_bytes(a.to_bytes()) == a
    assert a.relay_peer is None


def test_known_binary_encoding():
    # /ip4/127.0.0.1/tcp/4001 is 04 7f000001 06 0fa1 in multicodec form
    assert Multiaddr.parse("/ip4/127.0.0.1/tcp/4001").to_bytes() == bytes.fromhex(
        "047f000001060fa1"
    )
    assert Multiaddr.parse("/ip4/1.2.3.4/udp/1/quic-v1").to_bytes() == bytes.fromhex(
        "0401020304910200 01cd03".replace(" ", "")
    )


def test_ip6_tcp_and_ipfs_alias():
    a = Multiaddr.parse(f"/ip6/0:0::1/tcp/80/ipfs/{PID}")
    assert str(a) == f"/ip6/::1/tcp/80/p2p/{PID}"
    assert a.transport == "tcp" and a.host == "::1" and a.is_loopback()


def test_circuit_addr():
    a = Multiaddr.parse(f"/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{RELAY}/p2p-circuit/p2p/{PID}")
    assert a.transport == "circuit"
    assert a.relay_peer == RELAY and a.peer_id == PID
    assert a.relay_addr == Multiaddr.parse(f"/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{RELAY}")
    bare = Multiaddr.parse(f"/p2p/{RELAY}/p2p-circuit")
    assert bare.peer_id is None and bare.relay_peer == RELAY
    assert Multiaddr.from_bytes(a.to_bytes()) == a


def test_unix_paths():
    a = Multiaddr.parse(f"/unix/%2Ftmp%2Fn%201.sock/p2p/{PID}")
    assert a.unix_path == "/tmp/n 1.sock" and a.transport == "unix" and a.peer_id == PID
    assert Multiaddr.parse(str(a)) == a
    legacy = Multiaddr.parse("/unix/tmp/node.sock")
    assert legacy.unix_path == "/tmp/node.sock"
    assert Multiaddr.from_bytes(a.to_bytes()) == a


def test_dns():
    a = Multiaddr.parse("/dns4/example.com/tcp/443")
    assert a.host == "example.com" and a.port == 443


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "must start with"),
        ("ip4/1.2.3.4", "must start with"),
        ("/ip4/1.2.3", "not an IPv4"),
        ("/ip4/1.2.3.4/tcp", "needs a value"),
        ("/ip4/1.2.3.4/tcp/65536", "out of range"),
        ("/ip4/1.2.3.4/tcp/-1", "decimal"),
        ("/ip4/1.2.3.4/udp/4001/quic", "unknown protocol 'quic'"),
        ("/ip6/zz::1", "not an IPv6"),
        ("/ip4/1.2.3.4/tcp/1/p2p/notapeer0", "/p2p/"),
        ("//", "empty protocol"),
        ("/foo/1", "unknown protocol 'foo'"),
    ],
)
def test_malformed_strings(text, fragment):
    with pytest.raises(MultiaddrError, match=fragment):
        Multiaddr.parse(text)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty"),
        (b"\x04\x7f\x00", "truncated"),
        (b"\xff\xff\xff\x7f", "unknown multiaddr protocol code"),
        (b"\x80", "varint"),
        (bytes.fromhex("a503") + b"\x05abcde", "/p2p value"),
        (b"\x04" * 2000, "over"),
    ],
)
def test_malformed_bytes(data, fragment):
    with pytest.raises(MultiaddrError, match=fragment):
        Multiaddr.from_bytes(data)


ip4 = st.ip_addresses(v=4).map(lambda a: ("ip4", str(a)))
ip6 = st.ip_addresses(v=6).map(lambda a: ("ip6", str(a)))
ports = st.integers(0, 65535)
paths = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=0,
    max_size=40,
).map(lambda s: "/" + s)


@st.composite
def addrs(draw):
    comps = [draw(st.one_of(ip4, ip6, st.just(("unix", draw(paths)))))]
    if comps[0][0] != "unix":
        kind = draw(st.sampled_from(["tcp", "udp", "quic"]))
        if kind == "quic":
            comps += [("udp", draw(ports)), ("quic-v1", None)]
        else:
            comps.append((kind, draw(ports)))
    if draw(st.booleans()):
        comps.append(("p2p", PID))
        if draw(st.booleans()):
            comps += [("p2p-circuit", None), ("p2p", RELAY)]
    return Multiaddr(comps)


@settings(max_examples=200, deadline=None)
@given(addrs())
def test_round_trip_property(addr):
    assert Multiaddr.parse(str(addr)) == addr
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    assert hash(Multiaddr.parse(str(addr))) == hash(addr)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash(data):
    try:
        Multiaddr.from_bytes(data)
    except MultiaddrError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_random_text_never_crash(text):
    try:
        Multiaddr.parse(text)
    except MultiaddrError:
        pass


def test_bad_percent_encoding_is_a_multiaddr_error():
    with pytest.raises(MultiaddrError, match="not UTF-8"):
        Multiaddr.parse("/unix/%2Ftmp%ff")
