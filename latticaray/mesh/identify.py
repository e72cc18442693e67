"""The identify (``/latticaray/identify/1``) and ping (``/latticaray/ping/1``) protocols.

Identify: a unary call with an empty request; the reply is a msgpack map describing the callee
(its peer ID, listen addresses, supported protocols, agent version) and the address it observes
the caller at, which is how a node behind a NAT learns candidate public addresses. The reply's
peer ID must equal the authenticated peer of the connection, so a peer cannot speak for another.

A node advertises :attr:`~latticaray.mesh.node.MeshNode.advertised_addrs` (listen addresses plus
circuit and confirmed public addresses); unspecified addresses (``0.0.0.0``, ``::``) are never
sent, and any received are dropped, since nobody can dial them.

Ping: a unary echo of 32 random bytes; the caller measures the round trip.

The record codec (:class:`IdentifyInfo`) is pure; :class:`IdentifyService` wires it to a node
through :class:`IdentifyHost`, the part of :class:`~latticaray.mesh.node.MeshNode` it uses (so this
module does not import the node's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from .errors import MeshError, MultiaddrError, ProtocolViolation, RpcError
from .identity import PeerId, PeerIdError
from .multiaddr import Multiaddr
from .paths import is_dialable_addr

__all__ = [
    "IDENTIFY_PROTOCOL",
    "MAX_IDENTIFY_BYTES",
    "PING_PROTOCOL",
    "IdentifyHost",
    "IdentifyInfo",
    "IdentifyService",
]

IDENTIFY_PROTOCOL = "/latticaray/identify/1"
PING_PROTOCOL = "/latticaray/ping/1"
PROTOCOL_VERSION = "latticaray/1"
MAX_IDENTIFY_BYTES = 64 * 1024
MAX_LISTEN_ADDRS = 64
MAX_PROTOCOLS = 256
MAX_STRING = 256
PING_PAYLOAD_LEN = 32


@dataclass
class IdentifyInfo:
    peer_id: PeerId
    listen_addrs: list[Multiaddr] = field(default_factory=list)
    observed_addr: Multiaddr | None = None
    protocols: list[str] = field(default_factory=list)
    agent_version: str = ""
    protocol_version: str = PROTOCOL_VERSION

    def encode(self) -> bytes:
        record = {
            "v": self.protocol_version,
            "id": self.peer_id.to_bytes(),
            "la": [a.to_bytes() for a in self.listen_addrs[:MAX_LISTEN_ADDRS]],
            "oa": self.observed_addr.to_bytes() if self.observed_addr is not None else None,
            "p": list(self.protocols[:MAX_PROTOCOLS]),
            "av": self.agent_version[:MAX_STRING],
        }
        return msgpack.packb(record, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes, expected_peer: PeerId | None = None) -> IdentifyInfo:
        """Parse and validate a record; raises :class:`ProtocolViolation` with the reason."""
        if len(data) > MAX_IDENTIFY_BYTES:
            raise ProtocolViolation(
                f"identify record is {len(data)} bytes, over {MAX_IDENTIFY_BYTES}"
            )
        try:
            record = msgpack.unpackb(
                data,
                raw=False,
                max_bin_len=MAX_IDENTIFY_BYTES,
                max_str_len=MAX_IDENTIFY_BYTES,
                max_array_len=MAX_PROTOCOLS,
                max_map_len=32,
            )
        except Exception as exc:
            raise ProtocolViolation(f"identify record is not valid msgpack: {exc}") from None
        if not isinstance(record, dict):
            raise ProtocolViolation("identify record is not a map")

        def typed(key, kind):
            value = record.get(key)
            if value is not None and not isinstance(value, kind):
                raise ProtocolViolation(f"identify field {key!r} has type {type(value).__name__}")
            return value

        try:
            peer = PeerId.from_bytes(typed("id", bytes) or b"")
            addrs = [
                Multiaddr.from_bytes(a) for a in (typed("la", list) or []) if isinstance(a, bytes)
            ][:MAX_LISTEN_ADDRS]
            observed_raw = typed("oa", bytes)
            observed = Multiaddr.from_bytes(observed_raw) if observed_raw else None
        except (PeerIdError, MultiaddrError) as exc:
            raise ProtocolViolation(f"identify record: {exc}") from None
        protocols = [
            p for p in (typed("p", list) or []) if isinstance(p, str) and len(p) <= MAX_STRING
        ]
        if expected_peer is not None and peer != expected_peer:
            raise ProtocolViolation(
                f"identify record claims peer {peer} but the connection is authenticated as "
                f"{expected_peer}"
            )
        return cls(
            peer_id=peer,
            listen_addrs=addrs,
            observed_addr=observed,
            protocols=protocols,
            agent_version=(typed("av", str) or "")[:MAX_STRING],
            protocol_version=(typed("v", str) or "")[:MAX_STRING],
        )


class _AgentConfig(Protocol):
    @property
    def agent_version(self) -> str: ...


class _PathInfo(Protocol):
    @property
    def transport(self) -> str: ...

    @property
    def remote_addr(self) -> Multiaddr | None: ...


class IdentifyHost(Protocol):
    """What :class:`IdentifyService` uses of its node."""

    @property
    def peer_id(self) -> PeerId: ...

    @property
    def config(self) -> _AgentConfig: ...

    @property
    def advertised_addrs(self) -> list[Multiaddr]: ...

    def protocols(self) -> list[str]: ...

    def register_unary(
        self, service: str, handler: Callable[[Any, bytes], Awaitable[bytes]], **options: Any
    ) -> None: ...

    async def call(
        self, peer_id: PeerId, service: str, payload: bytes = b"", timeout: float | None = None
    ) -> bytes: ...

    def add_addrs(self, peer_id: PeerId, addrs: Iterable[Multiaddr]) -> None: ...

    def connection_to(self, peer_id: PeerId) -> _PathInfo | None: ...


class IdentifyService:
    """Serves identify and ping on a node, and runs identify on each new connection."""

    def __init__(self, node: IdentifyHost) -> None:
        self._node = node
        #: peer -> what it told us about itself
        self.peer_info: dict[PeerId, IdentifyInfo] = {}
        #: our address as seen by each peer (hints for NAT traversal, not truth)
        self.observed_by: dict[PeerId, Multiaddr] = {}
        self._identified_cbs: list[Callable[[IdentifyInfo], None]] = []
        node.register_unary(IDENTIFY_PROTOCOL, self._handle_identify)
        node.register_unary(PING_PROTOCOL, self._handle_ping)

    def on_identified(self, callback: Callable[[IdentifyInfo], None]) -> None:
        """``callback(info)`` after each successful identify of a peer (e.g. NAT traversal
        looking for peers that offer the relay service among ``info.protocols``)."""
        self._identified_cbs.append(callback)

    async def _handle_identify(self, ctx, payload: bytes) -> bytes:
        node = self._node
        info = IdentifyInfo(
            peer_id=node.peer_id,
            listen_addrs=[a.without_peer() for a in node.advertised_addrs],
            observed_addr=ctx.remote_addr,
            protocols=node.protocols(),
            agent_version=node.config.agent_version,
        )
        return info.encode()

    async def _handle_ping(self, ctx, payload: bytes) -> bytes:
        if len(payload) != PING_PAYLOAD_LEN:
            raise RpcError("INVALID_ARGUMENT", f"ping payload must be {PING_PAYLOAD_LEN} bytes")
        return payload

    async def identify(self, peer: PeerId, timeout: float = 10.0) -> IdentifyInfo:
        reply = await self._node.call(peer, IDENTIFY_PROTOCOL, b"", timeout=timeout)
        info = IdentifyInfo.decode(reply, expected_peer=peer)
        self.accept(peer, info)
        return info

    def accept(self, peer: PeerId, info: IdentifyInfo) -> None:
        """Remember what ``peer`` (authenticated) said about itself, however it said it (this
        protocol, or libp2p's ``/ipfs/id/1.0.0`` from a foreign peer): its dialable addresses
        go to the peer store, our observed address is noted, callbacks run."""
        info.listen_addrs = [a for a in info.listen_addrs if is_dialable_addr(a)]
        self.peer_info[peer] = info
        usable = self._dialable_from_here(peer, info.listen_addrs)
        if usable:
            self._node.add_addrs(peer, usable)
        if info.observed_addr is not None:
            self.observed_by[peer] = info.observed_addr
        for callback in list(self._identified_cbs):
            callback(info)

    def _dialable_from_here(self, peer: PeerId, addrs: list[Multiaddr]) -> list[Multiaddr]:
        """Loopback and Unix addresses are only meaningful if the peer is on this host."""
        conn = self._node.connection_to(peer)
        remote = conn.remote_addr if conn is not None else None
        same_host = conn is not None and (
            conn.transport == "unix" or (remote is not None and remote.is_loopback())
        )
        return [a for a in addrs if same_host or not a.is_loopback()]

    async def ping(self, peer: PeerId, timeout: float = 10.0) -> float:
        """Round-trip time in seconds."""
        nonce = os.urandom(PING_PAYLOAD_LEN)
        start = time.perf_counter()
        reply = await self._node.call(peer, PING_PROTOCOL, nonce, timeout=timeout)
        elapsed = time.perf_counter() - start
        if reply != nonce:
            raise MeshError(f"ping reply from {peer} does not echo the request")
        return elapsed
