"""Kademlia DHT messages of libp2p (``/ipfs/kad/1.0.0``), and a client and server over them.

One protobuf ``Message{type=1, key=2, record=3 Record{key=1, value=2, timeReceived=5},
closerPeers=8, providerPeers=9 Peer{id=1, addrs=2, connection=3}, clusterLevelRaw=10}`` per
length-prefixed frame: FIND_NODE (key = peer ID), GET_VALUE / PUT_VALUE (key = record key),
GET_PROVIDERS / ADD_PROVIDER (key = a CID's multihash), PING. The protocol ID is a parameter,
so the same code speaks ``/lattica/1.0.0`` to Lattica's rust nodes.

:class:`KadMessage` is the pure codec. :class:`KadClient` sends one request per stream (as
js-libp2p does; go and rust reuse streams, which a server here also accepts), and
:class:`KadServer` answers from a bounded in-memory store and the peers a ``closer_peers``
callback names. The mesh's own DHT (:mod:`latticaray.mesh.dht`) keeps its routing; this
module is the wire format it speaks to foreign peers.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from ..errors import ProtocolViolation
from .errors import ProtobufError
from .protobuf import Writer, parse_fields
from .stream import MuxedConnection, MuxedStream, ProtocolRouter

__all__ = [
    "DEFAULT_KAD_PROTOCOL",
    "LATTICA_KAD_PROTOCOL",
    "MAX_KAD_MESSAGE",
    "ConnectionType",
    "KadClient",
    "KadMessage",
    "KadPeer",
    "KadRecord",
    "KadServer",
    "MessageType",
]

DEFAULT_KAD_PROTOCOL = "/ipfs/kad/1.0.0"
LATTICA_KAD_PROTOCOL = "/lattica/1.0.0"
MAX_KAD_MESSAGE = 1024 * 1024
MAX_KEY = 1024
MAX_VALUE = 64 * 1024
MAX_PEERS = 64
MAX_ADDRS_PER_PEER = 64
MAX_ADDR = 1024
MAX_REQUESTS_PER_STREAM = 64


class MessageType(IntEnum):
    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


class ConnectionType(IntEnum):
    NOT_CONNECTED = 0
    CONNECTED = 1
    CAN_CONNECT = 2
    CANNOT_CONNECT = 3


@dataclass(frozen=True, slots=True)
class KadPeer:
    peer_id: bytes
    addrs: tuple[bytes, ...] = ()
    connection: ConnectionType = ConnectionType.NOT_CONNECTED

    def encode(self) -> bytes:
        return (
            Writer()
            .bytes_(1, self.peer_id)
            .repeated_bytes(2, self.addrs)
            .uint(3, int(self.connection))
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> KadPeer:
        fields = parse_fields(data, max_fields=MAX_ADDRS_PER_PEER + 8)
        raw_conn = fields.uint(3)
        try:
            conn = ConnectionType(raw_conn)
        except ValueError:
            conn = ConnectionType.NOT_CONNECTED  # unknown enum values read as the default
        return cls(
            fields.bytes_(1, max_len=128),
            tuple(fields.repeated_bytes(2, max_len=MAX_ADDR, max_count=MAX_ADDRS_PER_PEER)),
            conn,
        )


@dataclass(frozen=True, slots=True)
class KadRecord:
    key: bytes
    value: bytes
    time_received: str = ""

    def encode(self) -> bytes:
        return (
            Writer()
            .bytes_(1, self.key)
            .bytes_(2, self.value)
            .string(5, self.time_received)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> KadRecord:
        fields = parse_fields(data, max_fields=16)
        return cls(
            fields.bytes_(1, max_len=MAX_KEY),
            fields.bytes_(2, max_len=MAX_VALUE),
            fields.string(5, max_len=64),
        )


@dataclass(frozen=True, slots=True)
class KadMessage:
    type: MessageType
    key: bytes = b""
    record: KadRecord | None = None
    closer_peers: tuple[KadPeer, ...] = ()
    provider_peers: tuple[KadPeer, ...] = ()
    cluster_level: int = 0

    def encode(self) -> bytes:
        writer = Writer().uint(1, int(self.type), always=True).int32(10, self.cluster_level)
        writer.bytes_(2, self.key)
        if self.record is not None:
            writer.bytes_(3, self.record.encode(), always=True)
        writer.repeated_bytes(8, (p.encode() for p in self.closer_peers))
        writer.repeated_bytes(9, (p.encode() for p in self.provider_peers))
        return writer.finish()

    @classmethod
    def decode(cls, data: bytes) -> KadMessage:
        if len(data) > MAX_KAD_MESSAGE:
            raise ProtobufError(f"kad message of {len(data)} bytes exceeds {MAX_KAD_MESSAGE}")
        fields = parse_fields(data, max_fields=2 * MAX_PEERS + 16)
        raw_type = fields.uint(1)
        try:
            mtype = MessageType(raw_type)
        except ValueError:
            raise ProtobufError(f"unknown kad message type {raw_type}") from None
        peer_bytes = MAX_ADDRS_PER_PEER * (MAX_ADDR + 4) + 256
        record = None
        if fields.has(3):
            record = KadRecord.decode(fields.bytes_(3, max_len=MAX_KEY + MAX_VALUE + 128))
        return cls(
            type=mtype,
            key=fields.bytes_(2, max_len=MAX_KEY),
            record=record,
            closer_peers=tuple(
                KadPeer.decode(p)
                for p in fields.repeated_bytes(8, max_len=peer_bytes, max_count=MAX_PEERS)
            ),
            provider_peers=tuple(
                KadPeer.decode(p)
                for p in fields.repeated_bytes(9, max_len=peer_bytes, max_count=MAX_PEERS)
            ),
            cluster_level=fields.int32(10),
        )


class KadClient:
    """Requests to one peer at a time, over a connection; one stream per request."""

    def __init__(self, protocol: str = DEFAULT_KAD_PROTOCOL, *, timeout: float = 10.0) -> None:
        self.protocol = protocol
        self.timeout = timeout

    async def request(self, conn: MuxedConnection, message: KadMessage) -> KadMessage | None:
        """Send ``message``; return the answer (``None`` for ADD_PROVIDER, which has none)."""
        stream = await conn.open_stream(self.protocol, timeout=self.timeout)
        try:
            await stream.write_message(message.encode(), timeout=self.timeout)
            if message.type is MessageType.ADD_PROVIDER:
                await stream.close()
                return None
            data = await stream.read_message(MAX_KAD_MESSAGE, timeout=self.timeout)
        except BaseException:
            stream.reset()
            raise
        await stream.close()
        if data is None:
            raise ProtocolViolation(f"{conn.remote_peer_text} closed the kad stream unanswered")
        answer = KadMessage.decode(data)
        if answer.type is not message.type:
            raise ProtocolViolation(
                f"kad answer of type {answer.type.name} to a {message.type.name} request"
            )
        return answer

    async def _ask(self, conn: MuxedConnection, message: KadMessage) -> KadMessage:
        answer = await self.request(conn, message)
        assert answer is not None
        return answer

    async def find_node(self, conn: MuxedConnection, key: bytes) -> list[KadPeer]:
        return list((await self._ask(conn, KadMessage(MessageType.FIND_NODE, key))).closer_peers)

    async def get_value(
        self, conn: MuxedConnection, key: bytes
    ) -> tuple[KadRecord | None, list[KadPeer]]:
        answer = await self._ask(conn, KadMessage(MessageType.GET_VALUE, key))
        record = answer.record if answer.record is not None and answer.record.key == key else None
        return record, list(answer.closer_peers)

    async def put_value(self, conn: MuxedConnection, key: bytes, value: bytes) -> None:
        record = KadRecord(key, value)
        answer = await self._ask(conn, KadMessage(MessageType.PUT_VALUE, key, record))
        if answer.record is None or answer.record.value != value:
            raise ProtocolViolation(f"{conn.remote_peer_text} did not store the record")

    async def add_provider(
        self, conn: MuxedConnection, multihash: bytes, provider: KadPeer
    ) -> None:
        await self.request(
            conn, KadMessage(MessageType.ADD_PROVIDER, multihash, provider_peers=(provider,))
        )

    async def get_providers(
        self, conn: MuxedConnection, multihash: bytes
    ) -> tuple[list[KadPeer], list[KadPeer]]:
        answer = await self._ask(conn, KadMessage(MessageType.GET_PROVIDERS, multihash))
        return list(answer.provider_peers), list(answer.closer_peers)

    async def ping(self, conn: MuxedConnection) -> None:
        await self._ask(conn, KadMessage(MessageType.PING))


@dataclass(slots=True)
class _Providers:
    peers: OrderedDict[bytes, tuple[KadPeer, float]] = field(default_factory=OrderedDict)


class KadServer:
    """Answers kad requests from a bounded in-memory store.

    ``closer_peers(key)`` names the peers to return for FIND_NODE and with every answer;
    ``validate(key, value)`` may refuse a PUT_VALUE by raising. Records and provider sets are
    evicted oldest first past their limits; providers expire after ``provider_ttl``.
    """

    def __init__(
        self,
        router: ProtocolRouter,
        *,
        protocol: str = DEFAULT_KAD_PROTOCOL,
        closer_peers: Callable[[bytes], Sequence[KadPeer]] = lambda _key: (),
        validate: Callable[[bytes, bytes], None] | None = None,
        max_records: int = 4096,
        max_provided_keys: int = 4096,
        max_providers_per_key: int = 20,
        provider_ttl: float = 48 * 3600.0,
    ) -> None:
        self.protocol = protocol
        self.closer_peers = closer_peers
        self.validate = validate
        self.records: OrderedDict[bytes, KadRecord] = OrderedDict()
        self.providers: OrderedDict[bytes, _Providers] = OrderedDict()
        self.max_records = max_records
        self.max_provided_keys = max_provided_keys
        self.max_providers_per_key = max_providers_per_key
        self.provider_ttl = provider_ttl
        router.add(protocol, self._handle)

    async def _handle(self, stream: MuxedStream) -> None:
        for _ in range(MAX_REQUESTS_PER_STREAM):
            data = await stream.read_message(MAX_KAD_MESSAGE)
            if data is None:
                break
            answer = self.answer(stream.connection.remote_peer_id, KadMessage.decode(data))
            if answer is not None:
                await stream.write_message(answer.encode())
        await stream.close()

    def answer(
        self, sender: bytes, request: KadMessage, now: float | None = None
    ) -> KadMessage | None:
        """The reply to ``request`` from ``sender`` (``None`` for ADD_PROVIDER)."""
        now = time.monotonic() if now is None else now
        closer = tuple(self.closer_peers(request.key))[:MAX_PEERS]
        mtype = request.type
        if mtype is MessageType.FIND_NODE:
            return KadMessage(mtype, request.key, closer_peers=closer)
        if mtype is MessageType.PING:
            return KadMessage(mtype)
        if mtype is MessageType.GET_VALUE:
            return KadMessage(mtype, request.key, self.records.get(request.key), closer)
        if mtype is MessageType.PUT_VALUE:
            record = request.record
            if record is None or record.key != request.key:
                raise ProtocolViolation("PUT_VALUE whose record key differs from the message key")
            if self.validate is not None:
                self.validate(record.key, record.value)
            self.records.pop(record.key, None)
            self.records[record.key] = KadRecord(record.key, record.value)
            while len(self.records) > self.max_records:
                self.records.popitem(last=False)
            return KadMessage(mtype, request.key, record)
        if mtype is MessageType.ADD_PROVIDER:
            for peer in request.provider_peers:
                if peer.peer_id == sender:  # a peer may announce only itself
                    self._add_provider(request.key, peer, now)
            return None
        providers = self._live_providers(request.key, now)
        return KadMessage(mtype, request.key, closer_peers=closer, provider_peers=providers)

    def _add_provider(self, key: bytes, peer: KadPeer, now: float) -> None:
        entry = self.providers.pop(key, None) or _Providers()
        self.providers[key] = entry
        entry.peers.pop(peer.peer_id, None)
        entry.peers[peer.peer_id] = (peer, now)
        while len(entry.peers) > self.max_providers_per_key:
            entry.peers.popitem(last=False)
        while len(self.providers) > self.max_provided_keys:
            self.providers.popitem(last=False)

    def _live_providers(self, key: bytes, now: float) -> tuple[KadPeer, ...]:
        entry = self.providers.get(key)
        if entry is None:
            return ()
        for peer_id, (_, added) in list(entry.peers.items()):
            if now - added > self.provider_ttl:
                del entry.peers[peer_id]
        return tuple(peer for peer, _ in entry.peers.values())
