"""Noise XX core with libp2p's identity payload: every key type, tampering, peer checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.errors import HandshakeError, PeerIdMismatch
from latticaray.mesh.libp2p.keys import KeyType, PrivateKey
from latticaray.mesh.libp2p.noise import (
    MAX_PLAINTEXT,
    NoiseCore,
    NoiseData,
    NoiseHandshakeDone,
    NoiseHandshakePayload,
    NoiseRole,
    NoiseState,
)

INI, RES = NoiseRole.INITIATOR, NoiseRole.RESPONDER


def _handshake(ini: NoiseCore, res: NoiseCore, *, tamper=None):
    m1 = ini.initiate()
    res.initiate()
    res.receive(m1)
    m2 = res.data_to_send()
    if tamper is not None:
        m2 = tamper(m2)
    done_i = ini.receive(m2)
    done_r = res.receive(ini.data_to_send())
    return done_i, done_r


@pytest.mark.parametrize("key_type", list(KeyType))
def test_handshake_with_every_key_type(key_type):
    a, b = PrivateKey.generate(), PrivateKey.generate(key_type)
    ini = NoiseCore(INI, a, expected_peer_id=b.public_key.peer_id_bytes())
    res = NoiseCore(RES, b)
    done_i, done_r = _handshake(ini, res)
    assert done_i == [NoiseHandshakeDone(b.public_key, b.public_key.peer_id_bytes())]
    assert done_r == [NoiseHandshakeDone(a.public_key, a.public_key.peer_id_bytes())]
    assert ini.state is res.state is NoiseState.TRANSPORT


def test_transport_both_directions_large_and_chunked():
    ini, res = NoiseCore(INI, PrivateKey.generate()), NoiseCore(RES, PrivateKey.generate())
    _handshake(ini, res)
    payload = bytes(range(256)) * 1000  # 256 KB: several frames
    wire = ini.encrypt(payload)
    got = bytearray()
    for k in range(0, len(wire), 7777):
        for event in res.receive(wire[k : k + 7777]):
            assert isinstance(event, NoiseData)
            assert len(event.data) <= MAX_PLAINTEXT
            got += event.data
    assert bytes(got) == payload
    back = res.encrypt(b"pong")
    assert ini.receive(back) == [NoiseData(b"pong")]


def test_dialing_the_wrong_peer_fails():
    a, b, c = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    ini = NoiseCore(INI, a, expected_peer_id=c.public_key.peer_id_bytes())
    with pytest.raises(PeerIdMismatch):
        _handshake(ini, NoiseCore(RES, b))
    assert ini.state is NoiseState.FAILED


def test_tampered_handshake_fails_authentication():
    ini, res = NoiseCore(INI, PrivateKey.generate()), NoiseCore(RES, PrivateKey.generate())

    def flip(m2: bytes) -> bytes:
        return m2[:-1] + bytes([m2[-1] ^ 1])

    with pytest.raises(HandshakeError, match="authentication"):
        _handshake(ini, res, tamper=flip)


class _LyingKey(PrivateKey):
    """Signs with one key but claims another's public key in the payload."""

    def __init__(self, signer: PrivateKey, claimed: PrivateKey) -> None:
        self._signer = signer
        self.public_key = claimed.public_key

    def sign(self, message: bytes) -> bytes:
        return self._signer.sign(message)


def test_signature_by_another_key_is_refused():
    liar = _LyingKey(PrivateKey.generate(), PrivateKey.generate())
    ini, res = NoiseCore(INI, PrivateKey.generate()), NoiseCore(RES, liar)
    with pytest.raises(HandshakeError, match="signature"):
        _handshake(ini, res)


def test_tampered_transport_frame_is_refused():
    ini, res = NoiseCore(INI, PrivateKey.generate()), NoiseCore(RES, PrivateKey.generate())
    _handshake(ini, res)
    wire = bytearray(ini.encrypt(b"secret"))
    wire[5] ^= 0x40
    with pytest.raises(HandshakeError):
        res.receive(bytes(wire))


def test_payload_codec_roundtrip_with_extensions():
    p = NoiseHandshakePayload(b"key", b"sig", ("/yamux/1.0.0",), (b"\x12\x20" + b"h" * 32,))
    assert NoiseHandshakePayload.decode(p.encode()) == p


def test_short_handshake_messages_are_refused():
    res = NoiseCore(RES, PrivateKey.generate())
    res.initiate()
    with pytest.raises(HandshakeError, match="shorter"):
        res.receive(b"\x00\x05hello")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_initiator_raises_only_handshake_errors(data):
    ini = NoiseCore(INI, PrivateKey.generate())
    ini.initiate()
    try:
        ini.receive(data)
    except HandshakeError:
        pass
