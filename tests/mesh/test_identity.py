"""Peer identity: libp2p test vector, key persistence, signatures and malformed peer IDs."""

import os
import stat

import pytest

from latticaray.mesh.identity import (
    KeyFileError,
    KeyPair,
    PeerId,
    PeerIdError,
    base58btc_decode,
    base58btc_encode,
)

# libp2p peer-ids spec test vector (Ed25519): private key protobuf and public key protobuf
SPEC_PRIVATE_PB = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
    "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PUBLIC_PB = bytes.fromhex(
    "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


def test_libp2p_spec_vector():
    pair = KeyPair.from_libp2p_protobuf(SPEC_PRIVATE_PB)
    assert pair.peer_id.public_key_protobuf == SPEC_PUBLIC_PB
    assert pair.peer_id.to_bytes() == b"\x00\x24" + SPEC_PUBLIC_PB
    assert str(pair.peer_id) == SPEC_PEER_ID
    assert PeerId.from_string(SPEC_PEER_ID) == pair.peer_id
    assert PeerId.from_string(SPEC_PEER_ID).public_key_bytes == SPEC_PUBLIC_PB[4:]


def test_generated_ids_read_like_libp2p_and_round_trip():
    pair = KeyPair.generate()
    text = str(pair.peer_id)
    assert text.startswith("12D3KooW")
    assert PeerId.from_string(text) == pair.peer_id
    assert PeerId.from_bytes(pair.peer_id.to_bytes()) == pair.peer_id
    assert PeerId.from_public_key(pair.public_key_bytes) == pair.peer_id
    assert KeyPair.from_private_bytes(pair.private_bytes()).peer_id == pair.peer_id


def test_sign_verify_and_bad_signatures_return_false():
    pair, other = KeyPair.generate(), KeyPair.generate()
    sig = pair.sign(b"hello")
    assert pair.peer_id.verify(sig, b"hello")
    assert not pair.peer_id.verify(sig, b"hellO")
    assert not other.peer_id.verify(sig, b"hello")
    assert not pair.peer_id.verify(b"short", b"hello")
    assert not pair.peer_id.verify(b"", b"hello")
    assert not pair.peer_id.verify(bytes(64), b"hello")


def test_hash_eq_ordering():
    ids = [KeyPair.generate().peer_id for _ in range(5)]
    assert sorted(ids) == sorted(ids, key=lambda p: p.to_bytes())
    assert len({*ids, *[PeerId.from_bytes(p.to_bytes()) for p in ids]}) == 5
    assert ids[0] != str(ids[0])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("12D3KooW0OIl", "not base58btc"),
        ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wX", "declares"),
        ("S5R7jbB5S625FMckt7C8ANBg4WUubLMvdttMD72yioQY5d", "neither identity"),
        ("1", "too short"),
        ("12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3p", "declares"),
        ("x" * 500, "too long"),
    ],
)
def test_malformed_peer_id_strings(text, fragment):
    with pytest.raises(PeerIdError, match=fragment):
        PeerId.from_string(text)


def test_identity_peer_id_with_a_bad_key_is_refused():
    bad = bytearray(b"\x00\x24" + SPEC_PUBLIC_PB)
    bad[3] = 2  # secp256k1 type over 32 bytes that are no compressed point
    with pytest.raises(PeerIdError, match="SECP256K1"):
        PeerId.from_bytes(bytes(bad))
    bad[3] = 9  # no such key type
    with pytest.raises(PeerIdError, match="key type 9"):
        PeerId.from_bytes(bytes(bad))


def test_sha256_peer_id_is_accepted_and_knows_no_key():
    peer = PeerId.from_string("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
    assert peer.key is None and not peer.is_ed25519
    assert not peer.verify(b"x" * 64, b"data")
    with pytest.raises(PeerIdError, match="not known"):
        _ = peer.public_key_protobuf
    with pytest.raises(PeerIdError, match="not an Ed25519"):
        _ = peer.public_key_bytes


def test_base58_round_trip_with_leading_zeros():
    for data in [b"", b"\x00", b"\x00\x00\x01", os.urandom(40)]:
        assert base58btc_decode(base58btc_encode(data)) == data


def test_key_file_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "sub" / "node.key"
    first = KeyPair.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = KeyPair.load_or_create(path)
    assert again.peer_id == first.peer_id


def test_key_file_with_loose_permissions_is_refused(tmp_path):
    path = tmp_path / "node.key"
    KeyPair.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyPair.load(path)


def test_garbage_key_file_is_refused(tmp_path):
    path = tmp_path / "node.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="not a latticaray"):
        KeyPair.load(path)
    with pytest.raises(KeyFileError):
        KeyPair.from_private_bytes(b"123")


@pytest.mark.parametrize("value", [None, 12, "12D3KooW"])
def test_peer_id_from_non_bytes_is_a_peer_id_error(value):
    with pytest.raises(PeerIdError, match="must be bytes"):
        PeerId.from_bytes(value)


def test_an_identity_peer_id_with_a_malformed_key_protobuf_is_a_peer_id_error():
    """Found by fuzzing (the atom target): a protobuf field overrunning the inline key escaped
    as the libp2p ProtobufError instead of PeerIdError."""
    inline = bytes([0x72, 0x73, 0xA1, 0x6B]) + bytes(32)  # field 14 declares 115 bytes
    with pytest.raises(PeerIdError):
        PeerId.from_bytes(bytes([0x00, len(inline)]) + inline)
    with pytest.raises(PeerIdError):
        PeerId.from_key_protobuf(inline)
