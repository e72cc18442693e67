"""libp2p public and private keys of every key type, their protobuf form, and peer IDs.

libp2p writes a public key as ``PublicKey{Type, Data}`` (proto2, both fields always present):
RSA (0, DER SubjectPublicKeyInfo; PKCS#1 v1.5 SHA-256 signatures), Ed25519 (1, 32 raw bytes),
secp256k1 (2, 33-byte compressed point; DER ECDSA over SHA-256) and ECDSA (3, DER
SubjectPublicKeyInfo; DER ECDSA over SHA-256). A peer ID is the multihash of that protobuf:
identity when it is at most 42 bytes (Ed25519, secp256k1), sha2-256 otherwise (RSA, ECDSA).

latticaray's own identity stays Ed25519 (:class:`latticaray.mesh.identity.KeyPair`); the other
types exist here so foreign peers holding them can be verified (and, in tests, impersonated).
:class:`latticaray.mesh.identity.PeerId` is built on :class:`PublicKey` (this module imports
nothing of the mesh but its base58 and protobuf helpers).
Every primitive is the ``cryptography`` package's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ..base58 import base58btc_decode, base58btc_encode
from .errors import KeyDecodeError, UnsupportedKeyType
from .protobuf import Writer, parse_fields

__all__ = [
    "MAX_INLINE_KEY",
    "MAX_PUBLIC_KEY_PROTOBUF",
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "peer_id_from_text",
    "peer_id_to_text",
]

#: The largest PublicKey protobuf accepted (an 8192-bit RSA key is about 1.1 KB).
MAX_PUBLIC_KEY_PROTOBUF = 2048
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
#: The longest key protobuf an identity-multihash peer ID holds.
MAX_INLINE_KEY = 42
_IDENTITY = 0x00
_SHA2_256 = 0x12
_ED25519_LEN = 32


class KeyType(IntEnum):
    RSA = 0
    ED25519 = 1
    SECP256K1 = 2
    ECDSA = 3


_VerifyKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _load(key_type: KeyType, data: bytes) -> _VerifyKey:
    try:
        if key_type is KeyType.ED25519:
            if len(data) != _ED25519_LEN:
                raise KeyDecodeError(f"an Ed25519 key is 32 bytes, got {len(data)}")
            return ed25519.Ed25519PublicKey.from_public_bytes(data)
        if key_type is KeyType.SECP256K1:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), data)
        loaded = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyDecodeError(f"bad {key_type.name} public key: {exc}") from None
    if key_type is KeyType.RSA:
        if not isinstance(loaded, rsa.RSAPublicKey):
            raise KeyDecodeError("an RSA key's DER does not hold an RSA key")
        if not MIN_RSA_BITS <= loaded.key_size <= MAX_RSA_BITS:
            raise KeyDecodeError(
                f"RSA key of {loaded.key_size} bits is outside {MIN_RSA_BITS}-{MAX_RSA_BITS}"
            )
        return loaded
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise KeyDecodeError("an ECDSA key's DER does not hold an elliptic-curve key")
    return loaded


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A libp2p public key: its type and key bytes as the protobuf carries them."""

    key_type: KeyType
    data: bytes

    @classmethod
    def from_protobuf(cls, encoded: bytes) -> PublicKey:
        """Decode and check a ``PublicKey`` protobuf (the key material must load)."""
        if len(encoded) > MAX_PUBLIC_KEY_PROTOBUF:
            raise KeyDecodeError(
                f"public key protobuf is {len(encoded)} bytes, limit {MAX_PUBLIC_KEY_PROTOBUF}"
            )
        fields = parse_fields(encoded, max_fields=8)
        if not fields.has(1) or not fields.has(2):
            raise KeyDecodeError("public key protobuf lacks its Type or Data field")
        raw_type = fields.uint(1)
        try:
            key_type = KeyType(raw_type)
        except ValueError:
            raise UnsupportedKeyType(f"unknown libp2p key type {raw_type}") from None
        key = cls(key_type, fields.bytes_(2, max_len=MAX_PUBLIC_KEY_PROTOBUF))
        _load(key.key_type, key.data)
        return key

    @classmethod
    def from_ed25519(cls, raw: bytes) -> PublicKey:
        return cls(KeyType.ED25519, bytes(raw))

    def to_protobuf(self) -> bytes:
        """The canonical encoding peer IDs are computed from (Type always written)."""
        return Writer().uint(1, int(self.key_type), always=True).bytes_(2, self.data).finish()

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if ``signature`` is this key's libp2p signature over ``message``; never raises."""
        try:
            key = _load(self.key_type, self.data)
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, message)
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            else:
                key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, KeyDecodeError, ValueError, TypeError):
            return False

    def peer_id_bytes(self) -> bytes:
        """The peer ID multihash: identity of the protobuf if short, else its sha2-256."""
        encoded = self.to_protobuf()
        if len(encoded) <= MAX_INLINE_KEY:
            return bytes([_IDENTITY, len(encoded)]) + encoded
        return bytes([_SHA2_256, 32]) + hashlib.sha256(encoded).digest()

    def peer_id_text(self) -> str:
        return base58btc_encode(self.peer_id_bytes())


