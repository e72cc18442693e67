"""The DHT as the runtime uses it: runtime keys scoped to the mesh and signed in by a credential.

The DHT routes for anyone (peer discovery is a public service), but what the runtime keeps in it
is the mesh's own. `MeshDht` wraps a DhtService for the parts that write and read runtime keys
(the scheduler's capacity ads, the object exchange's provider records):

* A record key ``k`` (``capacity/CPU``) is stored as ``lr1/<scope>/k``, where ``scope`` is the
  hex of the first 16 bytes of ``sha256("latticaray/mesh-scope/1\\0" + mesh public key)``, and
  its value is the envelope ``msgpack [1, <credential>, <value>]``: the publisher's membership
  credential beside what it publishes. `MemberRecords`, the validator every member's DhtService
  runs for the ``lr1/<scope>/`` namespace, refuses a record whose credential is not valid for
  its publisher (signed by the mesh key, unexpired, bound to the publisher or a bearer one,
  unrevoked), whose subkey is not the publisher's peer id (each publisher owns its entry), or,
  under ``capacity/``, whose role may not execute work. A non-member storing such a record
  cannot forge one; readers check every record they get the same way and drop what fails.
* A provider record of a store object is announced under
  ``sha256("latticaray/providers/1\\0" + mesh public key + CID bytes)``, not under the CID: a
  DHT node holding it cannot tell which object it names. Providers found are admitted (mutual
  `/latticaray/admit/1`) before the exchange asks them, since members serve members only.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from latticaray.mesh.dht.errors import RecordRejected
from latticaray.mesh.identity import PeerId, PeerIdError
from latticaray.runtime.admission import Admission, Credential, Permission
from latticaray.runtime.errors import CredentialError

SCOPE_DOMAIN = b"latticaray/mesh-scope/1\0"
PROVIDER_DOMAIN = b"latticaray/providers/1\0"
ENVELOPE_VERSION = 1
MAX_ENVELOPE = 64 * 1024
#: Keys under which a record's publisher must be allowed to execute work.
EXECUTE_KEYS = (b"capacity/",)


def scope_prefix(mesh_public: bytes) -> bytes:
    """``lr1/<scope>/``: where this mesh's runtime records live in the DHT."""
    scope = hashlib.sha256(SCOPE_DOMAIN + mesh_public).digest()[:16]
    return b"lr1/" + scope.hex().encode() + b"/"


def provider_key(mesh_public: bytes, cid: bytes) -> bytes:
    """The DHT key a store object's providers are announced under in this mesh."""
    return hashlib.sha256(PROVIDER_DOMAIN + mesh_public + cid).digest()


def seal(credential: str, value: bytes) -> bytes:
    return msgpack.packb([ENVELOPE_VERSION, credential, value], use_bin_type=True)


def unseal(data: bytes) -> tuple[str, bytes]:
    """(credential, value) of an envelope; ValueError if it is not one."""
    if len(data) > MAX_ENVELOPE:
        raise ValueError("record envelope too large")
    try:
        parts = msgpack.unpackb(
            data, raw=False, max_array_len=3, max_map_len=0, max_str_len=4096, strict_map_key=True
        )
    except Exception as exc:
        raise ValueError(f"record envelope is not msgpack: {exc}") from None
    if (
        not isinstance(parts, list)
        or len(parts) != 3
        or parts[0] != ENVELOPE_VERSION
        or not isinstance(parts[1], str)
        or not isinstance(parts[2], bytes)
    ):
        raise ValueError("record envelope must be [1, credential, value]")
    return parts[1], parts[2]


