"""Codecs of identify, signed peer records, Kademlia, Bitswap 1.2 and byte-level CIDs."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.libp2p.bitswap import (
    BitswapBlock,
    BitswapEngineCore,
    BitswapMessage,
    BlockPresence,
    PresenceType,
    WantEntry,
    WantType,
)
from latticaray.mesh.libp2p.cid import CidError, cid_from_block, parse_cid
from latticaray.mesh.libp2p.connection import ProtocolRouter
from latticaray.mesh.libp2p.dcutr import (
    DcutrCore,
    DcutrRole,
    DcutrState,
    DialAt,
    HolePunch,
    HolePunchType,
)
from latticaray.mesh.libp2p.errors import ProtobufError
from latticaray.mesh.libp2p.identify import IdentifyMessage, address_bytes
from latticaray.mesh.libp2p.kad import (
    ConnectionType,
    KadMessage,
    KadPeer,
    KadRecord,
    KadServer,
    MessageType,
)
from latticaray.mesh.libp2p.keys import KeyType, PrivateKey
from latticaray.mesh.libp2p.peer_record import (
    PEER_RECORD_DOMAIN,
    PEER_RECORD_PAYLOAD_TYPE,
    Envelope,
    EnvelopeError,
    PeerRecord,
    open_peer_record,
    seal_peer_record,
)
from latticaray.mesh.libp2p.relay import (
    HopMessage,
    HopType,
    RelayLimit,
    RelayPeer,
    RelayStatus,
    Reservation,
    StopMessage,
    StopType,
    Voucher,
    open_voucher,
)
from latticaray.objectstore.cid import DAG_CBOR, Cid

small = st.binary(max_size=40)
texts = st.text(max_size=30)


@given(small, st.lists(small, max_size=4), st.lists(texts, max_size=4), small, texts, texts, small)
def test_identify_roundtrip(key, addrs, protos, observed, pv, av, spr):
    m = IdentifyMessage(key, tuple(addrs), tuple(protos), observed, pv, av, spr)
    assert IdentifyMessage.decode(m.encode()) == m


def test_identify_listen_addrs_parse_what_they_can():
    m = IdentifyMessage(listen_addrs=(address_bytes("127.0.0.1", 4001), b"\xff\xff garbage"))
    assert [str(a) for a in m.multiaddrs()] == ["/ip4/127.0.0.1/tcp/4001"]


@pytest.mark.parametrize("key_type", [KeyType.ED25519, KeyType.SECP256K1, KeyType.ECDSA])
def test_signed_peer_record(key_type):
    key = PrivateKey.generate(key_type)
    addrs = (address_bytes("127.0.0.1", 1), address_bytes("::1", 2))
    sealed = seal_peer_record(key, addrs, seq=7)
    record = open_peer_record(sealed, key.public_key.peer_id_bytes())
    assert record == PeerRecord(key.public_key.peer_id_bytes(), 7, addrs)
    with pytest.raises(EnvelopeError, match="another peer"):
        open_peer_record(sealed, PrivateKey.generate().public_key.peer_id_bytes())


def test_envelope_is_bound_to_its_domain_and_signer():
    key = PrivateKey.generate()
    env = Envelope.seal(key, "other-domain", PEER_RECORD_PAYLOAD_TYPE, b"payload")
    assert env.verify("other-domain") and not env.verify(PEER_RECORD_DOMAIN)
    with pytest.raises(EnvelopeError, match="signature"):
        open_peer_record(env.encode())
    # a record about someone else, signed by us
    other = PrivateKey.generate().public_key.peer_id_bytes()
    forged = Envelope.seal(
        key, PEER_RECORD_DOMAIN, PEER_RECORD_PAYLOAD_TYPE, PeerRecord(other, 1, ()).encode()
    )
    with pytest.raises(EnvelopeError, match="other than its signer"):
        open_peer_record(forged.encode())


peers = st.builds(
    KadPeer, small, st.lists(small, max_size=3).map(tuple), st.sampled_from(ConnectionType)
)


@given(
    st.sampled_from(MessageType),
    small,
    st.none() | st.builds(KadRecord, small, small, st.just("")),
    st.lists(peers, max_size=3),
    st.lists(peers, max_size=3),
    st.integers(-(2**31), 2**31 - 1),
)
def test_kad_roundtrip(mtype, key, record, closer, providers, level):
    m = KadMessage(mtype, key, record, tuple(closer), tuple(providers), level)
    assert KadMessage.decode(m.encode()) == m


def test_kad_unknown_type_is_refused():
    with pytest.raises(ProtobufError, match="unknown kad"):
        KadMessage.decode(b"\x08\x09")


def test_kad_server_rules():
    server = KadServer(ProtocolRouter(), max_providers_per_key=2, provider_ttl=10.0)
    me, other = b"\x00\x01a", b"\x00\x01b"
    # a peer may announce only itself
    server.answer(
        me, KadMessage(MessageType.ADD_PROVIDER, b"k", provider_peers=(KadPeer(other),)), 0
    )
    assert server.answer(me, KadMessage(MessageType.GET_PROVIDERS, b"k"), 0).provider_peers == ()
    server.answer(me, KadMessage(MessageType.ADD_PROVIDER, b"k", provider_peers=(KadPeer(me),)), 0)
    got = server.answer(me, KadMessage(MessageType.GET_PROVIDERS, b"k"), 5).provider_peers
    assert [p.peer_id for p in got] == [me]
    assert server.answer(me, KadMessage(MessageType.GET_PROVIDERS, b"k"), 11).provider_peers == ()
    with pytest.raises(Exception, match="record key"):
        server.answer(me, KadMessage(MessageType.PUT_VALUE, b"a", KadRecord(b"b", b"v")))
    server.answer(me, KadMessage(MessageType.PUT_VALUE, b"a", KadRecord(b"a", b"v")))
    assert server.answer(me, KadMessage(MessageType.GET_VALUE, b"a")).record == KadRecord(
        b"a", b"v"
    )


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_decoders_fuzz_raise_only_protobuf_errors(data):
    for decoder in (
        IdentifyMessage.decode,
        KadMessage.decode,
        BitswapMessage.decode,
        Envelope.decode,
        PeerRecord.decode,
    ):
        try:
            decoder(data)
        except ProtobufError:
            pass


def test_cids_match_the_object_store():
    data = b"hello world"
    for codec in (0x55, DAG_CBOR):
        cid = Cid.of(data, codec=codec)
        parts = parse_cid(bytes(cid))
        assert (parts.version, parts.codec, parts.hash_code) == (1, codec, 0x12)
        assert cid_from_block(parts.prefix(), data) == bytes(cid)
    v0 = b"\x12\x20" + hashlib.sha256(b"pb").digest()
    assert cid_from_block(parse_cid(v0).prefix(), b"pb") == v0
    with pytest.raises(CidError):
        cid_from_block(b"\x01\x55\x1e\x20", b"blake3 not computed here")
    with pytest.raises(CidError):
        parse_cid(b"\x01\x55\x12\x20short")


entries = st.builds(
    WantEntry,
    small,
    st.integers(0, 2**31 - 1),
    st.booleans(),
    st.sampled_from(WantType),
    st.booleans(),
)


@given(
    st.lists(entries, max_size=4),
    st.booleans(),
    st.lists(st.builds(BitswapBlock, small, small), max_size=3),
    st.lists(st.builds(BlockPresence, small, st.sampled_from(PresenceType)), max_size=3),
)
def test_bitswap_roundtrip(es, full, blocks, presences):
    m = BitswapMessage(tuple(es), full, tuple(blocks), tuple(presences))
    assert BitswapMessage.decode(m.encode()) == m


def test_bitswap_engine_answers_wants_and_checks_blocks():
    data = b"block"
    cid = bytes(Cid.of(data))
    missing = bytes(Cid.of(b"missing"))
    engine = BitswapEngineCore()
    store = {cid: data}
    wants = BitswapMessage(
        entries=(
            WantEntry(cid, want_type=WantType.BLOCK),
            WantEntry(cid, want_type=WantType.HAVE),
            WantEntry(missing, want_type=WantType.HAVE, send_dont_have=True),
        )
    )
    replies, received, _ = engine.on_message(b"peer", wants, store.get)
    assert len(replies) == 1 and received == []
    reply = replies[0]
    assert [b.cid() for b in reply.blocks] == [cid]
    assert set(reply.presences) == {
        BlockPresence(cid, PresenceType.HAVE),
        BlockPresence(missing, PresenceType.DONT_HAVE),
    }
    assert engine.peers_wanting(missing) == [b"peer"]
    # a received block is kept only under the CID its bytes hash to
    _, got, _ = engine.on_message(b"peer", reply, {}.get)
    assert [(r.cid, r.data) for r in got] == [(cid, data)]
    engine.on_message(b"peer", BitswapMessage(entries=(WantEntry(missing, cancel=True),)), {}.get)
    assert engine.peers_wanting(missing) == []


def test_bitswap_engine_splits_large_answers():
    engine = BitswapEngineCore(max_message=1024 * 1024)
    blocks = {bytes(Cid.of(bytes([i]) * 300_000)): bytes([i]) * 300_000 for i in range(8)}
    wants = BitswapMessage(entries=tuple(WantEntry(c) for c in blocks))
    replies, _, _ = engine.on_message(b"p", wants, blocks.get)
    assert len(replies) > 1
    assert all(len(r.encode()) <= 1024 * 1024 for r in replies)
    assert sum(len(r.blocks) for r in replies) == 8


relay_peers = st.none() | st.builds(RelayPeer, small, st.lists(small, max_size=3).map(tuple))
limits = st.none() | st.builds(RelayLimit, st.integers(0, 2**32 - 1), st.integers(0, 2**63))
statuses = st.none() | st.sampled_from(RelayStatus)


@given(
    st.sampled_from(HopType),
    relay_peers,
    st.none()
    | st.builds(Reservation, st.integers(0, 2**40), st.lists(small, max_size=2).map(tuple), small),
    limits,
    statuses,
)
def test_hop_roundtrip(kind, peer, rsvp, limit, status):
    m = HopMessage(kind, peer, rsvp, limit, status)
    assert HopMessage.decode(m.encode()) == m


@given(st.sampled_from(StopType), relay_peers, limits, statuses)
def test_stop_roundtrip(kind, peer, limit, status):
    m = StopMessage(kind, peer, limit, status)
    assert StopMessage.decode(m.encode()) == m


def test_voucher_checks_issuer_and_signature():
    relay, other = PrivateKey.generate(), PrivateKey.generate()
    relay_id = relay.public_key.peer_id_bytes()
    v = Voucher(relay_id, b"peer", 123)
    assert open_voucher(v.seal(relay), relay_id) == v
    with pytest.raises(EnvelopeError):
        open_voucher(v.seal(other), relay_id)
    with pytest.raises(EnvelopeError):
        open_voucher(v.seal(relay), other.public_key.peer_id_bytes())


def test_dcutr_roles_and_sync_timing():
    b = DcutrCore(DcutrRole.INITIATOR, (b"addr-b",))
    a = DcutrCore(DcutrRole.RESPONDER, (b"addr-a",))
    connect = HolePunch.decode(b.start(10.0).encode())
    assert a.receive(connect, 10.05) is None
    (answer,) = a.data_to_send()
    dial_b = b.receive(HolePunch.decode(answer.encode()), 10.2)
    assert dial_b is not None and dial_b.addrs == (b"addr-a",)
    assert dial_b.when == pytest.approx(10.3) and b.rtt == pytest.approx(0.2)
    (sync,) = b.data_to_send()
    assert sync.type is HolePunchType.SYNC
    assert a.receive(sync, 10.25) == DialAt((b"addr-b",), 10.25)
    assert a.state is b.state is DcutrState.DONE
    with pytest.raises(ProtobufError):
        a.receive(sync, 11.0)


def test_dcutr_refuses_out_of_order_messages():
    a = DcutrCore(DcutrRole.RESPONDER, ())
    with pytest.raises(ProtobufError, match="first message"):
        a.receive(HolePunch(HolePunchType.SYNC), 0.0)
    assert a.state is DcutrState.FAILED
    with pytest.raises(ProtobufError, match="unknown"):
        HolePunch.decode(b"\x08\x05")
