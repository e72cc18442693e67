"""kadwire: the DHT core's requests and answers as libp2p Kademlia messages, both directions,
and what a foreign node's message may not make the core do."""

from __future__ import annotations

import pytest

from latticaray.mesh.dht.core import DhtCore
from latticaray.mesh.dht.kadwire import (
    contact_to_peer,
    core_request,
    core_response,
    from_kad_key,
    kad_answer,
    kad_request,
    peer_to_contact,
    provider_key,
    to_kad_key,
)
from latticaray.mesh.dht.keyspace import Contact, id_to_bytes, key_id, record_id
from latticaray.mesh.dht.messages import decode_records, encode_records
from latticaray.mesh.dht.records import Record
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.libp2p.kad import MAX_VALUE, KadMessage, KadPeer, KadRecord, MessageType
from latticaray.objectstore.cid import Cid

NOW = 1_000_000.0


@pytest.fixture(scope="module")
def alice() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture(scope="module")
def bob() -> KeyPair:
    return KeyPair.generate()


def _contact(kp: KeyPair, port: int = 4001) -> Contact:
    pid = kp.peer_id
    return Contact(
        pid.to_bytes(),
        (
            f"/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{pid}",
            f"/unix/tmp/x.sock/p2p/{pid}",  # never told to a foreign node
        ),
    )


def test_keys_namespace_and_providers_by_multihash():
    assert to_kad_key(b"capacity/gpu") == b"/latticaray/capacity/gpu"
    assert from_kad_key(b"/latticaray/capacity/gpu") == b"capacity/gpu"
    assert from_kad_key(b"/latticaray/") is None and from_kad_key(b"/pk/abc") is None
    assert record_id(b"k") == key_id(b"/latticaray/k")
    cid = Cid.of(b"hello world")
    mh = provider_key(bytes(cid))
    assert bytes(cid).endswith(mh) and mh[:2] == b"\x12\x20"  # sha2-256, 32 bytes
    assert provider_key(b"relay/rendezvous") == b"relay/rendezvous"  # not a CID: as is


def test_contacts_and_peers_round_trip(alice):
    peer = contact_to_peer(_contact(alice))
    assert peer.peer_id == alice.peer_id.to_bytes() and len(peer.addrs) == 1  # no unix path
    back = peer_to_contact(peer)
    assert back is not None
    assert back.addrs == (f"/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{alice.peer_id}",)
    assert peer_to_contact(KadPeer(b"not a peer id", (b"\xff\xff",))) is None
    garbled = peer_to_contact(KadPeer(alice.peer_id.to_bytes(), (b"\xff\xff", peer.addrs[0])))
    assert garbled is not None and len(garbled.addrs) == 1  # an unreadable address is dropped


def test_our_requests_as_kad_messages_and_their_answers(alice, bob):
    own = _contact(alice)
    assert kad_request({"op": "find_node", "target": b"\0" * 32}, own) is None  # no preimage
    msg = kad_request({"op": "find_node", "target": b"\0" * 32, "key": b"pid"}, own)
    assert msg == KadMessage(MessageType.FIND_NODE, b"pid")
    answer = KadMessage(MessageType.FIND_NODE, b"pid", closer_peers=(contact_to_peer(own),))
    assert [c.peer_id for c in core_response({"op": "find_node"}, msg, answer)["peers"]] == [
        alice.peer_id.to_bytes()
    ]

    records = [
        Record.create(b"k", b"a", NOW + 60, alice, subkey=b"a"),
        Record.create(b"k", b"b", NOW + 60, bob, subkey=b"b"),
    ]
    put = {"op": "put_value", "records": records}
    msg = kad_request(put, own)
    assert msg is not None and msg.key == b"/latticaray/k" and msg.record is not None
    assert [r.signature for r in decode_records(msg.record.value)] == [r.signature for r in records]
    assert core_response(put, msg, msg)["results"] == [None, None]  # echoed: stored
    other = KadMessage(MessageType.PUT_VALUE, msg.key, KadRecord(msg.key, b"else"))
    assert core_response(put, msg, other)["results"] == ["refused", "refused"]
    huge = [Record.create(b"k", b"x" * (MAX_VALUE + 1), NOW + 60, alice)]
    assert kad_request({"op": "put_value", "records": huge}, own) is None

    get = {"op": "get_value", "key": b"k"}
    msg = kad_request(get, own)
    assert msg == KadMessage(MessageType.GET_VALUE, b"/latticaray/k")
    foreign = KadRecord(msg.key, b"\xc1 not msgpack")  # a foreign value under our key
    got = core_response(get, msg, KadMessage(MessageType.GET_VALUE, msg.key, foreign))
    assert got["records"] == [] and got["peers"] == []
    value = encode_records(records)
    ours = KadRecord(msg.key, value)
    got = core_response(get, msg, KadMessage(MessageType.GET_VALUE, msg.key, ours))
    assert [r.subkey for r in got["records"]] == [b"a", b"b"]
    # a value under another key, or one that is not ours, yields no records
    wrong = KadMessage(MessageType.GET_VALUE, msg.key, KadRecord(b"/latticaray/j", value))
    assert core_response(get, msg, wrong)["records"] == []

    add = {"op": "add_provider", "key": b"mh", "ttl": 60.0}
    msg = kad_request(add, own)
    assert msg is not None and msg.provider_peers[0].peer_id == alice.peer_id.to_bytes()
    assert core_response(add, msg, None) == {}
    getp = {"op": "get_providers", "key": b"mh"}
    msg = kad_request(getp, own)
    answer = KadMessage(MessageType.GET_PROVIDERS, b"mh", provider_peers=(contact_to_peer(own),))
    assert [c.peer_id for c in core_response(getp, msg, answer)["providers"]] == [
        alice.peer_id.to_bytes()
    ]


