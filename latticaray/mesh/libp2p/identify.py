"""libp2p identify (``/ipfs/id/1.0.0``, ``/ipfs/id/push/1.0.0``): the message and its service.

The identify message is one length-prefixed protobuf ``Identify{publicKey=1, listenAddrs=2,
protocols=3, observedAddr=4, protocolVersion=5, agentVersion=6, signedPeerRecord=8}``. A peer
asked for it writes it and closes the stream; a pusher opens ``/ipfs/id/push/1.0.0`` and writes
it when its addresses or protocols change. The received key must be the connection's
authenticated peer, and a signed peer record, when present, must verify and name that peer.

:class:`IdentifyService` answers and asks over a :class:`MuxedConnection`; the codec
(:class:`IdentifyMessage`) is pure. Messages above 8 KiB are not sent (js-libp2p and go-libp2p
refuse them) and above :data:`MAX_IDENTIFY_MESSAGE` not read.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import HandshakeError, MultiaddrError
from ..multiaddr import Multiaddr
from .errors import KeyDecodeError, ProtobufError
from .keys import PrivateKey, PublicKey
from .peer_record import PeerRecord, open_peer_record, seal_peer_record
from .protobuf import Writer, parse_fields
from .stream import MuxedConnection, MuxedStream, ProtocolRouter

__all__ = [
    "IDENTIFY_PROTOCOL",
    "IDENTIFY_PUSH_PROTOCOL",
    "MAX_IDENTIFY_MESSAGE",
    "IdentifyMessage",
    "IdentifyService",
    "address_bytes",
    "decode_multiaddr",
]

log = logging.getLogger(__name__)

IDENTIFY_PROTOCOL = "/ipfs/id/1.0.0"
IDENTIFY_PUSH_PROTOCOL = "/ipfs/id/push/1.0.0"
DEFAULT_PROTOCOL_VERSION = "ipfs/0.1.0"
MAX_IDENTIFY_MESSAGE = 64 * 1024
MAX_SEND_IDENTIFY = 8 * 1024
MAX_ADDRS = 128
MAX_PROTOCOLS = 256
MAX_STRING = 1024
MAX_ADDR = 1024
MAX_PEERS_REMEMBERED = 1024


@dataclass(frozen=True, slots=True)
class IdentifyMessage:
    public_key: bytes = b""
    listen_addrs: tuple[bytes, ...] = ()
    protocols: tuple[str, ...] = ()
    observed_addr: bytes = b""
    protocol_version: str = ""
    agent_version: str = ""
    signed_peer_record: bytes = b""

    def encode(self) -> bytes:
        return (
            Writer()
            .string(5, self.protocol_version)
            .string(6, self.agent_version)
            .bytes_(1, self.public_key)
            .repeated_bytes(2, self.listen_addrs)
            .bytes_(4, self.observed_addr)
            .repeated_string(3, self.protocols)
            .bytes_(8, self.signed_peer_record)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> IdentifyMessage:
        if len(data) > MAX_IDENTIFY_MESSAGE:
            raise ProtobufError(f"identify message of {len(data)} bytes exceeds limit")
        fields = parse_fields(data, max_fields=2 * (MAX_ADDRS + MAX_PROTOCOLS) + 16)
        return cls(
            public_key=fields.bytes_(1, max_len=MAX_STRING * 4),
            listen_addrs=tuple(fields.repeated_bytes(2, max_len=MAX_ADDR, max_count=MAX_ADDRS)),
            protocols=tuple(fields.repeated_string(3, max_len=MAX_STRING, max_count=MAX_PROTOCOLS)),
            observed_addr=fields.bytes_(4, max_len=MAX_ADDR),
            protocol_version=fields.string(5, max_len=MAX_STRING),
            agent_version=fields.string(6, max_len=MAX_STRING),
            signed_peer_record=fields.bytes_(8, max_len=MAX_IDENTIFY_MESSAGE),
        )

    def key(self) -> PublicKey | None:
        if not self.public_key:
            return None
        return PublicKey.from_protobuf(self.public_key)

    def multiaddrs(self) -> list[Multiaddr]:
        """The listen addresses this node can parse (others, e.g. WebRTC, are skipped)."""
        return [m for m in (decode_multiaddr(a) for a in self.listen_addrs) if m is not None]


def decode_multiaddr(data: bytes) -> Multiaddr | None:
    try:
        return Multiaddr.from_bytes(data)
    except MultiaddrError:
        return None


def address_bytes(host: str, port: int) -> bytes:
    """The binary multiaddr ``/ip4|ip6/<host>/tcp/<port>``."""
    version = ipaddress.ip_address(host).version
    return Multiaddr.parse(f"/ip{version}/{host}/tcp/{port}").to_bytes()


@dataclass(slots=True)
class _PeerInfo:
    message: IdentifyMessage
    record: PeerRecord | None = None
    protocols: tuple[str, ...] = field(default_factory=tuple)


class IdentifyService:
    """Answers identify and identify-push, asks peers, and remembers what they said.

    ``listen_addrs`` returns our binary multiaddrs (without ``/p2p``) at the time of asking;
    the protocols advertised are ``protocols()`` (by default the router's).
    ``on_identified(conn, message)`` runs after every verified identify or push.
    """

    def __init__(
        self,
        identity: PrivateKey,
        router: ProtocolRouter,
        *,
        listen_addrs: Callable[[], Sequence[bytes]] = list,
        agent_version: str = "latticaray/0.1.0",
        protocol_version: str = DEFAULT_PROTOCOL_VERSION,
        on_identified: Callable[[MuxedConnection, IdentifyMessage], None] | None = None,
        protocols: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self.identity = identity
        self.router = router
        self.listen_addrs = listen_addrs
        self.agent_version = agent_version
        self.protocol_version = protocol_version
        self.on_identified = on_identified
        self.protocols = protocols if protocols is not None else (lambda: router.protocols)
        self.peers: OrderedDict[bytes, _PeerInfo] = OrderedDict()
        router.add(IDENTIFY_PROTOCOL, self._handle_identify)
        router.add(IDENTIFY_PUSH_PROTOCOL, self._handle_push)

    def message_for(self, conn: MuxedConnection | None) -> IdentifyMessage:
        addrs = tuple(self.listen_addrs())[:MAX_ADDRS]
        observed = b""
        remote = conn.remote_multiaddr if conn is not None else None
        if remote is not None:
            observed = remote.to_bytes()
        message = IdentifyMessage(
            public_key=self.identity.public_key.to_protobuf(),
            listen_addrs=addrs,
            protocols=tuple(self.protocols())[:MAX_PROTOCOLS],
            observed_addr=observed,
            protocol_version=self.protocol_version,
            agent_version=self.agent_version,
            signed_peer_record=seal_peer_record(self.identity, addrs) if addrs else b"",
        )
        if len(message.encode()) > MAX_SEND_IDENTIFY:
            raise ProtobufError("our identify message exceeds 8 KiB; advertise fewer addresses")
        return message

    async def _handle_identify(self, stream: MuxedStream) -> None:
        await stream.write_message(self.message_for(stream.connection).encode())
        await stream.close()

    async def _handle_push(self, stream: MuxedStream) -> None:
        data = await stream.read_message(MAX_IDENTIFY_MESSAGE)
        await stream.close()
        if data is None:
            return
        self._accept(stream.connection, IdentifyMessage.decode(data), push=True)

    def _accept(self, conn: MuxedConnection, message: IdentifyMessage, *, push: bool) -> None:
        try:
            key = message.key()
        except KeyDecodeError as exc:
            raise HandshakeError(f"identify from {conn.remote_peer_text}: bad key: {exc}") from None
        if key is None and not push:
            raise HandshakeError(f"identify from {conn.remote_peer_text} carries no public key")
        if key is not None and key.peer_id_bytes() != conn.remote_peer_id:
            raise HandshakeError(f"identify from {conn.remote_peer_text} names another peer")
        record = None
        if message.signed_peer_record:
            record = open_peer_record(message.signed_peer_record, conn.remote_peer_id)
        previous = self.peers.pop(conn.remote_peer_id, None)
        if push and previous is not None:
            # a push may be partial: fields it leaves out keep their earlier values
            message = IdentifyMessage(
                public_key=message.public_key or previous.message.public_key,
                listen_addrs=message.listen_addrs or previous.message.listen_addrs,
                protocols=message.protocols or previous.message.protocols,
                observed_addr=message.observed_addr or previous.message.observed_addr,
                protocol_version=message.protocol_version or previous.message.protocol_version,
                agent_version=message.agent_version or previous.message.agent_version,
                signed_peer_record=message.signed_peer_record
                or previous.message.signed_peer_record,
            )
            record = record or previous.record
        self.peers[conn.remote_peer_id] = _PeerInfo(message, record, message.protocols)
        while len(self.peers) > MAX_PEERS_REMEMBERED:
            self.peers.popitem(last=False)
        if self.on_identified is not None:
            self.on_identified(conn, message)

    async def identify(self, conn: MuxedConnection, *, timeout: float = 10.0) -> IdentifyMessage:
        """Ask the peer; verify and remember the answer."""
        stream = await conn.open_stream(IDENTIFY_PROTOCOL, timeout=timeout)
        try:
            data = await stream.read_message(MAX_IDENTIFY_MESSAGE, timeout=timeout)
        except BaseException:
            stream.reset()
            raise
        await stream.close()
        if data is None:
            raise HandshakeError(f"{conn.remote_peer_text} closed identify without an answer")
        message = IdentifyMessage.decode(data)
        self._accept(conn, message, push=False)
        return message

    async def push(self, conn: MuxedConnection, *, timeout: float = 10.0) -> None:
        """Send our current identify message on ``/ipfs/id/push/1.0.0``."""
        stream = await conn.open_stream(IDENTIFY_PUSH_PROTOCOL, timeout=timeout)
        try:
            await stream.write_message(self.message_for(conn).encode(), timeout=timeout)
        except BaseException:
            stream.reset()
            raise
        await stream.close()

    def protocols_of(self, peer_id: bytes) -> tuple[str, ...]:
        info = self.peers.get(peer_id)
        return info.protocols if info is not None else ()
