"""Asyncio driver of the DHT core over mesh RPC: ``DhtService(node)``.

It registers ``/latticaray/dht/1`` on a :class:`~latticaray.mesh.node.MeshNode`, answers requests
with :meth:`DhtCore.handle_request` (the caller's identity is the connection's authenticated peer
ID, never a claim in the message), and runs client operations by sending each request the core
asks for as one unary RPC with a deadline. Record expirations are wall-clock (``time.time()``) so
that every node reads them alike; the core never reads the clock itself.

The same DHT speaks libp2p Kademlia with foreign libp2p nodes (js, go, rust; Lattica's
``/lattica/1.0.0``): in server mode it serves ``kad_protocol`` (``/ipfs/kad/1.0.0`` by default)
as a libp2p stream protocol, answered from the same core (:mod:`.kadwire` translates), and a
request to a peer that speaks no latticaray RPC goes to it as a kad message. Foreign peers join
the routing table when their identify lists the kad protocol (libp2p's client/server rule); a
latticaray peer is always asked over RPC (the native protocol is preferred).

The addresses this node puts in its DHT contact (sent with every request, returned by other nodes
for ``find_peer``) are the node's ``advertised_addrs``, kept current through
``node.on_addrs_changed``: a private node's relay circuit addresses reach the DHT that way. The
request handler never awaits, so it is registered as an eager RPC handler (no task per request).
Serving is a public service; given ``ServeLimits`` (a runtime node does), requests of peers that
are not ``exempt`` (its members) are rate-limited per peer and per source IP, or refused when the
node does not serve the public.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from latticaray.observe import metrics

from ..errors import MeshError
from ..identity import PeerId, PeerIdError
from ..libp2p.errors import ProtobufError
from ..libp2p.kad import (
    DEFAULT_KAD_PROTOCOL,
    MAX_KAD_MESSAGE,
    MAX_REQUESTS_PER_STREAM,
    KadClient,
    KadMessage,
    MessageType,
)
from ..multiaddr import Multiaddr
from ..ratelimit import KeyedRateLimiter
from .config import DhtConfig
from .core import DhtCore
from .errors import DhtError, DhtOperationFailed, DhtProtocolError, RecordRejected
from .kadwire import core_request, core_response, kad_answer, kad_request, provider_key
from .keyspace import Contact, dht_id
from .lookups import Operation
from .messages import PING, PROTOCOL_ID, decode_request, decode_response, encode, error_response
from .records import Record, RecordValidator

__all__ = ["DhtService", "DhtValue", "ProviderInfo", "ServeLimits"]

log = logging.getLogger(__name__)

#: At most this many of our addresses go into our DHT contact (circuit addresses come first).
MAX_OWN_ADDRS = 8

#: What ``get`` returns per slot: a verified record (``.value``, ``.expiration``, ``.publisher``
#: peer-ID bytes, ``.subkey``, ``.signature``).
DhtValue = Record


_OPERATION_NAMES = {
    "FindNodeOp": "find_node",
    "GetValueOp": "get_value",
    "GetProvidersOp": "get_providers",
    "StoreOp": "store",
}
_SERVED = metrics.DHT_OPERATIONS.labels("serve", "ok")
_SERVED_REFUSED = metrics.DHT_OPERATIONS.labels("serve", "refused")


def _count_operation(op: Operation) -> None:
    """An operation this node ran, in the metrics: its kind and how it ended (ok: it found or
    stored something; empty: it ended without; stopped: its caller stopped early)."""
    kind = _OPERATION_NAMES.get(type(op).__name__, "other")
    if not op.done:
        outcome = "stopped"
    else:
        outcome = "ok" if getattr(op, "result", None) else "empty"
    metrics.DHT_OPERATIONS.labels(kind, outcome).add()


@dataclass(frozen=True)
class ServeLimits:
    """Who this node answers DHT requests for, and how fast (a public service).

    ``public``: answer any peer (peer discovery for all); else only ``exempt`` peers (a mesh's
    members). Peers not exempt are held to ``per_peer_rate`` requests per second (bursts of
    ``per_peer_burst``) and, together, to ``per_ip_rate`` per source IP (bursts of
    ``per_ip_burst``); over it a request is answered ``rate_limited``, unread."""

    public: bool = True
    per_peer_rate: float = 50.0
    per_peer_burst: int = 500  # a bootstrap's bucket refreshes ask each of a few peers ~250 times
    per_ip_rate: float = 200.0
    per_ip_burst: int = 2000


@dataclass(frozen=True)
class ProviderInfo:
    """A provider found by ``find_providers``: its peer ID and the addresses it announced."""

    peer_id: PeerId
    addrs: list[Multiaddr]


def _parse_addrs(addrs: tuple[str, ...]) -> list[Multiaddr]:
    out = []
    for text in addrs:
        try:
            out.append(Multiaddr.parse(text))
        except (MeshError, ValueError):
            continue
    return out


class DhtService:
    """One node's DHT over its :class:`MeshNode`. See docs/architecture.md (DHT contract)."""

    def __init__(
        self,
        node: Any,
        config: DhtConfig | None = None,
        *,
        validators: dict[bytes, RecordValidator] | None = None,
        clock: Callable[[], float] = time.time,
        maintenance_interval: float = 60.0,
        limits: ServeLimits | None = None,
        exempt: Callable[[PeerId], bool] | None = None,
        kad_protocol: str | None = DEFAULT_KAD_PROTOCOL,
    ) -> None:
        self.node = node
        self.clock = clock
        #: The libp2p Kademlia protocol ID spoken with foreign peers (None: RPC only).
        self.kad_protocol = kad_protocol
        self.limits = limits  # None: every peer served, no limit (a node outside any mesh)
        self.exempt = exempt
        if limits is not None:
            self._per_peer = KeyedRateLimiter(limits.per_peer_rate, limits.per_peer_burst)
            self._per_ip = KeyedRateLimiter(limits.per_ip_rate, limits.per_ip_burst)
        self.maintenance_interval = maintenance_interval
        self.core = DhtCore(
            node.peer_id.to_bytes(),
            addrs=self._own_addrs(),
            config=config,
            validators=validators,
            now=clock(),
        )
        self._tasks: set[asyncio.Task] = set()
        self._maintenance: asyncio.Task | None = None
        self._closed = False
        if hasattr(node, "on_addrs_changed"):
            node.on_addrs_changed(self._refresh_addrs)
        try:
            node.register_unary(PROTOCOL_ID, self._handle, eager=True)
        except TypeError:  # a node object without eager handlers (test doubles)
            node.register_unary(PROTOCOL_ID, self._handle)
        self._kad = KadClient(
            kad_protocol or DEFAULT_KAD_PROTOCOL, timeout=self.config.request_timeout
        )
        self._libp2p = kad_protocol is not None and hasattr(node, "register_stream")
        if self._libp2p:
            if self.config.server_mode:  # advertised by identify: clients do not serve
                node.register_stream(kad_protocol, self._handle_kad)
            node.identify_service.on_identified(self._on_identified)
            for info in list(node.identify_service.peer_info.values()):
                self._on_identified(info)  # peers identified before this service existed

    @property
    def config(self) -> DhtConfig:
        return self.core.config

    # lifecycle -------------------------------------------------------------------------------
    async def bootstrap(self, addrs: list | None = None, refresh: bool = True) -> int:
        """Join the DHT: connect to ``addrs`` (multiaddrs with /p2p/; default: the node's
        configured bootstrap addresses) and use them and every peer the node is already connected
        to as seeds, look ourselves up, then refresh every bucket farther than our nearest
        neighbour. Starts periodic maintenance. Returns the routing table size."""
        self._refresh_addrs()
        if addrs is None:
            addrs = list(getattr(getattr(self.node, "config", None), "bootstrap", None) or ())
        seeds: dict[bytes, Contact] = {}
        for addr in addrs:
            try:
                peer = await self.node.connect(addr, timeout=self.config.request_timeout)
            except (TimeoutError, MeshError, OSError) as exc:
                log.warning("DHT bootstrap peer %s unreachable: %s", addr, exc)
                continue
            seeds[peer.to_bytes()] = Contact(peer.to_bytes(), (str(addr),))
        for peer in self.node.connected_peers():
            if peer.to_bytes() not in seeds:
                known = tuple(str(a) for a in self.node.addrs_of(peer))[:8]
                seeds[peer.to_bytes()] = Contact(peer.to_bytes(), known)
        for _attempt in range(3):  # a lost datagram must not leave us alone: retry the seeds
            await self._run(self.core.bootstrap(list(seeds.values()), self.clock()))
            if len(self.core.routing) or not seeds:
                break
        if refresh:
            await asyncio.gather(
                *(self._run(op) for op in self.core.refresh_ops(self.clock(), True))
            )
        self.start()
        return len(self.core.routing)

    def start(self) -> None:
        """Start periodic maintenance (expiry sweeps, refresh, republish); idempotent."""
        if self._maintenance is None and not self._closed:
            self._maintenance = asyncio.ensure_future(self._maintenance_loop())

    async def close(self) -> None:
        """Stop maintenance and in-flight background work and unregister the service."""
        self._closed = True
        with contextlib.suppress(Exception):
            self.node.unregister(PROTOCOL_ID)
        if self._libp2p and self.config.server_mode:
            with contextlib.suppress(Exception):
                self.node.unregister_stream(self.kad_protocol)
        tasks = [t for t in [self._maintenance, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        self._maintenance = None

    # public API ------------------------------------------------------------------------------
    async def put(
        self, key: bytes, value: bytes, expiration: float, subkey: bytes | None = None
    ) -> int:
        """Sign and store ``value`` under (key, subkey) on the key's k closest nodes until
        ``expiration`` (wall-clock seconds); republished until then. Returns how many nodes hold it.

        Raises :class:`RecordRejected` if the record is invalid (too big, expired, a key we may not
        write) or every node refused it, :class:`DhtOperationFailed` if no node could be reached.
        """
        record = Record.create(
            bytes(key),
            bytes(value),
            float(expiration),
            self.node.key,
            subkey=None if subkey is None else bytes(subkey),
        )
        op = await self._run(self.core.put([record], self.clock()))
        if op.result == 0:
            if op.errors:
                reason = max(op.errors, key=op.errors.get)
                if reason != "unreachable":
                    raise RecordRejected(reason, f"every node refused the record ({op.errors})")
            raise DhtOperationFailed(f"record for {key[:60]!r} could not be stored on any node")
        return op.result

    async def get(
        self, key: bytes, quorum: int | None = None
    ) -> Record | dict[bytes | None, Record] | None:
        """The freshest verified value of ``key``: a record, or a dict subkey -> record when the
        key holds subkeys (the plain slot then appears under ``None``), or None if not found.

        By default the lookup reads every one of the key's k closest nodes (complete subkey maps);
        ``quorum=q`` returns once q nodes have answered with records (lower latency)."""
        op = await self._run(self.core.get_value(bytes(key), self.clock(), quorum))
        records = op.result
        if not records:
            return None
        if list(records) == [None]:
            return records[None]
        return dict(records)

    async def provide(self, cid: bytes) -> int:
        """Announce this node as a provider of ``cid`` (re-announced periodically). A CID is
        announced under its multihash, as libp2p does, so foreign nodes find us too."""
        op = await self._run(self.core.add_provider(provider_key(bytes(cid)), self.clock()))
        return op.result

    def stop_providing(self, cid: bytes) -> None:
        """No longer re-announce ``cid`` (records already stored expire with their TTL)."""
        self.core.stop_providing(provider_key(bytes(cid)))

    async def find_providers(self, cid: bytes, count: int = 20) -> AsyncIterator[ProviderInfo]:
        """Providers of ``cid``, yielded as they are found (at most ``count``). Their addresses
        are also added to the node's peer store so they can be dialed at once."""
        key = provider_key(bytes(cid))
        op = self.core.get_providers(key, count + 1, self.clock())  # +1: we may be one
        me = self.core.peer_id
        given = 0
        async with contextlib.aclosing(self._steps_with_start(op)) as steps:
            async for _ in steps:
                for contact in op.take_new():
                    if contact.peer_id != me and given < count:
                        given += 1
                        yield self._provider_info(contact)
                if given >= count:
                    return

    async def find_peer(self, peer_id: PeerId) -> list[Multiaddr]:
        """Addresses of ``peer_id``: from the peer store if known, else from a DHT lookup."""
        known = self.node.addrs_of(peer_id)
        if known:
            return known
        pid = peer_id.to_bytes()
        contact = self.core.routing.get(pid)
        if contact is None or not contact.addrs:
            op = await self._run(self.core.find_node(dht_id(pid), self.clock(), key=pid))
            contact = next((c for c in op.result if c.peer_id == pid), None)
            if contact is None:
                contact = op.seen(pid)
        if contact is None or not contact.addrs:
            return []
        addrs = _parse_addrs(contact.addrs)
        with contextlib.suppress(MeshError, ValueError):
            self.node.add_addrs(peer_id, addrs)
        return addrs

    # driving operations ----------------------------------------------------------------------
    async def _run(self, op: Operation) -> Any:
        async for _ in self._steps(op):
            pass
        return op

    async def _steps_with_start(self, op: Operation) -> AsyncGenerator[None]:
        """Like :meth:`_steps`, but yields once first (for results known before any request)."""
        yield
        async with contextlib.aclosing(self._steps(op)) as steps:
            async for _ in steps:
                yield

    async def _steps(self, op: Operation) -> AsyncGenerator[None]:
        """Drive ``op`` to completion, yielding after each batch of responses."""
        pending: dict[asyncio.Task, Contact] = {}
        try:
            while True:
                for contact, request in op.next_requests(self.clock()):
                    task = asyncio.ensure_future(self._request(contact, request))
                    pending[task] = contact
                self._send_pings()
                if op.done or not pending:
                    return
                deadline = op.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - self.clock()) + 0.001
                done, _ = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                now = self.clock()
                for task in done:
                    contact = pending.pop(task)
                    response = task.result()
                    if response is None:
                        op.on_failure(contact, now)
                    else:
                        op.on_response(contact, response, now)
                if done:
                    yield
        finally:
            for task in pending:
                task.cancel()
            _count_operation(op)

    async def _request(self, contact: Contact, request: dict[str, Any]) -> dict[str, Any] | None:
        """One request (an RPC, or a kad message to a foreign peer); None if the peer could not
        be reached, timed out or answered garbage."""
        try:
            peer = PeerId.from_bytes(contact.peer_id)
        except PeerIdError:
            return None
        if contact.addrs and not self.node.connection_to(peer):
            with contextlib.suppress(MeshError, ValueError):
                self.node.add_addrs(peer, _parse_addrs(contact.addrs))
        if self._libp2p:
            try:
                conn = await self.node.connections.get(peer, self.config.request_timeout)
                native = await conn.wait_native(self.config.request_timeout)
            except (TimeoutError, MeshError, OSError) as exc:
                log.debug("DHT request to %s failed: %s", peer, exc)
                return None
            if not native and conn.raw.muxer is not None:
                return await self._kad_request(conn.raw.muxer, request)
        try:
            raw = await self.node.call(
                peer, PROTOCOL_ID, encode(request), timeout=self.config.request_timeout
            )
            return decode_response(raw)
        except DhtProtocolError as exc:
            log.debug("bad DHT response from %s: %s", peer, exc)
            return None
        except (TimeoutError, MeshError, OSError) as exc:
            log.debug("DHT request to %s failed: %s", peer, exc)
            return None

    async def _kad_request(self, muxer: Any, request: dict[str, Any]) -> dict[str, Any] | None:
        message = kad_request(request, self.core.contact)
        if message is None:  # nothing a foreign node can answer (a lookup without its key)
            return {"peers": []}
        try:
            answer = await self._kad.request(muxer, message)
            return core_response(request, message, answer)
        except (TimeoutError, MeshError, OSError, ProtobufError) as exc:
            log.debug("kad request to %s failed: %s", muxer.remote_peer_text, exc)
            return None

    def _send_pings(self) -> None:
        for contact in self.core.take_pings():
            self._spawn(self._ping(contact))

    async def _ping(self, contact: Contact) -> None:
        response = await self._request(contact, self.core.request(PING))
        self.core.ping_done(contact, response is not None and "error" not in response, self.clock())

    def _spawn(self, coro) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _provider_info(self, contact: Contact) -> ProviderInfo:
        peer = PeerId.from_bytes(contact.peer_id)
        addrs = _parse_addrs(contact.addrs)
        if addrs and peer != self.node.peer_id:
            with contextlib.suppress(MeshError, ValueError):
                self.node.add_addrs(peer, addrs)
        return ProviderInfo(peer, addrs)

    def _own_addrs(self) -> tuple[str, ...]:
        addrs = getattr(self.node, "advertised_addrs", None)
        if addrs is None:
            addrs = getattr(self.node, "listen_addrs", None) or ()
        return tuple(str(a) for a in addrs)[:MAX_OWN_ADDRS]

    def _refresh_addrs(self) -> None:
        if not self._closed:
            self.core.addrs = self._own_addrs()

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.maintenance_interval)
            try:
                ops = self.core.maintenance(self.clock())
                for i in range(0, len(ops), 8):
                    await asyncio.gather(*(self._run(op) for op in ops[i : i + 8]))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("DHT maintenance round failed")

    # serving ---------------------------------------------------------------------------------
    def _refusal(self, caller: PeerId, ip: str | None) -> tuple[str, str] | None:
        """Why a request of ``caller`` from ``ip`` is not served (this node is not public, or
        the peer is over its rate and not exempt) as (code, message), else None. Requests of
        RPC and of libp2p Kademlia count alike."""
        if self.limits is None or (self.exempt is not None and self.exempt(caller)):
            return None
        if not self.limits.public:
            self.core.stats["refused_private"] = self.core.stats.get("refused_private", 0) + 1
            return "refused", "this node serves its DHT to members only"
        now = self.clock()
        if not self._per_peer.take(caller, now) or (
            ip is not None and not self._per_ip.take(ip, now)
        ):
            self.core.stats["rate_limited"] = self.core.stats.get("rate_limited", 0) + 1
            return "rate_limited", "too many DHT requests; slow down"
        return None

    async def _handle(self, ctx: Any, payload: bytes) -> bytes:
        # Registered eager: it must not await, nor use asyncio.timeout()/current_task().
        ip = getattr(getattr(ctx, "remote_addr", None), "host", None)
        refused = self._refusal(ctx.peer_id, ip)
        if refused is not None:
            _SERVED_REFUSED.add()
            return encode(error_response(*refused))
        try:
            request = decode_request(payload)
        except DhtProtocolError as exc:
            self.core.stats["bad_requests"] += 1
            _SERVED_REFUSED.add()
            return encode(error_response("bad_request", str(exc)))
        _SERVED.add()
        try:
            caller = ctx.peer_id
            addrs = request.get("addrs") or tuple(str(a) for a in self.node.addrs_of(caller))[:8]
            sender = Contact(caller.to_bytes(), tuple(addrs))
            response = self.core.handle_request(sender, request, self.clock())
            self._send_pings()
            return encode(response)
        except DhtError as exc:
            return encode(error_response("refused", str(exc)))

    # libp2p Kademlia -------------------------------------------------------------------------
    def _on_identified(self, info: Any) -> None:
        """A peer whose identify lists our kad protocol is a DHT server (libp2p's rule)."""
        if self._closed or self.kad_protocol not in info.protocols:
            return
        addrs = tuple(str(a.with_peer(info.peer_id)) for a in info.listen_addrs)[:8]
        self.core.peer_responded(Contact(info.peer_id.to_bytes(), addrs), self.clock())
        self._send_pings()

    async def _handle_kad(self, stream: Any) -> None:
        """Answer a foreign peer's kad requests (several per stream, as go and rust send)."""
        peer = stream.connection.mesh_peer_id
        ip = getattr(getattr(stream.connection, "remote_multiaddr", None), "host", None)
        info = self.node.identify_service.peer_info.get(peer)
        server = info is not None and self.kad_protocol in info.protocols
        for _ in range(MAX_REQUESTS_PER_STREAM):
            data = await stream.read_message(MAX_KAD_MESSAGE)
            if data is None:
                break
            refused = self._refusal(peer, ip)
            if refused is not None:  # kad has no error message: the stream is reset
                log.debug("kad request from %s refused: %s", peer, refused[1])
                stream.reset()
                return
            message = KadMessage.decode(data)
            request = core_request(
                message,
                peer.to_bytes(),
                server=server,
                provider_ttl=self.config.provider_ttl,
            )
            if request is None:
                if message.type is MessageType.ADD_PROVIDER:
                    continue
                break  # a record we do not take: no echo tells the putter so
            addrs = request.get("addrs") or tuple(str(a) for a in self.node.addrs_of(peer))[:8]
            try:
                response = self.core.handle_request(
                    Contact(peer.to_bytes(), tuple(addrs)), request, self.clock()
                )
            except DhtError as exc:
                log.debug("kad request from %s refused: %s", peer, exc)
                break
            self._send_pings()
            answer = kad_answer(message, response)
            if answer is not None:
                await stream.write_message(answer.encode())
            elif message.type is not MessageType.ADD_PROVIDER:
                break
        await stream.close()
