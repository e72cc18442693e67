"""latticaray's DHT on libp2p Kademlia (``/ipfs/kad/1.0.0``): the core's messages as kad ones.

Pure translation, both directions, so :class:`~latticaray.mesh.dht.service.DhtService` can run
every operation of :class:`~latticaray.mesh.dht.core.DhtCore` through foreign libp2p nodes (js,
go, rust; Lattica's ``/lattica/1.0.0``) and answer their requests from the core:

* a latticaray record of key ``k`` (signed, with subkeys) travels under the kad key
  ``/latticaray/`` + ``k``, its value the msgpack array of the signed records of that key
  (:func:`~latticaray.mesh.dht.messages.encode_records`), so a foreign node stores and returns it
  opaquely and every reader still checks each signature; the core's keyspace puts the record at
  that key's hash (:func:`~latticaray.mesh.dht.keyspace.record_id`), as the foreign node does;
* provider records are keyed by the CID's multihash, as in libp2p;
* FIND_NODE needs the looked-up key itself (a foreign node hashes it): lookups whose target has
  no known preimage (random bucket refreshes) are not sent to foreign nodes
  (:func:`kad_request` returns None);
* records of other namespaces (``/pk/``, ``/ipns/``) are not stored here; their lookups are
  answered with the closest peers we know (we route for others as they route for us).
"""

from __future__ import annotations

from typing import Any

from ..errors import MultiaddrError
from ..identity import PeerId, PeerIdError
from ..libp2p.cid import CidError, parse_cid
from ..libp2p.kad import MAX_VALUE, KadMessage, KadPeer, KadRecord, MessageType
from ..multiaddr import Multiaddr
from .errors import DhtProtocolError
from .keyspace import RECORD_NAMESPACE, Contact, id_to_bytes, key_id
from .messages import (
    ADD_PROVIDER,
    FIND_NODE,
    GET_PROVIDERS,
    GET_VALUE,
    MAX_ADDRS,
    PING,
    PUT_VALUE,
    decode_records,
    encode_records,
)
from .records import Record

__all__ = [
    "contact_to_peer",
    "core_request",
    "core_response",
    "from_kad_key",
    "kad_answer",
    "kad_request",
    "peer_to_contact",
    "provider_key",
    "to_kad_key",
]


def provider_key(cid: bytes) -> bytes:
    """What a provider record is keyed by: the multihash of a CID (as libp2p keys it), or the
    key itself when it is no CID (e.g. the relay rendezvous key)."""
    try:
        return parse_cid(cid).multihash()
    except CidError:
        return cid


def to_kad_key(key: bytes) -> bytes:
    return RECORD_NAMESPACE + key


def from_kad_key(kad_key: bytes) -> bytes | None:
    """The latticaray record key of a kad key, None for another namespace."""
    if kad_key.startswith(RECORD_NAMESPACE) and len(kad_key) > len(RECORD_NAMESPACE):
        return kad_key[len(RECORD_NAMESPACE) :]
    return None


def contact_to_peer(contact: Contact) -> KadPeer:
    addrs = []
    for text in contact.addrs:
        try:
            addr = Multiaddr.parse(text).without_peer()
        except (MultiaddrError, ValueError):
            continue
        if addr.transport != "unix":
            addrs.append(addr.to_bytes())
    return KadPeer(contact.peer_id, tuple(addrs))


def peer_to_contact(peer: KadPeer) -> Contact | None:
    """A kad peer as a DHT contact; None if its peer ID is not one."""
    try:
        pid = PeerId.from_bytes(peer.peer_id)
    except PeerIdError:
        return None
    addrs: list[str] = []
    for raw in peer.addrs:
        try:
            addr = Multiaddr.from_bytes(raw)
        except (MultiaddrError, ValueError):
            continue
        addrs.append(str(addr if addr.peer_id is not None else addr.with_peer(pid)))
        if len(addrs) >= MAX_ADDRS:
            break
    return Contact(peer.peer_id, tuple(addrs))


def _contacts(peers: tuple[KadPeer, ...]) -> list[Contact]:
    return [c for c in (peer_to_contact(p) for p in peers) if c is not None]


# -- our requests to a foreign node --------------------------------------------------------------


