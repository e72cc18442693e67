"""Mesh admission: the mesh key, credentials and their roles, revocations, the member table.

A mesh has an Ed25519 mesh key, created by its first node. A membership credential is a
statement signed by that key: ``lrc1.<payload>.<signature>`` (base64url, no padding), where the
payload is msgpack ``{"v": 1, "mesh": <32-byte mesh public key>, "peer": <peer id str or None>,
"exp": <unix seconds>, "role": <role>, "nonce": <16 bytes>, "iat": <unix seconds>}``.
``peer=None`` makes an invite usable by whoever holds it (a bearer token, like a cluster join
token); a peer-bound credential is only valid when presented by that authenticated peer. The
nonce is the credential's id (what a revocation of the credential names).

Roles grant permissions (`Permission`): ``driver`` may submit work and read; ``worker`` may
execute and host work, submit (the tasks its running work makes) and read; ``observer`` may only
read (objects, state reports); ``member`` (every credential made before roles) may do all of it.

A revocation is a statement signed by the same key, ``lrv1.<payload>.<signature>`` with payload
``{"v": 1, "mesh": <key>, "peer": <peer id str or None>, "cred": <credential id or None>,
"at": <unix seconds>, "nonce": <16 bytes>}``: the peer (whatever credential it shows) or the
credential (whoever shows it) is no member any more. Revocations spread through the CRDT
(latticaray.state.revocations); `Admission.revoke` applies one here.

`Admission` is this node's side of it, fed times and texts, touching no socket: its own
credential (renewed before it runs out, `needs_renewal`), the peers it admitted with their role
and expiry, what was revoked. Peers present credentials to each other with `/latticaray/admit/1`
and renew them with `/latticaray/renew/1` (remote/membership.py).
"""

from __future__ import annotations

import base64
import enum
import os
import time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization as crypto_serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from latticaray.runtime.errors import CredentialError

PREFIX = "lrc1"
REVOCATION_PREFIX = "lrv1"
MAX_CREDENTIAL_LEN = 1024
MAX_REVOCATION_LEN = 1024
#: How long an invite (`latticaray invite`, `invite()`) lasts unless told otherwise.
DEFAULT_TTL = 24 * 3600.0
#: How long a credential the mesh key renews lasts; it is renewed when less than half is left.
RENEWED_TTL = 3600.0
RENEW_MARGIN = RENEWED_TTL / 2
CREDENTIAL_ID_LEN = 16


class Permission(enum.Flag):
    """What a credential's role lets its holder do (checked at every runtime entry point)."""

    NONE = 0
    READ = enum.auto()  # fetch objects (object/1, Bitswap), state reports, views
    SUBMIT = enum.auto()  # send tasks, actors and calls; hold refs at owners; claim names
    EXECUTE = enum.auto()  # run others' work and host their actors and objects

    @classmethod
    def of_role(cls, role: str) -> Permission:
        try:
            return ROLES[role]
        except KeyError:
            raise CredentialError(
                f"unknown role {role!r}; known roles: {', '.join(sorted(ROLES))}"
            ) from None


ROLES: dict[str, Permission] = {
    "member": Permission.READ | Permission.SUBMIT | Permission.EXECUTE,
    "worker": Permission.READ | Permission.SUBMIT | Permission.EXECUTE,
    "driver": Permission.READ | Permission.SUBMIT,
    "observer": Permission.READ,
}
#: Work that changes something on a peer: submitting it, or taking part in it as an executor.
ACTIVE = Permission.SUBMIT | Permission.EXECUTE


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _split_signed(text: str, prefix: str, limit: int, what: str) -> tuple[bytes, bytes, dict]:
    """(payload, signature, fields) of ``<prefix>.<payload>.<signature>``; not yet verified."""
    if not isinstance(text, str) or len(text) > limit:
        raise CredentialError(f"{what} must be a string of at most {limit} characters")
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != prefix:
        raise CredentialError(f"not a latticaray {what} (expected {prefix}.<payload>.<sig>)")
    try:
        payload, signature = _unb64(parts[1]), _unb64(parts[2])
        fields = msgpack.unpackb(
            payload, raw=False, max_bin_len=64, max_str_len=256, max_map_len=16, max_array_len=0
        )
    except Exception as exc:
        raise CredentialError(f"{what} is not decodable: {exc}") from None
    if (
        not isinstance(fields, dict)
        or fields.get("v") != 1
        or not isinstance(fields.get("mesh"), bytes)
        or len(fields["mesh"]) != 32
    ):
        raise CredentialError(f"{what} payload is malformed")
    if fields.get("peer") is not None and not isinstance(fields["peer"], str):
        raise CredentialError(f"{what} peer must be a peer id string")
    return payload, signature, fields


