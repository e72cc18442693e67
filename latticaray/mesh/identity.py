"""Peer identity: Ed25519 host key pairs and libp2p-style peer IDs.

A peer ID is the identity multihash of the protobuf-encoded public key
(``PublicKey{Type=Ed25519, Data=<32 raw bytes>}``), written in base58btc, so every Ed25519 peer ID
reads ``12D3KooW...`` exactly as libp2p writes it. Because the multihash is the identity function,
the public key can be recovered from the peer ID itself, so anyone holding a peer ID can verify
that peer's signatures without any lookup.
"""

from __future__ import annotations

import os
from functools import total_ordering
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import MeshError

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
    """A peer ID string or byte form is malformed or not an Ed25519 identity peer ID."""


class KeyFileError(MeshError):
    """A key file is unreadable, malformed, or has unsafe permissions."""


_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def base58btc_encode(data: bytes) -> str:
    """Encode bytes in the Bitcoin base58 alphabet (leading zero bytes become ``1``)."""
    zeros = len(data) - len(data.lstrip(b"\x00"))
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, rem = divmod(number, 58)
        digits.append(_B58_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(digits))


def base58btc_decode(text: str) -> bytes:
    """Decode base58btc; raises ``ValueError`` naming the first character outside the alphabet."""
    number = 0
    for position, char in enumerate(text):
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise ValueError(f"character {char!r} at position {position} is not base58btc")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * zeros + body


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
    """The identity of a peer: an Ed25519 public key, in libp2p peer-ID form.

    Immutable, hashable, ordered by its byte form. ``str(pid)`` is the base58btc form.
    """

    __slots__ = ("_bytes", "_public_key", "_public_key_bytes", "_text")

    def __init__(self, multihash: bytes) -> None:
        if not isinstance(multihash, (bytes, bytearray, memoryview)):
            raise PeerIdError(f"peer ID bytes must be bytes, got {type(multihash).__name__}")
        multihash = bytes(multihash)
        if len(multihash) < 2:
            raise PeerIdError(f"peer ID multihash too short ({len(multihash)} bytes)")
        code, length = multihash[0], multihash[1]
        if code == _SHA256_MULTIHASH:
            raise PeerIdError(
                "peer ID is a sha2-256 multihash (RSA/large key); only Ed25519 identity peer IDs "
                "are supported"
            )
        if code != _IDENTITY_MULTIHASH:
            raise PeerIdError(f"peer ID multihash code 0x{code:02x} is not identity (0x00)")
        if length != len(multihash) - 2:
            raise PeerIdError(
                f"peer ID multihash declares {length} digest bytes but has {len(multihash) - 2}"
            )
        self._public_key_bytes = decode_public_key_protobuf(multihash[2:])
        self._bytes = multihash
        self._text: str | None = None
        self._public_key: Ed25519PublicKey | None = None

    @classmethod
    def from_public_key(cls, raw_public_key: bytes) -> PeerId:
        encoded = encode_public_key_protobuf(raw_public_key)
        return cls(bytes([_IDENTITY_MULTIHASH, len(encoded)]) + encoded)

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
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_key_bytes

    @property
    def public_key_protobuf(self) -> bytes:
        return self._bytes[2:]

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this peer's Ed25519 signature over ``data``; never raises."""
        try:
            if self._public_key is None:
                self._public_key = Ed25519PublicKey.from_public_bytes(self._public_key_bytes)
            self._public_key.verify(bytes(signature), bytes(data))
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
        return (PeerId.from_bytes, (self._bytes,))


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
