"""The /latticaray/dht/1 wire codec: round trips, and clear errors for malformed or oversize input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.dht import messages as m
from latticaray.mesh.dht.errors import DhtProtocolError
from latticaray.mesh.dht.keyspace import Contact
from latticaray.mesh.dht.records import Record
from latticaray.mesh.identity import KeyPair


def test_round_trips():
    kp = KeyPair.generate()
    rec = Record.create(b"key", b"value", 123.5, kp, subkey=b"sub")
    peer = Contact(kp.peer_id.to_bytes(), ("/ip4/127.0.0.1/udp/4001/quic-v1",))
    req = m.decode_request(
        m.encode(
            {
                "op": m.PUT_VALUE,
                "server": True,
                "addrs": ("/ip4/127.0.0.1/tcp/1",),
                "records": [rec],
            }
        )
    )
    assert req["records"] == [rec] and req["addrs"] == ("/ip4/127.0.0.1/tcp/1",)
    req = m.decode_request(m.encode({"op": m.FIND_NODE, "target": b"\x01" * 32}))
    assert req == {"op": m.FIND_NODE, "server": True, "target": b"\x01" * 32}
    req = m.decode_request(m.encode({"op": m.ADD_PROVIDER, "key": b"cid", "ttl": 60}))
    assert req["ttl"] == 60.0
    resp = m.decode_response(m.encode({"records": [rec], "peers": [peer], "providers": [peer]}))
    assert resp["records"] == [rec]
    assert resp["peers"][0].peer_id == peer.peer_id and resp["peers"][0].addrs == peer.addrs
    assert resp["peers"][0].node_id == peer.node_id, "the DHT id is recomputed from the peer id"
    assert m.decode_response(m.encode(m.error_response("quota", "too many"))) == {
        "error": "quota",
        "message": "too many",
    }


@pytest.mark.parametrize(
    "wire, needle",
    [
        (b"\xc1", "msgpack"),
        (msgpack.packb([1, 2]), "map"),
        (msgpack.packb({"op": "delete_everything"}), "unknown operation"),
        (msgpack.packb({"op": "find_node", "target": b"short"}), "32 bytes"),
        (msgpack.packb({"op": "get_value"}), "'key'"),
        (msgpack.packb({"op": "put_value", "records": []}), "no records"),
        (
            msgpack.packb({"op": "put_value", "records": [[b"k", None, b"v", "soon", b"p", b"s"]]}),
            "float",
        ),
        (
            msgpack.packb(
                {"op": "put_value", "records": [[b"k", None, b"v", float("nan"), b"p", b"s"]]}
            ),
            "finite",
        ),
        (msgpack.packb({"op": "add_provider", "key": b"c", "ttl": -1}), "positive"),
        (msgpack.packb({"op": "ping", "addrs": ["x"] * 9}), "at most 8"),
        (msgpack.packb({"op": "ping", "server": "yes"}), "boolean"),
        (b"\x00" * (m.MAX_MESSAGE_SIZE + 1), "exceeds"),
    ],
)
def test_malformed_requests_raise_clear_errors(wire, needle):
    with pytest.raises(DhtProtocolError) as info:
        m.decode_request(wire)
    assert needle in str(info.value)


def test_malformed_responses_raise_clear_errors():
    with pytest.raises(DhtProtocolError, match="at most 64 peers"):
        m.decode_response(msgpack.packb({"peers": [[b"p", []]] * 65}))
    with pytest.raises(DhtProtocolError, match="malformed peer"):
        m.decode_response(msgpack.packb({"peers": [[b"", []]]}))
    with pytest.raises(DhtProtocolError, match="6-element"):
        m.decode_response(msgpack.packb({"records": [[b"k"]]}))
    with pytest.raises(DhtProtocolError, match="results"):
        m.decode_response(msgpack.packb({"results": [1]}))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(data):
    for decode in (m.decode_request, m.decode_response):
        try:
            decode(data)
        except DhtProtocolError:
            pass