def _check_signature(prefix: str, payload: bytes, signature: bytes, mesh_public: bytes, what: str):
    try:
        Ed25519PublicKey.from_public_bytes(mesh_public).verify(signature, prefix.encode() + payload)
    except InvalidSignature:
        raise CredentialError(f"{what} signature is not the mesh key's") from None


class MeshKey:
    """The mesh's signing key (held by the node that created the mesh, and by its admins)."""

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

    def _sign(self, prefix: str, fields: dict) -> str:
        payload = msgpack.packb(fields, use_bin_type=True)
        signature = self._private.sign(prefix.encode() + payload)
        return f"{prefix}.{_b64(payload)}.{_b64(signature)}"

    def issue(
        self,
        peer_id: str | None = None,
        ttl: float = DEFAULT_TTL,
        now: float | None = None,
        role: str = "member",
    ) -> str:
        """A membership credential signed by this mesh key (bound to `peer_id` if given)."""
        Permission.of_role(role)  # an unknown role is refused here, not by every verifier
        if not ttl > 0:
            raise CredentialError(f"a credential's ttl must be positive, not {ttl!r}")
        now = time.time() if now is None else now
        return self._sign(
            PREFIX,
            {
                "v": 1,
                "mesh": self.public_bytes,
                "peer": str(peer_id) if peer_id is not None else None,
                "exp": now + ttl,
                "role": role,
                "nonce": os.urandom(CREDENTIAL_ID_LEN),
                "iat": now,
            },
        )

    def revoke(
        self,
        peer_id: str | None = None,
        credential_id: bytes | None = None,
        now: float | None = None,
    ) -> str:
        """A revocation of a peer (any credential it shows) or of one credential (by its id)."""
        if peer_id is None and credential_id is None:
            raise CredentialError("a revocation names a peer, a credential id, or both")
        if credential_id is not None and len(credential_id) != CREDENTIAL_ID_LEN:
            raise CredentialError(f"a credential id is {CREDENTIAL_ID_LEN} bytes")
        return self._sign(
            REVOCATION_PREFIX,
            {
                "v": 1,
                "mesh": self.public_bytes,
                "peer": str(peer_id) if peer_id is not None else None,
                "cred": credential_id,
                "at": time.time() if now is None else now,
                "nonce": os.urandom(16),
            },
        )


class Credential:
    """A parsed credential (signature not yet checked against any particular mesh)."""

    def __init__(self, text: str, payload: bytes, signature: bytes, fields: dict):
        self.text = text
        self.payload = payload
        self.signature = signature
        self.mesh_public: bytes = fields["mesh"]
        self.peer: str | None = fields.get("peer")
        self.expires = float(fields["exp"])
        self.role: str = fields.get("role", "member")
        self.permissions = Permission.of_role(self.role)
        nonce = fields.get("nonce")
        self.id: bytes = nonce if isinstance(nonce, bytes) else b""

    @classmethod
    def parse(cls, text: str) -> Credential:
        payload, signature, fields = _split_signed(text, PREFIX, MAX_CREDENTIAL_LEN, "credential")
        if not isinstance(fields.get("exp"), (int, float)) or isinstance(fields["exp"], bool):
            raise CredentialError("credential payload is malformed")
        if not isinstance(fields.get("role", "member"), str):
            raise CredentialError("credential role must be a string")
        return cls(text.strip(), payload, signature, fields)


def verify_credential(
    text: str, mesh_public: bytes, peer_id: str | None = None, now: float | None = None
) -> Credential:
    """Parse and check a credential: signed by `mesh_public`, unexpired, bound to `peer_id`."""
    credential = Credential.parse(text)
    if credential.mesh_public != mesh_public:
        raise CredentialError("credential was issued for a different mesh")
    _check_signature(PREFIX, credential.payload, credential.signature, mesh_public, "credential")
    now = time.time() if now is None else now
    if credential.expires < now:
        raise CredentialError("credential has expired")
    if credential.peer is not None and peer_id is not None and credential.peer != str(peer_id):
        raise CredentialError("credential is bound to another peer")
    return credential


@dataclass(frozen=True, slots=True)
class Revocation:
    """A verified revocation: of ``peer`` (any credential), of credential ``cred`` (any holder)."""

    text: str
    peer: str | None
    cred: bytes | None
    at: float

    @property
    def subjects(self) -> list[str]:
        """The keys it is stored under in the CRDT: ``peer:<id>``, ``cred:<hex id>``."""
        out = []
        if self.peer is not None:
            out.append(f"peer:{self.peer}")
        if self.cred is not None:
            out.append(f"cred:{self.cred.hex()}")
        return out


