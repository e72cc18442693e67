"""Peer identity: Ed25519 host key pairs and libp2p peer IDs of every key type.

A peer ID is the multihash of the protobuf-encoded public key (``PublicKey{Type, Data}``): the
identity multihash when the encoding is at most 42 bytes (Ed25519, secp256k1), sha2-256 above
(RSA, ECDSA). Our own identity is always Ed25519, so every latticaray peer ID reads
``12D3KooW...`` exactly as libp2p writes it, and its public key can be recovered from the ID
itself. Foreign peers of the other key types are first-class: their :class:`PeerId` carries the
key learned from the handshake (TLS certificate extension, Noise payload), which a sha2-256 ID
cannot give back; one parsed from text or bytes verifies signatures only when its key is inline.
"""

from __future__ import annotations

import os
from functools import total_ordering
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .base58 import base58btc_decode, base58btc_encode
from .errors import MeshError
from .libp2p.errors import ProtobufError
from .libp2p.keys import MAX_INLINE_KEY, KeyType, PublicKey

__all__ = [
    "KeyFileError",
    "KeyPair",
    "PeerId",
    "PeerIdError",
    "base58btc_decode",
    "base58btc_encode",
    "decode_public_key_protobuf",
    "encode_public_key_protobuf",
]

ED25519_KEY_TYPE = 1
ED25519_PUBLIC_KEY_LEN = 32
ED25519_SEED_LEN = 32
_IDENTITY_MULTIHASH = 0x00
_SHA256_MULTIHASH = 0x12
# protobuf field headers: field 1 varint (Type), field 2 length-delimited (Data)
_PB_TYPE_TAG = 0x08
_PB_DATA_TAG = 0x12
_KEY_FILE_MAGIC = b"latticaray-ed25519-v1\n"


class PeerIdError(MeshError, ValueError):
    """A peer ID string or byte form is malformed, or names a key that cannot be used."""


class KeyFileError(MeshError):
    """A key file is unreadable, malformed, or has unsafe permissions."""


def encode_public_key_protobuf(raw_public_key: bytes) -> bytes:
    """The libp2p ``PublicKey`` protobuf of an Ed25519 key (36 bytes)."""
    if len(raw_public_key) != ED25519_PUBLIC_KEY_LEN:
        raise PeerIdError(
            f"an Ed25519 public key is {ED25519_PUBLIC_KEY_LEN} bytes, got {len(raw_public_key)}"
        )
    return bytes([_PB_TYPE_TAG, ED25519_KEY_TYPE, _PB_DATA_TAG, ED25519_PUBLIC_KEY_LEN]) + bytes(
        raw_public_key
    )


def decode_public_key_protobuf(encoded: bytes) -> bytes:
    """Parse a libp2p ``PublicKey`` protobuf and return the raw Ed25519 key.

    Only the canonical encoding is accepted (``08 01 12 20`` + 32 bytes): the peer ID is derived
    from these exact bytes, so a non-canonical encoding would give the same key two peer IDs.
    """
    if len(encoded) < 4 or encoded[0] != _PB_TYPE_TAG:
        raise PeerIdError("public key protobuf does not start with the Type field")
    if encoded[1] != ED25519_KEY_TYPE:
        raise PeerIdError(f"public key type {encoded[1]} is not supported (only Ed25519 = 1)")
    if encoded[2] != _PB_DATA_TAG or encoded[3] != ED25519_PUBLIC_KEY_LEN:
        raise PeerIdError("public key protobuf Data field is not a 32-byte Ed25519 key")
    if len(encoded) != 4 + ED25519_PUBLIC_KEY_LEN:
        raise PeerIdError(
            f"public key protobuf is {len(encoded)} bytes, expected {4 + ED25519_PUBLIC_KEY_LEN}"
        )
    return bytes(encoded[4:])


