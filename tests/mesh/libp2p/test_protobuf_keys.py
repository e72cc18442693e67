"""The protobuf wire codec, length-prefixed framing, libp2p key types and peer IDs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.libp2p.errors import KeyDecodeError, MessageTooLarge, ProtobufError
from latticaray.mesh.libp2p.keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    peer_id_from_text,
    peer_id_to_text,
)
from latticaray.mesh.libp2p.protobuf import (
    LengthPrefixedDecoder,
    Writer,
    decode_uvarint,
    encode_length_prefixed,
    encode_uvarint,
    parse_fields,
)


@given(st.integers(0, 2**64 - 1))
def test_uvarint_roundtrip(value):
    encoded = encode_uvarint(value)
    assert decode_uvarint(encoded) == (value, len(encoded))


def test_uvarint_bounds():
    with pytest.raises(ProtobufError):
        encode_uvarint(2**64)
    with pytest.raises(ProtobufError):
        decode_uvarint(b"\xff" * 10 + b"\x01")
    with pytest.raises(ProtobufError, match="truncated"):
        decode_uvarint(b"\x80\x80")
    with pytest.raises(ProtobufError, match="64 bits"):
        decode_uvarint(b"\xff" * 9 + b"\x7f")


@given(
    st.integers(0, 2**64 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.binary(max_size=300),
    st.text(max_size=50),
    st.lists(st.binary(max_size=20), max_size=5),
)
def test_writer_and_fields_roundtrip(u, i, b, s, rep):
    data = (
        Writer()
        .uint(1, u, always=True)
        .int32(2, i, always=True)
        .bytes_(3, b, always=True)
        .string(4, s, always=True)
        .repeated_bytes(5, rep)
        .finish()
    )
    f = parse_fields(data)
    assert f.uint(1) == u
    assert f.int32(2) == i
    assert f.bytes_(3, max_len=300) == b
    assert f.string(4, max_len=200) == s
    assert f.repeated_bytes(5, max_len=20, max_count=5) == rep


def test_field_getters_enforce_bounds_and_types():
    data = Writer().bytes_(1, b"x" * 10).uint(2, 5).finish()
    f = parse_fields(data)
    with pytest.raises(ProtobufError, match="limit"):
        f.bytes_(1, max_len=9)
    with pytest.raises(ProtobufError, match="wire type"):
        f.uint(1)
    with pytest.raises(ProtobufError, match="exceeds"):
        f.uint(2, maximum=4)
    with pytest.raises(ProtobufError, match="fields"):
        parse_fields(Writer().uint(1, 1).uint(2, 1).uint(3, 1).finish(), max_fields=2)
    with pytest.raises(ProtobufError, match="wire type 3"):
        parse_fields(b"\x0b")  # a group start: not used by libp2p
    with pytest.raises(ProtobufError, match="remain"):
        parse_fields(b"\x0a\x05abc")


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_parse_fields_fuzz_raises_only_protobuf_error(data):
    try:
        f = parse_fields(data)
    except ProtobufError:
        return
    for n in range(1, 6):
        try:
            f.bytes_(n, max_len=100)
            f.repeated_string(n, max_len=100, max_count=100)
        except ProtobufError:
            pass


@given(st.lists(st.binary(max_size=300), max_size=6), st.integers(1, 50))
def test_length_prefixed_decoder_any_chunking(messages, chunk):
    stream = b"".join(encode_length_prefixed(m) for m in messages)
    dec = LengthPrefixedDecoder(300)
    out = []
    for i in range(0, len(stream), chunk):
        out += dec.feed(stream[i : i + chunk])
    assert out == messages and dec.buffered == 0


def test_length_prefixed_decoder_refuses_oversize_before_buffering():
    dec = LengthPrefixedDecoder(100)
    with pytest.raises(MessageTooLarge):
        dec.feed(encode_length_prefixed(b"x" * 101)[:3])


@pytest.mark.parametrize(
    ("key_type", "prefix"),
    [
        (KeyType.ED25519, "12D3KooW"),
        (KeyType.SECP256K1, "16Uiu2HA"),
        (KeyType.RSA, "Qm"),
        (KeyType.ECDSA, "Qm"),
    ],
)
def test_every_key_type_signs_verifies_and_names_its_peer(key_type, prefix):
    key = PrivateKey.generate(key_type)
    pub = key.public_key
    assert pub.peer_id_text().startswith(prefix)
    assert PublicKey.from_protobuf(pub.to_protobuf()) == pub
    sig = key.sign(b"message")
    assert pub.verify(sig, b"message")
    assert not pub.verify(sig, b"other message")
    assert not pub.verify(b"\x00" * len(sig), b"message")
    assert peer_id_from_text(pub.peer_id_text()) == pub.peer_id_bytes()
    assert peer_id_to_text(pub.peer_id_bytes()) == pub.peer_id_text()
    # the mesh's PeerId of every key type, carrying the key, verifying its signatures
    from latticaray.mesh.identity import PeerId

    peer = PeerId.from_key(pub)
    assert peer.to_bytes() == pub.peer_id_bytes() and str(peer) == pub.peer_id_text()
    assert peer.key == pub and peer.key_type is key_type
    assert peer.verify(sig, b"message") and not peer.verify(sig, b"other message")
    parsed = PeerId.from_string(pub.peer_id_text())
    assert parsed == peer and hash(parsed) == hash(peer)
    # an identity peer ID carries its key inline; a sha2-256 one (RSA, ECDSA) does not
    inline = key_type in (KeyType.ED25519, KeyType.SECP256K1)
    assert (parsed.key == pub) if inline else parsed.key is None
    assert parsed.verify(sig, b"message") == inline
    assert PeerId.from_key_protobuf(pub.to_protobuf()) == peer


def test_ed25519_peer_id_matches_the_mesh_identity():
    from latticaray.mesh.identity import KeyPair, PeerId

    pair = KeyPair.generate()
    key = PrivateKey.from_keypair(pair)
    assert key.public_key.peer_id_bytes() == pair.peer_id.to_bytes()
    assert PeerId.from_key(key.public_key) == pair.peer_id


def test_public_key_decode_errors():
    with pytest.raises(KeyDecodeError, match="unknown"):
        PublicKey.from_protobuf(Writer().uint(1, 9, always=True).bytes_(2, b"x").finish())
    with pytest.raises(KeyDecodeError, match="32 bytes"):
        PublicKey.from_protobuf(Writer().uint(1, 1).bytes_(2, b"x" * 31).finish())
    with pytest.raises(KeyDecodeError, match="lacks"):
        PublicKey.from_protobuf(Writer().uint(1, 1).finish())
    with pytest.raises(KeyDecodeError, match="SECP256K1"):
        PublicKey.from_protobuf(Writer().uint(1, 2).bytes_(2, b"\x02" + b"\xff" * 32).finish())
    with pytest.raises(KeyDecodeError):
        PublicKey.from_protobuf(Writer().uint(1, 0, always=True).bytes_(2, b"not der").finish())
    with pytest.raises(KeyDecodeError, match="limit"):
        PublicKey.from_protobuf(b"\x00" * 5000)
    with pytest.raises(KeyDecodeError):
        peer_id_from_text("not-base58!")


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_public_key_decode_fuzz(data):
    try:
        PublicKey.from_protobuf(data)
    except ProtobufError:
        pass