def test_their_requests_answered_from_a_core(alice, bob):
    core = DhtCore(alice.peer_id.to_bytes(), addrs=_contact(alice).addrs)
    sender = bob.peer_id.to_bytes()
    them = _contact(bob, 4002)

    def ask(message: KadMessage) -> KadMessage | None:
        request = core_request(message, sender, server=True, provider_ttl=3600.0)
        if request is None:
            return None
        return kad_answer(message, core.handle_request(them, request, NOW))

    # a server peer's request puts it in our table; FIND_NODE returns it to no one but others
    found = ask(KadMessage(MessageType.FIND_NODE, b"anything"))
    assert found is not None and found.closer_peers == ()
    assert core.routing.get(sender) is not None

    # a signed record under our namespace is stored after validation and read back
    records = [Record.create(b"k", b"v", NOW + 60, bob, subkey=b"s")]
    key = to_kad_key(b"k")
    put = KadMessage(MessageType.PUT_VALUE, key, KadRecord(key, encode_records(records)))
    assert ask(put) == put  # echoed: stored
    got = ask(KadMessage(MessageType.GET_VALUE, key))
    assert got is not None and got.record is not None
    assert [r.value for r in decode_records(got.record.value)] == [b"v"]
    # a forged one is not stored (no echo), nor one whose records name another key
    forged = Record(b"k", b"s", b"evil", NOW + 60, bob.peer_id.to_bytes(), records[0].signature)
    evil = KadMessage(MessageType.PUT_VALUE, key, KadRecord(key, encode_records([forged])))
    assert ask(evil) is None
    moved_key = to_kad_key(b"j")
    moved = KadMessage(
        MessageType.PUT_VALUE, moved_key, KadRecord(moved_key, encode_records(records))
    )
    assert ask(moved) is None
    assert [r.value for r in core.records.get(b"k", NOW)] == [b"v"]
    # other namespaces: not stored here, a GET only routes
    pk = KadMessage(MessageType.PUT_VALUE, b"/pk/x", KadRecord(b"/pk/x", b"key"))
    assert core_request(pk, sender, server=True, provider_ttl=1.0) is None
    routed = ask(KadMessage(MessageType.GET_VALUE, b"/pk/x"))
    assert routed is not None and routed.record is None

    # a provider may announce only itself
    mh = provider_key(bytes(Cid.of(b"data")))
    for_other = KadMessage(
        MessageType.ADD_PROVIDER, mh, provider_peers=(contact_to_peer(_contact(alice)),)
    )
    assert core_request(for_other, sender, server=True, provider_ttl=1.0) is None
    itself = KadMessage(MessageType.ADD_PROVIDER, mh, provider_peers=(contact_to_peer(them),))
    assert ask(itself) is None  # ADD_PROVIDER has no answer
    providers = ask(KadMessage(MessageType.GET_PROVIDERS, mh))
    assert providers is not None
    assert [p.peer_id for p in providers.provider_peers] == [sender]
    assert providers.provider_peers[0].addrs == contact_to_peer(them).addrs

    # a client's request does not enter our routing table
    core2 = DhtCore(alice.peer_id.to_bytes())
    request = core_request(KadMessage(MessageType.PING), sender, server=False, provider_ttl=1.0)
    assert request == {"server": False, "op": "ping"}
    core2.handle_request(them, request, NOW)
    assert core2.routing.get(sender) is None
    find = core_request(
        KadMessage(MessageType.FIND_NODE, b"x"), sender, server=True, provider_ttl=1
    )
    assert find is not None and find["target"] == id_to_bytes(key_id(b"x"))  # kad hashes the key


def test_answers_too_large_for_kad_keep_the_freshest(alice):
    records = [
        Record.create(b"k", b"x" * 20_000, NOW + 60 + i, alice, subkey=b"%d" % i) for i in range(8)
    ]
    records.sort(key=lambda r: r.expiration, reverse=True)
    key = to_kad_key(b"k")
    answer = kad_answer(KadMessage(MessageType.GET_VALUE, key), {"records": records})
    assert answer is not None and answer.record is not None
    assert len(answer.record.value) <= MAX_VALUE
    kept = decode_records(answer.record.value)
    assert 0 < len(kept) < len(records) and kept == records[: len(kept)]