def kad_request(request: dict[str, Any], own: Contact) -> KadMessage | None:
    """The kad message of a core request; None when it has none (a FIND_NODE without key)."""
    op = request["op"]
    if op == FIND_NODE:
        key = request.get("key")
        return None if key is None else KadMessage(MessageType.FIND_NODE, key)
    if op == GET_VALUE:
        return KadMessage(MessageType.GET_VALUE, to_kad_key(request["key"]))
    if op == PUT_VALUE:
        records: list[Record] = request["records"]
        kad_key = to_kad_key(records[0].key)
        value = encode_records(records)
        if len(value) > MAX_VALUE:
            return None
        return KadMessage(MessageType.PUT_VALUE, kad_key, KadRecord(kad_key, value))
    if op == ADD_PROVIDER:
        return KadMessage(
            MessageType.ADD_PROVIDER, request["key"], provider_peers=(contact_to_peer(own),)
        )
    if op == GET_PROVIDERS:
        return KadMessage(MessageType.GET_PROVIDERS, request["key"])
    return KadMessage(MessageType.PING)


def core_response(
    request: dict[str, Any], sent: KadMessage, answer: KadMessage | None
) -> dict[str, Any]:
    """The core's view of a foreign node's answer to ``sent``."""
    op = request["op"]
    if op == ADD_PROVIDER or op == PING:
        return {}
    assert answer is not None
    peers = _contacts(answer.closer_peers)
    if op == FIND_NODE:
        return {"peers": peers}
    if op == GET_VALUE:
        records: list[Record] = []
        if answer.record is not None and answer.record.key == sent.key:
            try:
                records = decode_records(answer.record.value)
            except DhtProtocolError:
                records = []  # a foreign value under our namespace: not ours
        return {"records": records, "peers": peers}
    if op == PUT_VALUE:
        stored = (
            answer.record is not None
            and sent.record is not None
            and answer.record.value == sent.record.value
        )
        return {"results": [None if stored else "refused"] * len(request["records"])}
    return {"providers": _contacts(answer.provider_peers), "peers": peers}


# -- a foreign node's requests to us -------------------------------------------------------------


def core_request(
    message: KadMessage, sender: bytes, *, server: bool, provider_ttl: float
) -> dict[str, Any] | None:
    """The core request of a kad message from ``sender``; None when there is nothing to ask the
    core (a record of another namespace, a provider announcing someone else)."""
    mtype = message.type
    base: dict[str, Any] = {"server": server}
    if mtype is MessageType.FIND_NODE:
        return {**base, "op": FIND_NODE, "target": id_to_bytes(key_id(message.key))}
    if mtype is MessageType.PING:
        return {**base, "op": PING}
    if mtype is MessageType.GET_VALUE:
        key = from_kad_key(message.key)
        if key is None:  # another namespace: route only
            return {**base, "op": FIND_NODE, "target": id_to_bytes(key_id(message.key))}
        return {**base, "op": GET_VALUE, "key": key}
    if mtype is MessageType.PUT_VALUE:
        key = from_kad_key(message.key)
        record = message.record
        if key is None or record is None or record.key != message.key:
            return None
        try:
            records = decode_records(record.value)
        except DhtProtocolError:
            return None
        if not records or any(r.key != key for r in records):
            return None
        return {**base, "op": PUT_VALUE, "records": records}
    if mtype is MessageType.ADD_PROVIDER:
        mine = [p for p in message.provider_peers if p.peer_id == sender]
        if not mine or not message.key:
            return None
        contact = peer_to_contact(mine[0])
        addrs = contact.addrs if contact is not None else ()
        return {**base, "op": ADD_PROVIDER, "key": message.key, "ttl": provider_ttl, "addrs": addrs}
    if not message.key:
        return None
    return {**base, "op": GET_PROVIDERS, "key": message.key}


def kad_answer(message: KadMessage, response: dict[str, Any]) -> KadMessage | None:
    """Our kad answer to ``message`` from the core's response (None: no answer is sent)."""
    if "error" in response:
        return None
    mtype = message.type
    closer = tuple(contact_to_peer(c) for c in response.get("peers", ()))
    if mtype is MessageType.PING:
        return KadMessage(MessageType.PING)
    if mtype is MessageType.FIND_NODE:
        return KadMessage(mtype, message.key, closer_peers=closer)
    if mtype is MessageType.GET_VALUE:
        record = None
        records: list[Record] = list(response.get("records", ()))
        while records:
            value = encode_records(records)
            if len(value) <= MAX_VALUE:
                record = KadRecord(message.key, value)
                break
            records = records[: len(records) // 2]  # newest first: keep the freshest
        return KadMessage(mtype, message.key, record, closer)
    if mtype is MessageType.PUT_VALUE:
        results = response.get("results", ())
        if results and all(r is None or r == "stale" for r in results):
            return KadMessage(mtype, message.key, message.record)
        return None
    if mtype is MessageType.ADD_PROVIDER:
        return None
    providers = tuple(contact_to_peer(c) for c in response.get("providers", ()))
    return KadMessage(mtype, message.key, closer_peers=closer, provider_peers=providers)
