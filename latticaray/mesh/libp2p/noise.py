"""Noise XX (``Noise_XX_25519_ChaChaPoly_SHA256``) with libp2p's identity payload, sans-I/O.

The libp2p secure channel ``/noise``: a three-message XX handshake (``-> e``; ``<- e, ee, s,
es``; ``-> s, se``) with an empty prologue, every message framed as ``uint16_be(len) || msg``.
The responder's second and the initiator's third message carry a ``NoiseHandshakePayload``
protobuf: the peer's libp2p identity key and its signature over
``"noise-libp2p-static-key:" || static X25519 key``, which binds the Noise static key to the
peer ID. After the handshake every frame is one ChaCha20-Poly1305 ciphertext of at most 65535
bytes (65519 of plaintext), with the split's two keys, one per direction.

Primitives come from ``cryptography`` (X25519, ChaCha20Poly1305, HKDF-SHA256, SHA-256);
nothing here implements a primitive. :class:`NoiseCore` is fed received bytes and returns
events; :class:`NoiseHandshakeDone` names the verified remote key and peer ID.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import HandshakeError, PeerIdMismatch, ProtocolViolation
from .errors import KeyDecodeError, Libp2pHandshakeError, ProtobufError
from .keys import PrivateKey, PublicKey, peer_id_to_text
from .protobuf import Writer, parse_fields

__all__ = [
    "MAX_FRAME",
    "MAX_PLAINTEXT",
    "NOISE_PROTOCOL",
    "NoiseCore",
    "NoiseData",
    "NoiseHandshakeDone",
    "NoiseHandshakePayload",
    "NoiseRole",
    "NoiseState",
]

NOISE_PROTOCOL = "/noise"
PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
SIGNATURE_PREFIX = b"noise-libp2p-static-key:"
MAX_FRAME = 65535
TAG_LEN = 16
MAX_PLAINTEXT = MAX_FRAME - TAG_LEN
DH_LEN = 32
_MAX_NONCE = (1 << 64) - 1
_MAX_SIGNATURE = 1024
_MAX_EXTENSION_ITEMS = 16
_MAX_EXTENSION_ITEM = 256


@dataclass(frozen=True, slots=True)
class NoiseHandshakePayload:
    """libp2p's Noise handshake payload: identity key, signature, extensions."""

    identity_key: bytes
    identity_sig: bytes
    stream_muxers: tuple[str, ...] = ()
    webtransport_certhashes: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        writer = Writer().bytes_(1, self.identity_key).bytes_(2, self.identity_sig)
        if self.stream_muxers or self.webtransport_certhashes:
            ext = (
                Writer()
                .repeated_bytes(1, self.webtransport_certhashes)
                .repeated_string(2, self.stream_muxers)
                .finish()
            )
            writer.bytes_(4, ext, always=True)
        return writer.finish()

    @classmethod
    def decode(cls, data: bytes) -> NoiseHandshakePayload:
        fields = parse_fields(data, max_fields=64)
        ext = parse_fields(fields.bytes_(4, max_len=8192), max_fields=64)
        return cls(
            identity_key=fields.bytes_(1, max_len=4096),
            identity_sig=fields.bytes_(2, max_len=_MAX_SIGNATURE),
            stream_muxers=tuple(
                ext.repeated_string(2, max_len=_MAX_EXTENSION_ITEM, max_count=_MAX_EXTENSION_ITEMS)
            ),
            webtransport_certhashes=tuple(
                ext.repeated_bytes(1, max_len=_MAX_EXTENSION_ITEM, max_count=_MAX_EXTENSION_ITEMS)
            ),
        )


@dataclass(frozen=True, slots=True)
class NoiseHandshakeDone:
    """The handshake finished and the remote proved ``remote_key`` (so ``remote_peer_id``)."""

    remote_key: PublicKey
    remote_peer_id: bytes
    remote_stream_muxers: tuple[str, ...] = ()

    @property
    def remote_peer_text(self) -> str:
        return peer_id_to_text(self.remote_peer_id)


@dataclass(frozen=True, slots=True)
class NoiseData:
    """Decrypted application bytes."""

    data: bytes


NoiseEvent = NoiseHandshakeDone | NoiseData