@total_ordering
class PeerId:
    """The identity of a peer, in libp2p peer-ID form (any libp2p key type).

    Immutable, hashable, ordered by its byte form. ``str(pid)`` is the base58btc form. Equality
    is by the multihash alone: a PeerId that carries its key equals one that does not.
    """

    __slots__ = ("_bytes", "_ed25519", "_key", "_text")

    def __init__(self, multihash: bytes, key: PublicKey | None = None) -> None:
        if not isinstance(multihash, (bytes, bytearray, memoryview)):
            raise PeerIdError(f"peer ID bytes must be bytes, got {type(multihash).__name__}")
        multihash = bytes(multihash)
        if len(multihash) < 2:
            raise PeerIdError(f"peer ID multihash too short ({len(multihash)} bytes)")
        code, length = multihash[0], multihash[1]
        if length != len(multihash) - 2:
            raise PeerIdError(
                f"peer ID multihash declares {length} digest bytes but has {len(multihash) - 2}"
            )
        if code == _IDENTITY_MULTIHASH:
            inline = _inline_key(multihash[2:])
            if key is not None and key != inline:
                raise PeerIdError("the key given does not match the peer ID")
            key = inline
        elif code == _SHA256_MULTIHASH:
            if length != 32:
                raise PeerIdError(f"a sha2-256 peer ID has a 32-byte digest, not {length}")
            if key is not None and key.peer_id_bytes() != multihash:
                raise PeerIdError("the key given does not hash to the peer ID")
        else:
            raise PeerIdError(
                f"peer ID multihash code 0x{code:02x} is neither identity (0x00) nor sha2-256"
            )
        self._bytes = multihash
        self._key = key
        self._text: str | None = None
        self._ed25519: Ed25519PublicKey | None = None

    @classmethod
    def from_public_key(cls, raw_public_key: bytes) -> PeerId:
        """The peer ID of a raw 32-byte Ed25519 public key."""
        encoded = encode_public_key_protobuf(raw_public_key)
        return cls(bytes([_IDENTITY_MULTIHASH, len(encoded)]) + encoded)

    @classmethod
    def from_key(cls, key: PublicKey) -> PeerId:
        """The peer ID of a libp2p public key of any type, carrying the key."""
        return cls(key.peer_id_bytes(), key)

    @classmethod
    def from_key_protobuf(cls, encoded: bytes) -> PeerId:
        """The peer ID of a ``PublicKey`` protobuf (decoded and checked), carrying the key."""
        try:
            key = PublicKey.from_protobuf(bytes(encoded))
        except ProtobufError as exc:  # KeyDecodeError, or the protobuf framing itself
            raise PeerIdError(f"unusable public key: {exc}") from None
        if key.to_protobuf() != bytes(encoded):
            raise PeerIdError("public key protobuf is not in its canonical encoding")
        return cls.from_key(key)

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerId:
        return cls(data)

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        if not isinstance(text, str):
            raise PeerIdError(f"peer ID must be a str, got {type(text).__name__}")
        if not text:
            raise PeerIdError("peer ID string is empty")
        if len(text) > 128:
            raise PeerIdError(f"peer ID string is {len(text)} characters, too long")
        try:
            raw = base58btc_decode(text)
        except ValueError as exc:
            raise PeerIdError(f"malformed peer ID {text!r}: {exc}") from None
        try:
            return cls(raw)
        except PeerIdError as exc:
            raise PeerIdError(f"malformed peer ID {text!r}: {exc}") from None

    def to_bytes(self) -> bytes:
        return self._bytes

    @property
    def key(self) -> PublicKey | None:
        """The peer's public key: always for an identity peer ID, for a sha2-256 one (RSA,
        ECDSA) only when this PeerId came from a handshake that showed the key."""
        return self._key

    @property
    def key_type(self) -> KeyType | None:
        return None if self._key is None else self._key.key_type

    @property
    def is_ed25519(self) -> bool:
        return self._key is not None and self._key.key_type is KeyType.ED25519

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key (:class:`PeerIdError` for other key types)."""
        if not self.is_ed25519:
            raise PeerIdError(f"{self} is not an Ed25519 peer")
        assert self._key is not None
        return self._key.data

    @property
    def public_key_protobuf(self) -> bytes:
        """The ``PublicKey`` protobuf (:class:`PeerIdError` if the key is not known)."""
        if self._key is None:
            raise PeerIdError(f"the public key of {self} is not known (a sha2-256 peer ID)")
        return self._key.to_protobuf()

    def with_key(self, key: PublicKey) -> PeerId:
        """This peer ID carrying ``key`` (checked against the ID)."""
        return self if self._key is not None else PeerId(self._bytes, key)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this peer's signature over ``data``; never raises. False
        when the key is not known (a sha2-256 peer ID parsed from text)."""
        key = self._key
        if key is None:
            return False
        if key.key_type is not KeyType.ED25519:
            return key.verify(bytes(signature), bytes(data))
        try:
            if self._ed25519 is None:
                self._ed25519 = Ed25519PublicKey.from_public_bytes(key.data)
            self._ed25519.verify(bytes(signature), bytes(data))
            return True
        except (InvalidSignature, ValueError, TypeError):
            return False

    def __str__(self) -> str:
        if self._text is None:
            self._text = base58btc_encode(self._bytes)
        return self._text

    def __repr__(self) -> str:
        return f"PeerId({str(self)!r})"

    def short(self) -> str:
        """A short form for logs: the last 8 characters."""
        return "…" + str(self)[-8:]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PeerId):
            return self._bytes == other._bytes
        return NotImplemented

    def __lt__(self, other: object) -> bool:
        if isinstance(other, PeerId):
            return self._bytes < other._bytes
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._bytes)

    def __reduce__(self):
        if self._key is not None and self._bytes[0] == _SHA256_MULTIHASH:
            return (PeerId, (self._bytes, self._key))
        return (PeerId.from_bytes, (self._bytes,))


