"""Mesh admission: the mesh key, membership credentials, and the member check.

A mesh has an Ed25519 mesh key, created by its first node. A membership credential is a
statement signed by that key: ``lrc1.<payload>.<signature>`` (base64url, no padding), where the
payload is msgpack ``{"v": 1, "mesh": <32-byte mesh public key>, "peer": <peer id str or None>,
"exp": <unix seconds>, "role": "member", "nonce": <16 bytes>}``. ``peer=None`` makes an invite
usable by whoever holds it (a bearer token, like a cluster join token); a peer-bound credential
is only valid when presented by that authenticated peer. Peers present credentials to each other
with `/latticaray/admit/1`; only admitted members may submit tasks or create actors.
"""

from __future__ import annotations

import base64
import os
import time

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization as crypto_serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from latticaray.runtime.errors import CredentialError

PREFIX = "lrc1"
MAX_CREDENTIAL_LEN = 1024
DEFAULT_TTL = 30 * 24 * 3600.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class MeshKey:
    """The mesh's signing key (held by the node that created the mesh)."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private = private_key
        self.public_bytes = private_key.public_key().public_bytes(
            crypto_serialization.Encoding.Raw, crypto_serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> MeshKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str) -> MeshKey:
        if os.path.exists(path):
            with open(path, "rb") as f:
                raw = f.read()
            if len(raw) != 32:
                raise CredentialError(f"mesh key file {path} is not a 32-byte Ed25519 seed")
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        key = cls.generate()
        raw = key._private.private_bytes(
            crypto_serialization.Encoding.Raw,
            crypto_serialization.PrivateFormat.Raw,
            crypto_serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return key

    def issue(
        self, peer_id: str | None = None, ttl: float = DEFAULT_TTL, now: float | None = None
    ) -> str:
        """A membership credential signed by this mesh key (bound to `peer_id` if given)."""
        now = time.time() if now is None else now
        payload = msgpack.packb(
            {
                "v": 1,
                "mesh": self.public_bytes,
                "peer": str(peer_id) if peer_id is not None else None,
                "exp": now + ttl,
                "role": "member",
                "nonce": os.urandom(16),
            },
            use_bin_type=True,
        )
        signature = self._private.sign(PREFIX.encode() + payload)
        return f"{PREFIX}.{_b64(payload)}.{_b64(signature)}"


class Credential:
    """A parsed credential (signature not yet checked against any particular mesh)."""

    def __init__(self, text: str, payload: bytes, signature: bytes, fields: dict):
        self.text = text
        self.payload = payload
        self.signature = signature
        self.mesh_public = fields["mesh"]
        self.peer = fields.get("peer")
        self.expires = float(fields["exp"])
        self.role = fields.get("role", "member")

    @classmethod
    def parse(cls, text: str) -> Credential:
        if not isinstance(text, str) or len(text) > MAX_CREDENTIAL_LEN:
            raise CredentialError(
                f"credential must be a string of at most {MAX_CREDENTIAL_LEN} characters"
            )
        parts = text.strip().split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise CredentialError(
                f"not a latticaray credential (expected {PREFIX}.<payload>.<sig>)"
            )
        try:
            payload, signature = _unb64(parts[1]), _unb64(parts[2])
            fields = msgpack.unpackb(
                payload, raw=False, max_bin_len=64, max_str_len=256, max_map_len=16, max_array_len=0
            )
        except Exception as exc:
            raise CredentialError(f"credential is not decodable: {exc}") from None
        if (
            not isinstance(fields, dict)
            or fields.get("v") != 1
            or not isinstance(fields.get("mesh"), bytes)
            or len(fields["mesh"]) != 32
            or not isinstance(fields.get("exp"), (int, float))
        ):
            raise CredentialError("credential payload is malformed")
        if fields.get("peer") is not None and not isinstance(fields["peer"], str):
            raise CredentialError("credential peer must be a peer id string")
        return cls(text.strip(), payload, signature, fields)


def verify_credential(
    text: str, mesh_public: bytes, peer_id: str | None = None, now: float | None = None
) -> Credential:
    """Parse and check a credential: signed by `mesh_public`, unexpired, bound to `peer_id`."""
    credential = Credential.parse(text)
    if credential.mesh_public != mesh_public:
        raise CredentialError("credential was issued for a different mesh")
    try:
        Ed25519PublicKey.from_public_bytes(mesh_public).verify(
            credential.signature, PREFIX.encode() + credential.payload
        )
    except InvalidSignature:
        raise CredentialError("credential signature is not the mesh key's") from None
    now = time.time() if now is None else now
    if credential.expires < now:
        raise CredentialError("credential has expired")
    if credential.peer is not None and peer_id is not None and credential.peer != str(peer_id):
        raise CredentialError("credential is bound to another peer")
    return credential


class Admission:
    """Who is a member of this node's mesh, as far as this node knows."""

    def __init__(
        self, mesh_public: bytes | None, own_credential: str | None, mesh_key: MeshKey | None = None
    ):
        self.mesh_key = mesh_key
        self.mesh_public = mesh_public
        self.own_credential = own_credential
        self._members: dict[str, float] = {}

    @classmethod
    def create_mesh(cls, peer_id: str, mesh_key: MeshKey | None = None) -> Admission:
        key = mesh_key or MeshKey.generate()
        return cls(key.public_bytes, key.issue(peer_id), key)

    @classmethod
    def join(cls, credential: str | None) -> Admission:
        if credential is None:
            return cls(None, None)
        parsed = Credential.parse(credential)
        return cls(parsed.mesh_public, credential)

    @property
    def is_member(self) -> bool:
        return self.own_credential is not None

    def admit(self, peer_id: str, credential_text: str, now: float | None = None) -> None:
        """Check a peer's credential; on success it is a member until the credential expires."""
        if self.mesh_public is None:
            raise CredentialError("this node is not part of a mesh, so it admits nobody")
        credential = verify_credential(credential_text, self.mesh_public, peer_id, now)
        self._members[str(peer_id)] = credential.expires

    def allowed(self, peer_id, now: float | None = None) -> bool:
        expires = self._members.get(str(peer_id))
        if expires is None:
            return False
        if expires < (time.time() if now is None else now):
            del self._members[str(peer_id)]
            return False
        return True

    def forget(self, peer_id) -> None:
        self._members.pop(str(peer_id), None)

    def invite(self, peer_id: str | None = None, ttl: float = DEFAULT_TTL) -> str:
        if self.mesh_key is None:
            raise CredentialError("only a node holding the mesh key can issue credentials")
        return self.mesh_key.issue(peer_id, ttl)


def make_invite(mesh_key_path: str, peer_id: str | None = None, ttl: float = DEFAULT_TTL) -> str:
    """What `latticaray invite` prints: a credential signed by the mesh key stored at the path."""
    return MeshKey.load_or_create(mesh_key_path).issue(peer_id, ttl)