class NoiseRole(Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class NoiseState(Enum):
    START = "start"
    SENT_E = "sent-e"  # initiator, awaiting message 2
    AWAIT_E = "await-e"  # responder, awaiting message 1
    SENT_E_S = "sent-e-s"  # responder, awaiting message 3
    TRANSPORT = "transport"
    FAILED = "failed"


_TRANSITIONS: dict[NoiseState, frozenset[NoiseState]] = {
    NoiseState.START: frozenset({NoiseState.SENT_E, NoiseState.AWAIT_E, NoiseState.FAILED}),
    NoiseState.SENT_E: frozenset({NoiseState.TRANSPORT, NoiseState.FAILED}),
    NoiseState.AWAIT_E: frozenset({NoiseState.SENT_E_S, NoiseState.FAILED}),
    NoiseState.SENT_E_S: frozenset({NoiseState.TRANSPORT, NoiseState.FAILED}),
    NoiseState.TRANSPORT: frozenset({NoiseState.FAILED}),
    NoiseState.FAILED: frozenset(),
}


class _CipherState:
    """Noise CipherState: a key and a 64-bit counter nonce."""

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def _nonce(self) -> bytes:
        if self.n >= _MAX_NONCE:
            raise Libp2pHandshakeError("Noise nonce exhausted; the connection must be rekeyed")
        nonce = b"\x00\x00\x00\x00" + self.n.to_bytes(8, "little")
        self.n += 1
        return nonce

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        return self._aead.encrypt(self._nonce(), plaintext, ad)

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        try:
            return self._aead.decrypt(self._nonce(), ciphertext, ad)
        except InvalidTag:
            raise Libp2pHandshakeError("Noise message failed authentication") from None


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    out = HKDF(algorithm=hashes.SHA256(), length=64, salt=chaining_key, info=b"").derive(ikm)
    return out[:32], out[32:]


@dataclass(slots=True)
class _SymmetricState:
    ck: bytes = PROTOCOL_NAME  # the name is exactly HASHLEN bytes, so h = ck = name
    h: bytes = PROTOCOL_NAME
    cipher: _CipherState = field(default_factory=_CipherState)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, key = _hkdf2(self.ck, ikm)
        self.cipher = _CipherState(key)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[_CipherState, _CipherState]:
        k1, k2 = _hkdf2(self.ck, b"")
        return _CipherState(k1), _CipherState(k2)


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public_raw: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public_raw))
    except ValueError as exc:
        raise Libp2pHandshakeError(f"Noise DH failed: {exc}") from None