def _inline_key(encoded: bytes) -> PublicKey:
    """The key of an identity peer ID, which must be a canonical ``PublicKey`` protobuf."""
    if len(encoded) == 4 + ED25519_PUBLIC_KEY_LEN and encoded[:2] == bytes(
        [_PB_TYPE_TAG, ED25519_KEY_TYPE]
    ):
        return PublicKey(KeyType.ED25519, decode_public_key_protobuf(encoded))
    if len(encoded) > MAX_INLINE_KEY:
        raise PeerIdError(f"an identity peer ID holds at most {MAX_INLINE_KEY} key bytes")
    try:
        key = PublicKey.from_protobuf(encoded)
    except ProtobufError as exc:  # KeyDecodeError, or the protobuf framing itself
        raise PeerIdError(f"peer ID key: {exc}") from None
    if key.to_protobuf() != encoded:
        raise PeerIdError("peer ID key protobuf is not in its canonical encoding")
    return key


class KeyPair:
    """An Ed25519 host key pair; the peer's identity."""

    __slots__ = ("_peer_id", "_private", "_public_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self._public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id = PeerId.from_public_key(self._public_bytes)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> KeyPair:
        """From the 32-byte seed, or libp2p's 64-byte seed+public form (checked for consistency)."""
        data = bytes(data)
        if len(data) == 2 * ED25519_SEED_LEN:
            seed, public = data[:ED25519_SEED_LEN], data[ED25519_SEED_LEN:]
            pair = cls(Ed25519PrivateKey.from_private_bytes(seed))
            if pair.public_key_bytes != public:
                raise KeyFileError("64-byte private key: public half does not match the seed")
            return pair
        if len(data) != ED25519_SEED_LEN:
            raise KeyFileError(
                f"an Ed25519 private key is {ED25519_SEED_LEN} bytes (or 64 seed+public), "
                f"got {len(data)}"
            )
        return cls(Ed25519PrivateKey.from_private_bytes(data))

    @classmethod
    def from_libp2p_protobuf(cls, encoded: bytes) -> KeyPair:
        """From a libp2p ``PrivateKey`` protobuf (Type=Ed25519, Data=seed||public)."""
        if len(encoded) != 4 + 64 or encoded[:4] != bytes([0x08, 0x01, 0x12, 0x40]):
            raise KeyFileError("not a libp2p Ed25519 PrivateKey protobuf")
        return cls.from_private_bytes(encoded[4:])

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeyPair:
        path = Path(path)
        try:
            mode = path.stat().st_mode & 0o777
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc}") from None
        if mode & 0o077:
            raise KeyFileError(
                f"key file {path} has mode {mode:o}; it must not be readable by group or others "
                f"(chmod 600)"
            )
        if not data.startswith(_KEY_FILE_MAGIC):
            raise KeyFileError(f"key file {path} is not a latticaray Ed25519 key file")
        body = data[len(_KEY_FILE_MAGIC) :].strip()
        try:
            seed = bytes.fromhex(body.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise KeyFileError(f"key file {path} does not hold a hex-encoded key") from None
        return cls.from_private_bytes(seed)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> KeyPair:
        """Load the key at ``path``, or create one there (mode 0600) if the file does not exist."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        pair = cls.generate()
        pair.save(path)
        return pair

    def save(self, path: str | os.PathLike) -> None:
        """Write the key with mode 0600, atomically (a temp file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, _KEY_FILE_MAGIC + self.private_bytes().hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def private_bytes(self) -> bytes:
        """The 32-byte Ed25519 seed."""
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def private_key(self) -> Ed25519PrivateKey:
        return self._private

    @property
    def public_key_bytes(self) -> bytes:
        return self._public_bytes

    @property
    def peer_id(self) -> PeerId:
        return self._peer_id

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(bytes(data))

    def __repr__(self) -> str:
        return f"KeyPair(peer_id={self._peer_id})"