def peer_id_to_text(peer_id: bytes) -> str:
    return base58btc_encode(peer_id)


def peer_id_from_text(text: str) -> bytes:
    """The multihash bytes of a base58btc peer ID of any key type (checked for shape only)."""
    if not text or len(text) > 128:
        raise KeyDecodeError(f"peer ID string of {len(text)} characters")
    try:
        raw = base58btc_decode(text)
    except ValueError as exc:
        raise KeyDecodeError(f"malformed peer ID {text!r}: {exc}") from None
    if len(raw) < 2 or raw[0] not in (_IDENTITY, _SHA2_256) or raw[1] != len(raw) - 2:
        raise KeyDecodeError(f"peer ID {text!r} is not an identity or sha2-256 multihash")
    return raw


class _HasEd25519Key(Protocol):
    @property
    def private_key(self) -> ed25519.Ed25519PrivateKey: ...


_SignKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class PrivateKey:
    """A signing key of any libp2p key type, with its :class:`PublicKey`."""

    __slots__ = ("_key", "public_key")

    def __init__(self, key: _SignKey) -> None:
        self._key = key
        self.public_key = _public_of(key)

    @classmethod
    def from_keypair(cls, pair: _HasEd25519Key) -> PrivateKey:
        """The mesh's own Ed25519 identity (a :class:`~latticaray.mesh.identity.KeyPair`) as a
        libp2p signing key."""
        return cls(pair.private_key)

    @classmethod
    def generate(cls, key_type: KeyType = KeyType.ED25519) -> PrivateKey:
        if key_type is KeyType.ED25519:
            return cls(ed25519.Ed25519PrivateKey.generate())
        if key_type is KeyType.RSA:
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS))
        curve: ec.EllipticCurve = (
            ec.SECP256K1() if key_type is KeyType.SECP256K1 else ec.SECP256R1()
        )
        key = ec.generate_private_key(curve)
        if key_type is KeyType.ECDSA:
            return cls(key)
        return _Secp256k1(key)

    def sign(self, message: bytes) -> bytes:
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(message)
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        return key.sign(message, ec.ECDSA(hashes.SHA256()))


class _Secp256k1(PrivateKey):
    """A secp256k1 key: its public key is the compressed point, not a DER document."""

    __slots__ = ()

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(key)
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        self.public_key = PublicKey(KeyType.SECP256K1, point)


def _public_of(key: _SignKey) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(KeyType.ED25519, raw)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PublicKey(KeyType.RSA if isinstance(key, rsa.RSAPrivateKey) else KeyType.ECDSA, der)