class NoiseCore:
    """One side of a libp2p Noise XX session: the handshake, then framed transport encryption.

    ``identity`` signs our static key; ``expected_peer_id`` (initiator: the peer dialed) makes
    the handshake fail with :class:`PeerIdMismatch` if the remote proves another identity.
    Feed bytes read from the connection to :meth:`receive`; send :meth:`data_to_send` after
    every call. Once :class:`NoiseHandshakeDone` was returned, :meth:`encrypt` frames outgoing
    application bytes and :meth:`receive` returns :class:`NoiseData`.
    """

    __slots__ = (
        "_buf",
        "_e",
        "_expected",
        "_identity",
        "_muxers",
        "_out",
        "_re",
        "_recv",
        "_s",
        "_send",
        "_state",
        "_sym",
        "remote",
        "role",
    )

    def __init__(
        self,
        role: NoiseRole,
        identity: PrivateKey,
        *,
        expected_peer_id: bytes | None = None,
        stream_muxers: Sequence[str] = (),
    ) -> None:
        self.role = role
        self._identity = identity
        self._expected = expected_peer_id
        self._muxers = tuple(stream_muxers)
        self._state = NoiseState.START
        self._sym = _SymmetricState()
        self._sym.mix_hash(b"")  # empty prologue
        self._s = X25519PrivateKey.generate()
        self._e = X25519PrivateKey.generate()
        self._re = b""
        self._buf = bytearray()
        self._out = bytearray()
        self._send = _CipherState()
        self._recv = _CipherState()
        self.remote: NoiseHandshakeDone | None = None

    @property
    def state(self) -> NoiseState:
        return self._state

    def _to(self, state: NoiseState) -> None:
        if state not in _TRANSITIONS[self._state]:
            raise Libp2pHandshakeError(f"Noise: no transition {self._state.value} -> {state.value}")
        self._state = state

    def _frame(self, message: bytes) -> None:
        if len(message) > MAX_FRAME:
            raise Libp2pHandshakeError(f"Noise message of {len(message)} bytes exceeds {MAX_FRAME}")
        self._out += len(message).to_bytes(2, "big") + message

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def initiate(self) -> bytes:
        """Start the handshake: the initiator's first message; nothing for the responder."""
        if self.role is NoiseRole.INITIATOR:
            e_pub = _raw(self._e.public_key())
            self._sym.mix_hash(e_pub)
            self._frame(e_pub + self._sym.encrypt_and_hash(b""))
            self._to(NoiseState.SENT_E)
        else:
            self._to(NoiseState.AWAIT_E)
        return self.data_to_send()

    def _payload(self) -> bytes:
        s_pub = _raw(self._s.public_key())
        return NoiseHandshakePayload(
            identity_key=self._identity.public_key.to_protobuf(),
            identity_sig=self._identity.sign(SIGNATURE_PREFIX + s_pub),
            stream_muxers=self._muxers,
        ).encode()

    def _verify(self, payload_bytes: bytes, remote_static: bytes) -> NoiseHandshakeDone:
        try:
            payload = NoiseHandshakePayload.decode(payload_bytes)
            key = PublicKey.from_protobuf(payload.identity_key)
        except (ProtobufError, KeyDecodeError) as exc:
            raise Libp2pHandshakeError(f"bad Noise handshake payload: {exc}") from None
        if not key.verify(payload.identity_sig, SIGNATURE_PREFIX + remote_static):
            raise Libp2pHandshakeError("the remote's signature over its Noise static key is bad")
        peer_id = key.peer_id_bytes()
        if self._expected is not None and peer_id != self._expected:
            raise PeerIdMismatch(peer_id_to_text(self._expected), peer_id_to_text(peer_id))
        return NoiseHandshakeDone(key, peer_id, payload.stream_muxers)

    def encrypt(self, data: bytes) -> bytes:
        """Frame and encrypt application bytes (split into frames of at most 65519 bytes)."""
        if self._state is not NoiseState.TRANSPORT:
            raise Libp2pHandshakeError(f"Noise is {self._state.value}, not ready for data")
        view = memoryview(data)
        for start in range(0, len(view), MAX_PLAINTEXT):
            self._frame(self._send.encrypt(b"", bytes(view[start : start + MAX_PLAINTEXT])))
        return self.data_to_send()

    def receive(self, data: bytes) -> list[NoiseEvent]:
        if self._state in (NoiseState.FAILED, NoiseState.START):
            raise Libp2pHandshakeError(f"Noise is {self._state.value}; cannot receive")
        self._buf += data
        events: list[NoiseEvent] = []
        try:
            while len(self._buf) >= 2:
                length = int.from_bytes(self._buf[:2], "big")
                if len(self._buf) < 2 + length:
                    break
                message = bytes(self._buf[2 : 2 + length])
                del self._buf[: 2 + length]
                event = self._on_message(message)
                if event is not None:
                    events.append(event)
        except (HandshakeError, ProtocolViolation):
            self._state = NoiseState.FAILED
            raise
        return events

    def _on_message(self, message: bytes) -> NoiseEvent | None:
        state = self._state
        if state is NoiseState.TRANSPORT:
            return NoiseData(self._recv.decrypt(b"", message))
        if state is NoiseState.AWAIT_E:
            self._on_message1(message)
            return None
        if state is NoiseState.SENT_E:
            return self._on_message2(message)
        if state is NoiseState.SENT_E_S:
            return self._on_message3(message)
        raise Libp2pHandshakeError(f"Noise message in state {state.value}")

    def _on_message1(self, message: bytes) -> None:
        # responder reads "-> e", writes "<- e, ee, s, es" + payload
        if len(message) < DH_LEN:
            raise Libp2pHandshakeError("Noise message 1 is shorter than an ephemeral key")
        self._re = message[:DH_LEN]
        self._sym.mix_hash(self._re)
        self._sym.decrypt_and_hash(message[DH_LEN:])
        e_pub = _raw(self._e.public_key())
        self._sym.mix_hash(e_pub)
        self._sym.mix_key(_dh(self._e, self._re))
        s_enc = self._sym.encrypt_and_hash(_raw(self._s.public_key()))
        self._sym.mix_key(_dh(self._s, self._re))
        payload = self._sym.encrypt_and_hash(self._payload())
        self._frame(e_pub + s_enc + payload)
        self._to(NoiseState.SENT_E_S)

    def _on_message2(self, message: bytes) -> NoiseHandshakeDone:
        # initiator reads "<- e, ee, s, es" + payload, writes "-> s, se" + payload
        if len(message) < DH_LEN + DH_LEN + TAG_LEN + TAG_LEN:
            raise Libp2pHandshakeError("Noise message 2 is too short")
        self._re = message[:DH_LEN]
        self._sym.mix_hash(self._re)
        self._sym.mix_key(_dh(self._e, self._re))
        rs = self._sym.decrypt_and_hash(message[DH_LEN : 2 * DH_LEN + TAG_LEN])
        self._sym.mix_key(_dh(self._e, rs))
        remote_payload = self._sym.decrypt_and_hash(message[2 * DH_LEN + TAG_LEN :])
        done = self._verify(remote_payload, rs)
        s_enc = self._sym.encrypt_and_hash(_raw(self._s.public_key()))
        self._sym.mix_key(_dh(self._s, self._re))
        payload = self._sym.encrypt_and_hash(self._payload())
        self._frame(s_enc + payload)
        self._send, self._recv = self._sym.split()
        self._finish(done)
        return done

    def _on_message3(self, message: bytes) -> NoiseHandshakeDone:
        # responder reads "-> s, se" + payload
        if len(message) < DH_LEN + TAG_LEN + TAG_LEN:
            raise Libp2pHandshakeError("Noise message 3 is too short")
        rs = self._sym.decrypt_and_hash(message[: DH_LEN + TAG_LEN])
        self._sym.mix_key(_dh(self._e, rs))
        remote_payload = self._sym.decrypt_and_hash(message[DH_LEN + TAG_LEN :])
        done = self._verify(remote_payload, rs)
        self._recv, self._send = self._sym.split()
        self._finish(done)
        return done

    def _finish(self, done: NoiseHandshakeDone) -> None:
        self.remote = done
        self._to(NoiseState.TRANSPORT)
        # the ephemeral and the handshake hash are no longer needed
        self._sym = _SymmetricState()