def verify_revocation(text: str, mesh_public: bytes) -> Revocation:
    """Parse and check a revocation: signed by `mesh_public`, naming a peer or a credential."""
    payload, signature, fields = _split_signed(
        text, REVOCATION_PREFIX, MAX_REVOCATION_LEN, "revocation"
    )
    if fields["mesh"] != mesh_public:
        raise CredentialError("revocation was issued for a different mesh")
    _check_signature(REVOCATION_PREFIX, payload, signature, mesh_public, "revocation")
    cred = fields.get("cred")
    if cred is not None and (not isinstance(cred, bytes) or len(cred) != CREDENTIAL_ID_LEN):
        raise CredentialError(f"a revoked credential id is {CREDENTIAL_ID_LEN} bytes")
    at = fields.get("at")
    if not isinstance(at, (int, float)) or isinstance(at, bool):
        raise CredentialError("revocation payload is malformed")
    if fields.get("peer") is None and cred is None:
        raise CredentialError("a revocation names a peer, a credential id, or both")
    return Revocation(text.strip(), fields.get("peer"), cred, float(at))


@dataclass(slots=True)
class Grant:
    """What an admitted peer may do here, and until when."""

    role: str
    permissions: Permission
    expires: float
    credential_id: bytes


class Admission:
    """Who is a member of this node's mesh, as far as this node knows, and what each may do."""

    def __init__(
        self,
        mesh_public: bytes | None,
        own_credential: str | None,
        mesh_key: MeshKey | None = None,
    ):
        self.mesh_key = mesh_key
        self.mesh_public = mesh_public
        self.own_credential = own_credential
        self.own: Credential | None = (
            Credential.parse(own_credential) if own_credential is not None else None
        )
        self.own_revoked = False
        self._members: dict[str, Grant] = {}
        self._revoked_peers: set[str] = set()
        self._revoked_credentials: set[bytes] = set()

    @classmethod
    def create_mesh(cls, peer_id: str, mesh_key: MeshKey | None = None) -> Admission:
        key = mesh_key or MeshKey.generate()
        return cls(key.public_bytes, key.issue(peer_id, RENEWED_TTL), key)

    @classmethod
    def join(
        cls, credential: str | None, peer_id: str | None = None, now: float | None = None
    ) -> Admission:
        """This node's admission from the credential it joins with; one that cannot be valid
        for ``peer_id`` (expired, bound to another peer, badly signed) is refused here."""
        if credential is None:
            return cls(None, None)
        parsed = Credential.parse(credential)
        verify_credential(credential, parsed.mesh_public, peer_id, now)
        return cls(parsed.mesh_public, credential)

    # ------------------------------------------------------------------ this node
    @property
    def is_member(self) -> bool:
        return self.own_credential is not None and not self.own_revoked

    @property
    def role(self) -> str | None:
        return self.own.role if self.own is not None else None

    def may(self, permission: Permission) -> bool:
        """Whether this node's own credential grants ``permission``."""
        return self.is_member and self.own is not None and permission in self.own.permissions

    def needs_renewal(self, now: float | None = None) -> bool:
        """A bearer credential is swapped for a peer-bound one at once; a bound one when less
        than RENEW_MARGIN s of it are left."""
        own = self.own
        if own is None or self.own_revoked:
            return False
        now = time.time() if now is None else now
        return own.peer is None or own.expires - now < RENEW_MARGIN

    def renew_own(self, peer_id: str, now: float | None = None) -> str:
        """This node's credential renewed with the mesh key it holds."""
        if self.mesh_key is None or self.own is None:
            raise CredentialError("only a node holding the mesh key renews its own credential")
        self.replace_own(self.mesh_key.issue(peer_id, RENEWED_TTL, now, self.own.role), peer_id)
        assert self.own_credential is not None
        return self.own_credential

    def replace_own(self, text: str, peer_id: str, now: float | None = None) -> None:
        """Take a renewed credential: same mesh, bound to this node, role no wider."""
        if self.mesh_public is None or self.own is None:
            raise CredentialError("this node has no credential to replace")
        fresh = verify_credential(text, self.mesh_public, peer_id, now)
        if fresh.peer != str(peer_id):
            raise CredentialError("a renewed credential must be bound to this node")
        if fresh.permissions & ~self.own.permissions:
            raise CredentialError("a renewed credential may not widen this node's role")
        self.own, self.own_credential = fresh, fresh.text

    # ------------------------------------------------------------------ peers
    def admit(self, peer_id: str, credential_text: str, now: float | None = None) -> Credential:
        """Check a peer's credential; on success it is a member until the credential expires
        (or is revoked), with the credential's role."""
        credential = self.check(peer_id, credential_text, now)
        self._members[str(peer_id)] = Grant(
            credential.role, credential.permissions, credential.expires, credential.id
        )
        return credential

    def check(self, peer_id, credential_text: str, now: float | None = None) -> Credential:
        """A credential ``peer_id`` shows, verified (mesh key, expiry, binding) and unrevoked."""
        if self.mesh_public is None:
            raise CredentialError("this node is not part of a mesh, so it admits nobody")
        credential = verify_credential(credential_text, self.mesh_public, peer_id, now)
        if str(peer_id) in self._revoked_peers:
            raise CredentialError(f"peer {peer_id} was revoked from this mesh")
        if credential.id in self._revoked_credentials:
            raise CredentialError("this credential was revoked")
        return credential

    def grant(self, peer_id, now: float | None = None) -> Grant | None:
        """An admitted peer's grant while it lasts."""
        grant = self._members.get(str(peer_id))
        if grant is None:
            return None
        if grant.expires < (time.time() if now is None else now):
            del self._members[str(peer_id)]
            return None
        return grant

    def allowed(
        self, peer_id, permission: Permission = Permission.NONE, now: float | None = None
    ) -> bool:
        """Whether ``peer_id`` is an admitted member whose role grants any of ``permission``
        (``NONE``: a member, whatever its role)."""
        grant = self.grant(peer_id, now)
        if grant is None:
            return False
        return permission == Permission.NONE or bool(grant.permissions & permission)

    def role_of(self, peer_id) -> str | None:
        grant = self.grant(peer_id)
        return grant.role if grant is not None else None

    def forget(self, peer_id) -> None:
        self._members.pop(str(peer_id), None)

    # ------------------------------------------------------------------ revocation
    def revoke(self, revocation: Revocation, own_peer_id: str | None = None) -> list[str]:
        """Apply a verified revocation; the admitted peers it cut off (their grants dropped).
        When it names this node (or its credential), this node stops being a member."""
        if revocation.peer is not None:
            self._revoked_peers.add(revocation.peer)
        if revocation.cred is not None:
            self._revoked_credentials.add(revocation.cred)
        if self.own is not None and (
            (own_peer_id is not None and revocation.peer == str(own_peer_id))
            or (revocation.cred is not None and revocation.cred == self.own.id)
        ):
            self.own_revoked = True
        cut = [
            peer
            for peer, grant in self._members.items()
            if peer == revocation.peer or grant.credential_id == revocation.cred
        ]
        for peer in cut:
            del self._members[peer]
        return cut

    def is_revoked(self, peer_id) -> bool:
        return str(peer_id) in self._revoked_peers

    def verify_revocation(self, text: str) -> Revocation:
        if self.mesh_public is None:
            raise CredentialError("this node is not part of a mesh")
        return verify_revocation(text, self.mesh_public)

    # ------------------------------------------------------------------ issuing (mesh key)
    def invite(
        self, peer_id: str | None = None, ttl: float = DEFAULT_TTL, role: str = "member"
    ) -> str:
        if self.mesh_key is None:
            raise CredentialError("only a node holding the mesh key can issue credentials")
        return self.mesh_key.issue(peer_id, ttl, role=role)

    def renew_for(self, peer_id: str, presented: str, now: float | None = None) -> str:
        """A fresh credential for an admitted, unrevoked peer presenting its current one: bound
        to it, with the presented credential's role, for RENEWED_TTL s."""
        if self.mesh_key is None or self.mesh_public is None:
            raise CredentialError("this node does not hold the mesh key, so it renews nothing")
        if self.grant(peer_id, now) is None:
            raise CredentialError(f"peer {peer_id} is not an admitted member")
        current = self.check(peer_id, presented, now)
        return self.mesh_key.issue(peer_id, RENEWED_TTL, now, current.role)

    def revocation(self, peer_id: str | None = None, credential_id: bytes | None = None) -> str:
        if self.mesh_key is None:
            raise CredentialError("only a node holding the mesh key can revoke")
        return self.mesh_key.revoke(peer_id, credential_id)


def make_invite(
    mesh_key_path: str, peer_id: str | None = None, ttl: float = DEFAULT_TTL, role: str = "member"
) -> str:
    """What `latticaray invite` prints: a credential signed by the mesh key stored at the path."""
    return MeshKey.load_or_create(mesh_key_path).issue(peer_id, ttl, role=role)


def make_revocation(
    mesh_key_path: str, peer_id: str | None = None, credential_id: bytes | None = None
) -> str:
    """What `latticaray revoke` signs: a revocation by the mesh key stored at the path (which
    must exist: a new key would revoke nothing)."""
    if not os.path.exists(mesh_key_path):
        raise CredentialError(f"no mesh key at {mesh_key_path}")
    return MeshKey.load_or_create(mesh_key_path).revoke(peer_id, credential_id)


def credential_id(text: str) -> bytes:
    """The id of a credential (what `latticaray revoke --credential` names)."""
    return Credential.parse(text).id