class MemberRecords:
    """DHT validator of a mesh's runtime records (``lr1/<scope>/`` namespace): see the module
    docstring. ``check(publisher, credential)`` verifies a credential as admission does."""

    def __init__(self, prefix: bytes, check: Callable[[str, str], Credential]) -> None:
        self.prefix = prefix
        self.check = check

    def credential(self, record: Any) -> tuple[Credential, bytes]:
        """The publisher's verified credential and the value a record carries; raises
        RecordRejected ("unauthorized")."""
        try:
            publisher = str(PeerId.from_bytes(record.publisher))
        except PeerIdError:
            raise RecordRejected("unauthorized", "publisher is not a valid peer ID") from None
        if record.subkey != record.publisher:
            raise RecordRejected(
                "unauthorized", "a runtime record's subkey must be its publisher's peer ID bytes"
            )
        try:
            text, value = unseal(record.value)
            credential = self.check(publisher, text)
        except (ValueError, CredentialError) as exc:
            raise RecordRejected("unauthorized", f"no valid membership credential: {exc}") from None
        key = record.key[len(self.prefix) :]
        if key.startswith(EXECUTE_KEYS) and Permission.EXECUTE not in credential.permissions:
            raise RecordRejected(
                "unauthorized", f"role {credential.role!r} may not advertise capacity"
            )
        return credential, value

    def validate(self, record: Any) -> None:
        self.credential(record)


@dataclass(frozen=True, slots=True)
class MeshRecord:
    """A runtime record as a reader gets it: the publisher's value, out of its envelope."""

    key: bytes
    subkey: bytes | None
    value: bytes
    expiration: float
    publisher: bytes


class MeshDht:
    """A DhtService seen through this mesh: scoped, credentialed records; hidden provider keys.

    It offers what the exchange, the capacity advertiser and placement use: ``put``, ``get``,
    ``provide``, ``find_providers``, ``find_peer``. ``admit(peer_id)`` (an awaitable) admits a
    provider found in the DHT before it is yielded.
    """

    def __init__(
        self,
        dht: Any,
        admission: Admission,
        admit: Callable[[PeerId], Awaitable[bool]] | None = None,
    ) -> None:
        if admission.mesh_public is None:
            raise CredentialError("a mesh's DHT needs the mesh key")
        self.dht = dht
        self.admission = admission
        self.admit = admit
        self.mesh_public = admission.mesh_public
        self.prefix = scope_prefix(self.mesh_public)
        self.validator = MemberRecords(self.prefix, self._check)
        self.dropped = 0  # records read that failed the check (observability; tests)

    def _check(self, publisher: str, text: str) -> Credential:
        return self.admission.check(publisher, text)

    def key(self, key: bytes) -> bytes:
        return self.prefix + bytes(key)

    async def put(
        self, key: bytes, value: bytes, expiration: float, subkey: bytes | None = None
    ) -> int:
        credential = self.admission.own_credential
        if credential is None or not self.admission.is_member:
            raise CredentialError("this node is no member: it publishes no runtime records")
        return await self.dht.put(self.key(key), seal(credential, value), expiration, subkey)

    async def get(self, key: bytes, quorum: int | None = None) -> Any:
        """The records under a runtime key whose credentials check out, as MeshRecords (a dict
        subkey -> record, like DhtService.get; None when there are none)."""
        found = await self.dht.get(self.key(key), quorum)
        if found is None:
            return None
        records = found.values() if isinstance(found, dict) else [found]
        out: dict[bytes | None, MeshRecord] = {}
        for record in records:
            try:
                _, value = self.validator.credential(record)
            except RecordRejected:
                self.dropped += 1
                continue
            out[record.subkey] = MeshRecord(
                bytes(key), record.subkey, value, record.expiration, record.publisher
            )
        return out or None

    async def provide(self, cid: bytes) -> int:
        return await self.dht.provide(provider_key(self.mesh_public, bytes(cid)))

    async def find_providers(self, cid: bytes, count: int = 20) -> AsyncIterator[Any]:
        """Providers of a store object in this mesh, each admitted (when ``admit`` is given)
        before it is yielded; one that is not a member is skipped."""
        async for info in self.dht.find_providers(
            provider_key(self.mesh_public, bytes(cid)), count
        ):
            if self.admit is not None and not await self.admit(info.peer_id):
                continue
            yield info

    async def find_peer(self, peer_id: PeerId) -> Any:
        return await self.dht.find_peer(peer_id)
