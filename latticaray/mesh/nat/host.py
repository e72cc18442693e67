"""The asyncio driver of NAT traversal: one node's reachability, relaying and hole punching.

:class:`NatNode` owns the node's QUIC transport (ONE shared UDP socket), and runs over it:

* the NAT control plane: small datagrams prefixed with :data:`MAGIC` (first byte 0x1a, which is
  never a QUIC packet) that the transport hands over as "unknown datagrams": observed-address
  requests (STUN-like), AutoNAT dial requests/responses/dial-backs, and hole-punch packets;
* AutoNAT (client, and server on public nodes; dial-backs leave from a *separate* socket);
* NAT type detection from the mapped addresses several public nodes observe, or one public node
  on its main and its alternate observer port (an AutoNAT server answers ``obs_req`` on a second
  socket too and names that port in its ``obs`` replies);
* a relay reservation (TCP+TLS, :mod:`relay_transport`) and relayed RPC sessions whose bytes are
  an end-to-end TLS session (:mod:`tunnel`);
* DCUtR-style upgrades of relayed connections to direct QUIC: synchronized spraying, and
  birthday probing when exactly one side is behind an endpoint-dependent NAT; the relay stays as
  fallback and :class:`PathMetrics` say which path each peer uses.

Until the mesh's ``MeshNode`` takes these pieces over, ``NatNode`` is also a small standalone
peer (``register_unary`` / ``call``), which is what the netlab tests and ``bench/nat_matrix.py`` run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import (
    MeshError,
    MultiaddrError,
    PeerIdMismatch,
    PeerUnreachable,
    RpcConnectionLost,
    RpcError,
)
from ..identity import KeyPair, PeerId
from ..multiaddr import Multiaddr
from ..rpc import RpcRouter, RpcSession
from ..transport.quic import QuicConfig, QuicConn, QuicTransport
from . import autonat, wire
from .addresses import AddressPolicy, Endpoint, check_endpoint
from .autonat import (
    AutoNatClient,
    AutoNatClientConfig,
    AutoNatServer,
    AutoNatServerConfig,
    Reachability,
)
from .birthday import BirthdayConfig, EasySideProber, HardSidePlan
from .errors import DialBackRefused, MalformedMessage, NatError
from .holepunch import (
    GiveUp,
    HolePunchConfig,
    HolePunchSession,
    PathMetrics,
    PunchMode,
    PunchSucceeded,
    Role,
    SendMessage,
    StartPunch,
)
from .nattype import NatReport, NatType, NatTypeDetector
from .relay import RelayConfig, ReservationKeeper
from .relay_transport import RelayClient, RelayServer
from .rendezvous import PROTOCOL_ID as RENDEZVOUS_SERVICE
from .rendezvous import RendezvousConfig, RendezvousServer
from .tcp_punch import simultaneous_open
from .tunnel import SecureTunnel, StreamPair

log = logging.getLogger(__name__)

MAGIC = b"\x1aLR1"
DCUTR_SERVICE = "/latticaray/dcutr/1"
PING_SERVICE = "/latticaray/nat/ping/1"
MAX_CONTROL_DATAGRAM = 2048


def parse_relay_addr(text: str) -> tuple[PeerId, str, int]:
    """``/ip4/HOST/tcp/PORT/p2p/RELAY`` -> (relay peer, host, port)."""
    addr = Multiaddr.parse(text)
    if addr.transport != "tcp" or addr.peer_id is None or addr.host is None:
        raise MultiaddrError(f"a relay address must be /ip4|ip6/../tcp/../p2p/<relay>: {text}")
    return addr.peer_id, addr.host, addr.port


@dataclass
class NatNodeConfig:
    #: Bootstrap lists: observers/AutoNAT servers (QUIC endpoints of public nodes) and relays
    #: (``/ip4/../tcp/../p2p/<relay>`` multiaddrs), used by :meth:`NatNode.auto_configure`.
    observers: tuple[Endpoint, ...] = ()
    relays: tuple[str, ...] = ()
    listen_host: str = "0.0.0.0"
    quic_port: int = 0
    policy: AddressPolicy = field(default_factory=AddressPolicy)
    serve_autonat: bool = False
    observer_alt_port: int = 0  # AutoNAT servers answer obs_req here too (0: any port)
    serve_relay: bool = False
    relay_port: int = 0
    relay_config: RelayConfig = field(default_factory=RelayConfig)
    relay_capture: bool = False
    serve_rendezvous: bool = False
    rendezvous: RendezvousConfig = field(default_factory=RendezvousConfig)
    hole_punching: bool = True
    punch_protocol: str = "quic"  # "quic" (UDP spraying) or "tcp" (simultaneous open)
    tcp_port: int = 0  # local TCP port for simultaneous open (0: no TCP punching)
    punch_budget: float = 3.0  # seconds of spraying per attempt
    punch: HolePunchConfig = field(default_factory=HolePunchConfig)
    birthday: BirthdayConfig = field(default_factory=BirthdayConfig)
    direct_dial_timeout: float = 2.0
    relay_drain_timeout: float = 30.0  # after an upgrade, open relayed calls get this long
    happy_eyeballs_delay: float = 0.25
    autonat_client: AutoNatClientConfig = field(default_factory=AutoNatClientConfig)
    autonat_server: AutoNatServerConfig = field(default_factory=AutoNatServerConfig)
    quic: QuicConfig = field(default_factory=lambda: QuicConfig(handshake_timeout=3.0))


@dataclass
class PeerLink:
    """Everything this node has to one peer: its sessions per path and the path metrics."""

    peer: PeerId
    metrics: PathMetrics
    relayed: RpcSession | None = None
    direct: RpcSession | None = None
    direct_conn: QuicConn | None = None
    direct_path: str = "direct"
    direct_ready: asyncio.Event = field(default_factory=asyncio.Event)
    upgrade_task: asyncio.Task | None = None
    dcutr: HolePunchSession | None = None  # the responder's coordination, if any
    pending_path: str | None = None  # label for the direct path a punch will bring

    def best(self) -> RpcSession | None:
        if self.direct is not None and not self.direct.closed:
            return self.direct
        if self.relayed is not None and not self.relayed.closed:
            return self.relayed
        return None

    @property
    def path(self) -> str:
        if self.direct is not None and not self.direct.closed:
            return self.direct_path
        if self.relayed is not None and not self.relayed.closed:
            return "relayed"
        return "none"


class _StreamHandle:
    """What a PeerLink keeps of a direct stream connection (TCP): its address and a close."""

    def __init__(self, addr: Endpoint, tunnel: SecureTunnel) -> None:
        self.addr = addr
        self._tunnel = tunnel

    def close(self, reason: str = "closed") -> None:
        self._tunnel.close()


def _close_unused_tunnel(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class _AltObserver(asyncio.DatagramProtocol):
    """An AutoNAT server's alternate observer socket: answers ``obs_req`` and nothing else."""

    def __init__(self, node: NatNode) -> None:
        self.node = node
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if not data.startswith(MAGIC) or len(data) > MAX_CONTROL_DATAGRAM:
            return
        source = (addr[0].removeprefix("::ffff:"), addr[1])
        try:
            msg = wire.decode(data[len(MAGIC) :], MAX_CONTROL_DATAGRAM)
            if msg["t"] != "obs_req":
                raise MalformedMessage("the alternate observer port answers obs_req only")
            txid = wire.get_int(msg, "id", 0, 2**63)
        except NatError as exc:
            self.node._count("control_rejected")
            log.debug("datagram to the alternate observer port from %s rejected: %s", source, exc)
            return
        self.transport.sendto(MAGIC + wire.encode("obs", id=txid, a=list(source)), source)


class NatNode:
    """A node's NAT-traversal side over its shared QUIC socket (see the module docstring)."""

    def __init__(
        self,
        key: KeyPair | None = None,
        config: NatNodeConfig | None = None,
        *,
        transport: QuicTransport | None = None,
        router: RpcRouter | None = None,
    ) -> None:
        self.key = key or KeyPair.generate()
        self.config = config or NatNodeConfig()
        self.router = router if router is not None else RpcRouter()
        self._owns_transport = transport is None
        self.transport = (
            transport
            if transport is not None
            else QuicTransport(self.key, self.config.quic, on_connection=self._on_quic)
        )
        self.links: dict[PeerId, PeerLink] = {}
        self.autonat_client = AutoNatClient(self.config.autonat_client, self.config.policy)
        self.autonat_server = AutoNatServer(self.config.autonat_server, self.config.policy)
        self.nat_detector: NatTypeDetector | None = None
        self.nat_report: NatReport | None = None
        self.relay_server: RelayServer | None = None
        self.relay_client = RelayClient(self.key, self._on_relayed_incoming)
        self.relay_info: tuple[PeerId, str, int] | None = None
        self.mapped: dict[Endpoint, Endpoint] = {}  # observer -> mapped endpoint of our socket
        self.stats: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dialback: asyncio.DatagramTransport | None = None
        self._alt_observer: asyncio.DatagramTransport | None = None
        self._alt_ports: dict[Endpoint, int] = {}  # observer -> its alternate port
        self._waiters: dict[int, tuple[asyncio.Future, Endpoint]] = {}
        self._punch_waiters: dict[bytes, Callable[[Endpoint], None]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._extra_transports: list[QuicTransport] = []
        self._rng = random.SystemRandom()
        self.router.register_unary(DCUTR_SERVICE, self._handle_dcutr)
        self.router.register_unary(PING_SERVICE, self._handle_ping)
        self.rendezvous_server: RendezvousServer | None = None
        if self.config.serve_rendezvous:
            self.rendezvous_server = RendezvousServer(self.config.rendezvous)
            self.router.register_unary(RENDEZVOUS_SERVICE, self._handle_rendezvous)
        self._maintenance: asyncio.Task | None = None
        self.reservations = ReservationKeeper()
        self._relay_addrs: dict[str, tuple[PeerId, str, int]] = {}
        self._keeper: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    @property
    def local_endpoint(self) -> Endpoint:
        host, port = self.transport.local_address[:2]
        return (host, port)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._owns_transport:
            await self.transport.listen(self.config.listen_host, self.config.quic_port)
        elif self.transport.local_address is None:
            raise RuntimeError("the shared QUIC transport must be listening before NAT starts")
        self.transport.unknown_datagram_handler = self._on_datagram
        self.nat_detector = NatTypeDetector(self._local_endpoints())
        if self.config.serve_autonat:
            self._dialback, _ = await self._loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=(self.config.listen_host, 0)
            )
            self._alt_observer, _ = await self._loop.create_datagram_endpoint(
                lambda: _AltObserver(self),
                local_addr=(self.config.listen_host, self.config.observer_alt_port),
            )
        if self.config.serve_relay:
            self.relay_server = RelayServer(
                self.key,
                self.config.relay_config,
                self.config.listen_host,
                self.config.relay_port,
                capture=self.config.relay_capture,
            )
            await self.relay_server.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links.values():
            for session in (link.direct, link.relayed):
                if session is not None:
                    session.close("node stopping")
        await self.relay_client.close()
        if self.relay_server is not None:
            await self.relay_server.stop()
        if self._dialback is not None:
            self._dialback.close()
        if self._alt_observer is not None:
            self._alt_observer.close()
        for extra in self._extra_transports:
            await extra.close()
        if self._owns_transport:
            await self.transport.close()
        elif self.transport.unknown_datagram_handler == self._on_datagram:
            self.transport.unknown_datagram_handler = None

    def _spawn(self, coro) -> asyncio.Task:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    def _local_endpoints(self) -> list[Endpoint]:
        host, port = self.local_endpoint
        if host not in ("0.0.0.0", "::"):
            return [(host, port)]
        names = set()  # interface addresses of this network namespace (no DNS lookups)
        try:
            import psutil

            for addrs in psutil.net_if_addrs().values():
                for a in addrs:
                    if a.family == socket.AF_INET:
                        names.add(a.address)
        except Exception:
            pass
        return [
            (ip, port)
            for ip in sorted(names)
            if not ip.startswith("127.") and self.config.policy.is_routable_candidate(ip)
        ]

    # -- services --------------------------------------------------------------------------
    def register_unary(self, service: str, handler) -> None:
        self.router.register_unary(service, handler)

    async def _handle_ping(self, ctx, payload: bytes) -> bytes:
        return bytes(payload)

    async def _handle_rendezvous(self, ctx, payload: bytes) -> bytes:
        return self.rendezvous_server.handle(str(ctx.peer_id), bytes(payload), self._loop.time())

    # -- periodic upkeep ----------------------------------------------------------------------
    def start_maintenance(self, servers: list[Endpoint], max_interval: float = 60.0) -> None:
        """Re-run AutoNAT whenever an address is due a re-check (at most ``max_interval`` apart)."""

        async def loop() -> None:
            while True:
                due = self.autonat_client.next_timer()
                delay = (
                    max_interval
                    if due is None
                    else min(max_interval, max(1.0, due - self._loop.time()))
                )
                await asyncio.sleep(delay)
                try:
                    await self.check_reachability(servers)
                except (MeshError, OSError) as exc:
                    log.info("AutoNAT re-check failed: %s", exc)

        if self._maintenance is None:
            self._maintenance = self._spawn(loop())

    # -- control plane datagrams ------------------------------------------------------------
    def _send_control(self, addr: Endpoint, data: bytes) -> None:
        self.transport.send_raw(addr, MAGIC + data)

    def _on_datagram(self, data: bytes, addr: tuple) -> None:
        if not data.startswith(MAGIC) or len(data) > MAX_CONTROL_DATAGRAM:
            self._count("datagrams_ignored")
            return
        source = (addr[0].removeprefix("::ffff:"), addr[1])
        try:
            msg = wire.decode(data[len(MAGIC) :], MAX_CONTROL_DATAGRAM)
            self._dispatch_control(msg, source)
        except NatError as exc:
            self._count("control_rejected")
            log.debug("control datagram from %s rejected: %s", source, exc)

    def _dispatch_control(self, msg: dict, source: Endpoint) -> None:
        kind = msg["t"]
        now = self._loop.time()
        if kind == "obs_req":
            txid = wire.get_int(msg, "id", 0, 2**63)
            alt = self.alt_observer_port
            extra = {"ap": alt} if alt else {}
            self._send_control(source, wire.encode("obs", id=txid, a=list(source), **extra))
        elif kind == "dial":
            if not self.config.serve_autonat:
                raise MalformedMessage("this node does not serve AutoNAT")
            try:
                plan = self.autonat_server.handle_request(source, msg, now)
            except DialBackRefused as exc:
                self._send_control(
                    source, wire.encode("dial_err", id=msg.get("id", 0), s=exc.code, m=exc.message)
                )
                return
            self._send_control(source, plan.response())
            for dial_back in plan.dial_backs:
                self._spawn(self._send_dial_backs(dial_back))
        elif kind in ("obs", "dial_resp", "dial_err"):
            txid = wire.get_int(msg, "id", 0, 2**64 - 1)
            waiter = self._waiters.get(txid)
            if waiter is None:
                raise MalformedMessage(f"{kind} for no request in flight")
            future, expected = waiter
            if source != expected:
                raise MalformedMessage(
                    f"{kind} from {source[0]}:{source[1]}, not from the server asked"
                )
            if not future.done():
                future.set_result((msg, source))
        elif kind == "dial_back":
            self.autonat_client.on_dial_back(msg, source, now)
            self._count("dial_backs_confirmed")
        elif kind == "punch":
            token = wire.get_bytes(msg, "tok", 16, 16)
            waiter = self._punch_waiters.get(token)
            if waiter is None:
                raise MalformedMessage("punch packet with an unknown token")
            waiter(source)
        else:
            raise MalformedMessage(f"unknown control message {kind!r}")

    async def _send_dial_backs(self, dial_back: autonat.DialBack) -> None:
        data = MAGIC + autonat.encode_dial_back(dial_back.nonce)
        for delay in (0.0, 0.2, 0.5)[: self.config.autonat_server.dial_back_copies]:
            await asyncio.sleep(delay)
            if self._dialback is not None:
                self._dialback.sendto(data, dial_back.endpoint)

    async def _request(
        self, addr: Endpoint, msg_type: str, timeout: float = 2.0, tries: int = 4, **fields
    ) -> tuple[dict, Endpoint]:
        txid = self._rng.getrandbits(62) | (1 << 62)  # unguessable, never an AutoNAT probe id
        future = self._loop.create_future()
        self._waiters[txid] = (future, (addr[0], addr[1]))
        try:
            for _ in range(tries):
                self._send_control(addr, wire.encode(msg_type, id=txid, **fields))
                try:
                    return await asyncio.wait_for(asyncio.shield(future), timeout / tries)
                except TimeoutError:
                    continue
            raise PeerUnreachable(f"no answer to {msg_type} from {addr[0]}:{addr[1]}")
        finally:
            self._waiters.pop(txid, None)

    async def _request_raw(
        self, addr: Endpoint, payload: bytes, txid: int, timeout: float, tries: int = 3
    ) -> dict:
        future = self._loop.create_future()
        self._waiters[txid] = (future, (addr[0], addr[1]))
        try:
            for _ in range(tries):
                self._send_control(addr, payload)
                try:
                    return (await asyncio.wait_for(asyncio.shield(future), timeout / tries))[0]
                except TimeoutError:
                    continue
            raise PeerUnreachable(f"no AutoNAT answer from {addr[0]}:{addr[1]}")
        finally:
            self._waiters.pop(txid, None)

    # -- observed addresses, NAT type, reachability -----------------------------------------
    @property
    def alt_observer_port(self) -> int:
        """The port of this node's alternate observer socket (0: it serves none)."""
        return self._alt_observer.get_extra_info("sockname")[1] if self._alt_observer else 0

    def alternate_observers(self) -> dict[Endpoint, Endpoint]:
        """Observer -> its alternate observer endpoint, as learned from ``obs`` replies."""
        return {server: (server[0], port) for server, port in self._alt_ports.items()}

    async def observe(
        self, server: Endpoint, timeout: float = 2.0, *, alternate: bool = False
    ) -> Endpoint:
        """Ask ``server`` which address our shared socket's packets come from. ``alternate``
        marks a server's alternate observer port: it feeds NAT type detection only (the mapping
        it sees is not one other peers would reach us at)."""
        msg, _ = await self._request(server, "obs_req", timeout)
        mapped = check_endpoint(msg.get("a"), "observed address")
        if not alternate:
            self.mapped[server] = mapped
            alt = wire.get_int(msg, "ap", 0, 65535, optional=True, default=0)
            if alt and alt != server[1]:
                self._alt_ports[server] = alt
        self.nat_detector.observe(server, mapped, self._loop.time())
        return mapped

    async def detect_nat(self, servers: list[Endpoint]) -> NatReport:
        results = await asyncio.gather(*(self.observe(s) for s in servers), return_exceptions=True)
        for server, result in zip(servers, results):
            if isinstance(result, Exception):
                log.info("observe via %s failed: %s", server, result)
        report = self.nat_detector.report(self._loop.time())
        if report.nat_type is NatType.UNKNOWN:
            # too few observers: ask their alternate ports (a second destination per observer)
            alternates = [(s[0], self._alt_ports[s]) for s in servers if s in self._alt_ports]
            results = await asyncio.gather(
                *(self.observe(a, alternate=True) for a in alternates), return_exceptions=True
            )
            for server, result in zip(alternates, results):
                if isinstance(result, Exception):
                    log.info("observe via alternate port %s failed: %s", server, result)
        self.nat_report = self.nat_detector.report(self._loop.time())
        return self.nat_report

    async def check_reachability(self, servers: list[Endpoint]) -> Reachability:
        """One AutoNAT round against ``servers`` (their QUIC endpoints)."""
        now = self._loop.time()
        for ep in self._local_endpoints():
            self.autonat_client.add_candidate(ep, now)
        for mapped in set(self.mapped.values()):
            self.autonat_client.add_candidate(mapped, now)
        probes = self.autonat_client.probes_due(now, [(f"{h}:{p}", h) for h, p in servers])

        async def run(probe) -> None:
            host, port = probe.server.rsplit(":", 1)
            try:
                msg = await self._request_raw((host, int(port)), probe.request, probe.probe_id, 3.0)
            except PeerUnreachable:
                return
            try:
                if msg["t"] == "dial_err":
                    self.autonat_client.on_refused(probe.server, probe.probe_id, self._loop.time())
                else:
                    self.autonat_client.on_response(probe.server, msg, self._loop.time())
            except NatError as exc:
                log.info("bad AutoNAT response from %s: %s", probe.server, exc)

        await asyncio.gather(*(run(p) for p in probes))
        deadline = self._loop.time() + self.config.autonat_client.dial_back_timeout
        # dial-backs arrive on other connections, not as an event here: poll, bounded by deadline
        while self._loop.time() < deadline and self.autonat_client.pending_probes:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self.autonat_client.finish_pending(self._loop.time())
        self._addresses_changed()
        return self.autonat_client.reachability()

    async def auto_configure(
        self,
        observers: list[Endpoint] | None = None,
        relays: list[tuple[PeerId, str, int]] | None = None,
        maintain: bool = True,
    ) -> tuple[NatReport, Reachability]:
        """Bootstrap sequence: NAT type from ``observers``, AutoNAT against them, and, if the node
        is not public, a reservation on the first relay that grants one. Without arguments the
        configuration's bootstrap lists are used."""
        if observers is None:
            observers = list(self.config.observers)
        if relays is None:
            relays = [parse_relay_addr(text) for text in self.config.relays]
        report = await self.detect_nat(observers)
        own = set(self._local_endpoints())
        servers = [ep for ep in observers if ep not in own]
        reach = await self.check_reachability(servers)
        if reach is not Reachability.PUBLIC:
            for relay_peer, host, port in relays:
                try:
                    await self.reserve_relay(relay_peer, host, port)
                    break
                except (MeshError, OSError) as exc:
                    log.info("reservation on relay %s failed: %s", relay_peer, exc)
        if maintain:
            self.start_maintenance(servers)
        return report, reach

    @property
    def is_public(self) -> bool:
        return self.autonat_client.reachability() is Reachability.PUBLIC

    def punch_addresses(self) -> list[Endpoint]:
        addrs = list(dict.fromkeys(self.mapped.values()))
        return addrs + [ep for ep in self._local_endpoints() if ep not in addrs]

    # -- relay ----------------------------------------------------------------------------
    async def reserve_relay(
        self, relay_peer: PeerId, host: str, port: int, keep: bool = True
    ) -> None:
        """Reserve a slot on a relay; with ``keep``, re-reserve (with backoff) whenever it drops."""
        await self.relay_client.reserve(relay_peer, host, port)
        self.relay_info = self.relay_info or (relay_peer, host, port)
        self._relay_addrs[str(relay_peer)] = (relay_peer, host, port)
        if keep:
            now = self._loop.time()
            self.reservations.add_relay(str(relay_peer), f"/ip4/{host}/tcp/{port}", now)
            self.reservations.on_reserved(
                str(relay_peer), self.relay_client.reservations[str(relay_peer)].ttl, now
            )
            if self._keeper is None:
                self._keeper = self._spawn(self._keep_reservations())
        self._addresses_changed()

    async def _keep_reservations(self, poll: float = 1.0) -> None:
        while True:
            await asyncio.sleep(poll)
            now = self._loop.time()
            for relay_id, state in list(self.reservations.relays.items()):
                live = self.relay_client.reservations.get(relay_id)
                if live is not None and not live.closed.is_set():
                    continue
                if state.expires > now:  # it just dropped: try again at once
                    state.expires = 0.0
                    state.next_attempt = now
                if state.next_attempt > now:
                    continue
                relay_peer, host, port = self._relay_addrs[relay_id]
                try:
                    await self.relay_client.reserve(relay_peer, host, port)
                    self.reservations.on_reserved(
                        relay_id, self.relay_client.reservations[relay_id].ttl, self._loop.time()
                    )
                    log.info("re-reserved on relay %s", relay_peer)
                except (MeshError, OSError) as exc:
                    self.reservations.on_failed(relay_id, str(exc), self._loop.time())
            self._addresses_changed()

    def _addresses_changed(self) -> None:
        """Hook: the circuit addresses or the AutoNAT verdicts may have changed (MeshNat
        advertises them through its MeshNode)."""

    def public_addresses(self) -> list[str]:
        """AutoNAT-confirmed public QUIC addresses of this node, as multiaddr text."""
        from .addresses import endpoint_to_multiaddr_text

        return [endpoint_to_multiaddr_text(ep) for ep in self.autonat_client.public_addresses()]

    def circuit_addresses(self) -> list[str]:
        """One ``/p2p-circuit`` address per live reservation (what to advertise)."""
        out = []
        for relay_id, reservation in self.relay_client.reservations.items():
            if reservation.closed.is_set():
                continue
            relay_peer, host, port = self._relay_addrs.get(
                relay_id, (reservation.relay_peer, reservation.host, reservation.port)
            )
            out.append(f"/ip4/{host}/tcp/{port}/p2p/{relay_peer}/p2p-circuit/p2p/{self.peer_id}")
        return out

    def circuit_address(self) -> str | None:
        if self.relay_info is None:
            return None
        relay_peer, host, port = self.relay_info
        return f"/ip4/{host}/tcp/{port}/p2p/{relay_peer}/p2p-circuit/p2p/{self.peer_id}"

    def _link(self, peer: PeerId) -> PeerLink:
        link = self.links.get(peer)
        if link is None:
            link = self.links[peer] = PeerLink(peer, PathMetrics(str(peer)))
        return link

    async def _on_relayed_incoming(self, tunnel: SecureTunnel) -> None:
        link = self._link(tunnel.remote_peer)
        if link.relayed is not None and not link.relayed.closed:
            link.relayed.close("replaced by a newer relayed connection")
        link.relayed = RpcSession(tunnel, self.router)
        link.metrics.record(self._loop.time(), "relayed-inbound")
        if link.metrics.path == "none":
            link.metrics.path = "relayed"

    # -- direct QUIC ------------------------------------------------------------------------
    def _on_quic(self, conn: QuicConn) -> None:
        if conn.is_client:
            return  # the dialer attaches its own connection
        self._spawn(self._accept_direct(conn, "direct"))

    async def _accept_direct(self, conn: QuicConn, path: str) -> None:
        try:
            channel = await asyncio.wait_for(conn.accept_channel(), 10.0)
        except (TimeoutError, MeshError):
            conn.close("no channel opened")
            return
        link = self._link(conn.remote_peer)
        pending = link.pending_path
        self._attach_direct(link, conn, RpcSession(channel, self.router), pending or path)

    def _attach_direct(
        self, link: PeerLink, conn: QuicConn, session: RpcSession, path: str
    ) -> None:
        old = link.direct
        link.direct, link.direct_conn, link.direct_path = session, conn, path
        if old is not None and old is not session:
            old.close("replaced by a newer direct connection")
        now = self._loop.time()
        link.metrics.record(now, f"direct:{path}")
        link.metrics.path = path
        if link.relayed is not None and link.metrics.upgraded_at is None:
            link.metrics.upgraded_at = now
        link.direct_ready.set()

        def on_close(_session) -> None:
            if link.direct is session:
                link.direct_ready.clear()
                link.metrics.record(self._loop.time(), "direct-closed")
                link.metrics.path = (
                    "relayed" if link.relayed and not link.relayed.closed else "none"
                )

        session.on_close(on_close)

    async def _dial_direct(
        self,
        peer: PeerId,
        addr: Endpoint,
        path: str,
        transport: QuicTransport | None = None,
        timeout: float | None = None,
    ) -> PeerLink:
        transport = transport or self.transport
        conn = await transport.dial(
            addr, expected_peer=peer, timeout=timeout or self.config.direct_dial_timeout
        )
        session = RpcSession(conn.open_channel(), self.router)
        link = self._link(peer)
        self._attach_direct(link, conn, session, path)
        await session.call(PING_SERVICE, b"hello", timeout=5.0)  # opens the stream at the peer
        return link

    # -- connecting -------------------------------------------------------------------------
    async def connect(
        self,
        peer: PeerId,
        direct_addrs: list[Endpoint] = (),
        relay: tuple[PeerId, str, int] | None = None,
        wait_upgrade: float = 0.0,
    ) -> PeerLink:
        """Reach ``peer``: direct if one of ``direct_addrs`` answers, else through ``relay``
        (then try to upgrade to a direct path in the background, unless punching is off)."""
        link = self._link(peer)
        start = self._loop.time()
        if link.best() is not None:
            return link
        link.metrics.started_at = start

        async def try_direct() -> bool:
            for addr in direct_addrs:
                try:
                    await self._dial_direct(peer, addr, "direct")
                    return True
                except (MeshError, OSError) as exc:
                    log.info("direct dial of %s at %s failed: %s", peer, addr, exc)
            return False

        # happy eyeballs: direct first, the relay joins the race after a short head start
        direct = self._spawn(try_direct()) if direct_addrs else None
        if direct is not None:
            await asyncio.wait({direct}, timeout=self.config.happy_eyeballs_delay)
            if direct.done() and direct.result():
                link.metrics.connected_at = self._loop.time() - start
                return link
        if relay is None:
            if direct is not None and await direct:
                link.metrics.connected_at = self._loop.time() - start
                return link
            raise PeerUnreachable(f"{peer}: no direct address answered and no relay is known")
        relay_peer, host, port = relay
        relayed = self._loop.create_task(self.relay_client.connect(relay_peer, host, port, peer))
        racing = {relayed} | ({direct} if direct is not None else set())
        while True:
            done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            if direct in done and direct.result():
                relayed.add_done_callback(_close_unused_tunnel)
                link.metrics.connected_at = self._loop.time() - start
                return link
            if relayed in done:
                if relayed.exception() is not None and direct is not None and not direct.done():
                    racing = {direct}  # the relay failed: the direct dial may still win
                    continue
                break
            racing = {relayed}
        tunnel = relayed.result()  # raises if the relay failed too
        link.relayed = RpcSession(tunnel, self.router)
        link.metrics.connected_at = self._loop.time() - start
        link.metrics.path = "relayed"
        link.metrics.record(self._loop.time(), "relayed-outbound")
        if self.config.hole_punching:
            link.upgrade_task = self._spawn(self._upgrade_after(link, direct, start))
            if wait_upgrade > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(link.upgrade_task), wait_upgrade)
                except (TimeoutError, Exception):
                    pass
        return link

    async def _upgrade_after(
        self, link: PeerLink, direct: asyncio.Task | None, start: float
    ) -> bool:
        """Hole punch unless the direct dial of ``connect`` already succeeded."""
        if (
            direct is not None
            and direct.done()
            and not direct.cancelled()
            and direct.exception() is None
            and direct.result()
        ):
            return True
        # a direct dial still in flight may yet win; punching does not wait for its timeout
        return await self._upgrade(link, start)

    async def call(
        self, peer: PeerId, service: str, payload: bytes = b"", timeout: float = 10.0
    ) -> bytes:
        """Unary call over the best path; falls back to the relay if the direct path dropped."""
        link = self.links.get(peer)
        session = link.best() if link else None
        if session is None:
            raise PeerUnreachable(f"not connected to {peer}")
        try:
            return await session.call(service, payload, timeout=timeout)
        except RpcConnectionLost:
            fallback = link.best()
            if fallback is None or fallback is session:
                raise
            return await fallback.call(service, payload, timeout=timeout)

    # -- hole punching (DCUtR) --------------------------------------------------------------
    def _our_nat(self) -> NatType:
        return self.nat_report.nat_type if self.nat_report else NatType.UNKNOWN

    async def _upgrade(self, link: PeerLink, start: float) -> bool:
        """Initiator side: coordinate over the relayed session, punch, retry up to 3 times."""
        session = HolePunchSession(
            Role.INITIATOR,
            self.punch_addresses(),
            self._our_nat(),
            self.config.punch,
            our_public=self.is_public,
            our_tcp_port=self._tcp_punch_port(),
        )
        pending = list(session.start(self._loop.time()))
        while True:
            while pending:
                action = pending.pop(0)
                if isinstance(action, SendMessage):
                    if link.relayed is None or link.relayed.closed:
                        return False
                    try:
                        reply = await link.relayed.call(DCUTR_SERVICE, action.data, timeout=5.0)
                    except RpcError as exc:
                        log.info("hole punch coordination with %s failed: %s", link.peer, exc)
                        return False
                    if reply:
                        pending += session.on_message(reply, self._loop.time())
                elif isinstance(action, StartPunch):
                    link.metrics.punch_attempts += 1
                    link.metrics.rtt_relay = session.rtt
                    remote = await self._punch(link, action, initiator=True)
                    pending += session.on_punch_result(action.attempt, remote, self._loop.time())
                elif isinstance(action, PunchSucceeded):
                    log.info(
                        "hole punch with %s: direct (%s, attempt %d, %.2f s)",
                        link.peer,
                        link.pending_path,
                        action.attempt,
                        self._loop.time() - start,
                    )
                    return True
                elif isinstance(action, GiveUp):
                    link.metrics.record(self._loop.time(), f"punch-gave-up: {action.reason}")
                    log.info(
                        "hole punch with %s gave up (%s; we are %s, they are %s)",
                        link.peer,
                        action.reason,
                        self._our_nat().value,
                        session.remote_nat.value,
                    )
                    return False
            timer = session.next_timer()
            if session.done or timer is None:
                return session.state.value == "succeeded"
            await asyncio.sleep(max(0.0, timer - self._loop.time()))
            pending += session.tick(self._loop.time())

    async def _handle_dcutr(self, ctx, payload: bytes) -> bytes:
        link = self._link(ctx.peer_id)
        session = link.dcutr
        msg = wire.decode(bytes(payload))
        if msg["t"] == "hp_connect" or session is None:
            session = HolePunchSession(
                Role.RESPONDER,
                self.punch_addresses(),
                self._our_nat(),
                HolePunchConfig(enabled=self.config.hole_punching),
                our_public=self.is_public,
                our_tcp_port=self._tcp_punch_port(),
            )
            link.dcutr = session
        reply = b""
        for action in session.on_message(bytes(payload), self._loop.time()):
            if isinstance(action, SendMessage):
                reply = action.data
            elif isinstance(action, StartPunch):
                self._spawn(self._responder_punch(link, session, action))
        return reply

    async def _responder_punch(
        self, link: PeerLink, session: HolePunchSession, action: StartPunch
    ) -> None:
        remote = await self._punch(link, action, initiator=False)
        session.on_punch_result(action.attempt, remote, self._loop.time())

    async def _punch(self, link: PeerLink, action: StartPunch, initiator: bool) -> Endpoint | None:
        mode = action.mode
        link.pending_path = {
            PunchMode.BIRTHDAY_EASY: "birthday",
            PunchMode.BIRTHDAY_HARD: "birthday",
            PunchMode.DIAL: "reversal",
            PunchMode.AWAIT: "reversal",
        }.get(mode, "punched")
        delay = action.at - self._loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            if mode is PunchMode.DIAL:
                return await self._punch_dial(link, action)
            if mode is PunchMode.AWAIT:
                return await self._await_direct(link, self.config.punch_budget + 2)
            if mode is PunchMode.DIRECT and self._tcp_punch_port() and action.remote_tcp_port:
                link.pending_path = "tcp-punched"
                return await self._punch_tcp(link, action, initiator)
            if mode is PunchMode.DIRECT:
                return await self._punch_spray(link, action, initiator)
            if mode is PunchMode.BIRTHDAY_EASY:
                return await self._birthday_easy(link, action)
            if mode is PunchMode.BIRTHDAY_HARD:
                return await self._birthday_hard(link, action)
        except (MeshError, OSError) as exc:
            log.info("punch (%s) with %s failed: %s", mode.value, link.peer, exc)
        return None

    def _direct_up(self, link: PeerLink) -> bool:
        return link.direct_ready.is_set()

    async def _await_direct(self, link: PeerLink, timeout: float) -> Endpoint | None:
        try:
            await asyncio.wait_for(link.direct_ready.wait(), timeout)
        except TimeoutError:
            return None
        conn = link.direct_conn
        return (conn.addr[0], conn.addr[1]) if conn else None

    async def _punch_dial(self, link: PeerLink, action: StartPunch) -> Endpoint | None:
        for addr in action.remote_addrs:
            try:
                await self._dial_direct(link.peer, addr, "reversal")
                return addr
            except (MeshError, OSError):
                continue
        return None

    async def _punch_spray(
        self, link: PeerLink, action: StartPunch, initiator: bool
    ) -> Endpoint | None:
        """Both sides spray punch packets; the initiator dials QUIC once the peer's packet arrives."""
        seen: asyncio.Future = self._loop.create_future()

        def on_punch(source: Endpoint) -> None:
            if not seen.done():
                seen.set_result(source)

        self._punch_waiters[action.token] = on_punch
        packet = MAGIC + wire.encode("punch", tok=action.token)
        deadline = self._loop.time() + self.config.punch_budget
        try:
            while self._loop.time() < deadline and not self._direct_up(link):
                for addr in action.remote_addrs:
                    self.transport.send_raw(addr, packet)
                if seen.done() and initiator:
                    remote = seen.result()
                    for _ in range(3):
                        self.transport.send_raw(remote, packet)
                    await self._dial_direct(
                        link.peer, remote, "punched", timeout=max(1.0, deadline - self._loop.time())
                    )
                    return remote
                try:
                    await asyncio.wait_for(asyncio.shield(seen), 0.05)
                except TimeoutError:
                    pass
            if not initiator:
                return await self._await_direct(link, 2.0)
            return None
        finally:
            self._punch_waiters.pop(action.token, None)

    def _tcp_punch_port(self) -> int:
        return self.config.tcp_port if self.config.punch_protocol == "tcp" else 0

    async def _punch_tcp(
        self, link: PeerLink, action: StartPunch, initiator: bool
    ) -> Endpoint | None:
        """TCP simultaneous open to the peer's mapped IP and TCP port; then end-to-end TLS."""
        remote = (action.remote_addrs[0][0], action.remote_tcp_port)
        deadline = self._loop.time() + self.config.punch_budget + 2.0
        sock = await simultaneous_open(
            self.config.tcp_port, remote, deadline, host=self.config.listen_host
        )
        reader, writer = await asyncio.open_connection(sock=sock)
        stream = StreamPair(reader, writer)
        try:
            if initiator:  # roles decide who is the TLS client: no accept() on either side
                tunnel = await SecureTunnel.client(stream, self.key, link.peer, transport="tcp")
            else:
                tunnel = await SecureTunnel.server(stream, self.key, transport="tcp")
                if tunnel.remote_peer != link.peer:
                    tunnel.abort()
                    raise PeerIdMismatch(link.peer, tunnel.remote_peer)
        except BaseException:
            writer.close()
            raise
        self._attach_direct(
            link, _StreamHandle(remote, tunnel), RpcSession(tunnel, self.router), "tcp-punched"
        )
        return remote

    async def _birthday_easy(self, link: PeerLink, action: StartPunch) -> Endpoint | None:
        """We are behind a cone NAT (or none): probe many ports of the hard side's public IP."""
        hard_ips = list(dict.fromkeys(ip for ip, _ in action.remote_addrs))[:1]
        if not hard_ips:
            return None
        hard_ip = hard_ips[0]
        hit: asyncio.Future = self._loop.create_future()

        def on_punch(source: Endpoint) -> None:
            if source[0] == hard_ip and not hit.done():
                hit.set_result(source)

        self._punch_waiters[action.token] = on_punch
        packet = MAGIC + wire.encode("punch", tok=action.token)
        await asyncio.sleep(0.1)  # let the hard side's mappings exist first
        prober = EasySideProber(self.config.birthday, self._loop.time(), self._rng)
        try:
            while (
                not prober.finished(self._loop.time())
                and not hit.done()
                and not self._direct_up(link)
            ):
                for port in prober.next_batch(self._loop.time()):
                    self.transport.send_raw((hard_ip, port), packet)
                try:
                    await asyncio.wait_for(asyncio.shield(hit), 0.02)
                except TimeoutError:
                    pass
            link.metrics.record(self._loop.time(), f"birthday-probes:{prober.probes_sent}")
            if hit.done():
                # the hard side's packet got in (a mapping we probed, maybe in an earlier round):
                # answer it so the hard side learns which of its sockets matched
                prober.on_reply(hit.result()[1])
                for _ in range(3):
                    self.transport.send_raw(hit.result(), packet)
            elif not self._direct_up(link):
                return None
            # the hard side now dials us from the socket that matched
            return await self._await_direct(link, 5.0)
        finally:
            self._punch_waiters.pop(action.token, None)

    async def _birthday_hard(self, link: PeerLink, action: StartPunch) -> Endpoint | None:
        """We are behind a symmetric NAT: open many sockets toward the easy side's mapping."""
        cfg = self.config.birthday
        easy = [a for a in action.remote_addrs if self.config.policy.is_public(a[0])] or list(
            action.remote_addrs
        )
        target = easy[0]
        packet = MAGIC + wire.encode("punch", tok=action.token)
        socks: list[socket.socket] = []
        hit: asyncio.Future = self._loop.create_future()
        try:
            for _ in range(cfg.hard_sockets):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.bind(
                    (self.config.listen_host if self.config.listen_host != "::" else "0.0.0.0", 0)
                )
                socks.append(sock)

            def make_reader(sock: socket.socket):
                def readable() -> None:
                    try:
                        data, src = sock.recvfrom(MAX_CONTROL_DATAGRAM)
                    except OSError:
                        return
                    if data == packet and not hit.done():
                        hit.set_result((sock.getsockname()[1], (src[0], src[1])))

                return readable

            for sock in socks:
                self._loop.add_reader(sock.fileno(), make_reader(sock))
            plan = HardSidePlan(cfg, self._loop.time())
            while not plan.finished(self._loop.time()) and not hit.done():
                if plan.sends_due(self._loop.time()):
                    for sock in socks:
                        try:
                            sock.sendto(packet, target)
                        except OSError:
                            pass
                try:
                    await asyncio.wait_for(
                        asyncio.shield(hit),
                        max(0.01, min(0.1, plan.next_timer() - self._loop.time())),
                    )
                except TimeoutError:
                    pass
            if not hit.done():
                return None
            local_port, easy_endpoint = hit.result()
            hit_sock = next(s for s in socks if s.getsockname()[1] == local_port)
            for _ in range(3):  # tell the easy side which port matched
                try:
                    hit_sock.sendto(packet, easy_endpoint)
                except OSError:
                    pass
        finally:
            for sock in socks:
                try:
                    self._loop.remove_reader(sock.fileno())
                except Exception:
                    pass
                sock.close()
        # re-bind a QUIC endpoint on the socket's port: the NAT mapping belongs to the 5-tuple
        extra = QuicTransport(self.key, self.config.quic, on_connection=self._on_quic)
        await extra.listen(self.config.listen_host, local_port)
        extra.unknown_datagram_handler = self._on_datagram
        self._extra_transports.append(extra)
        await self._dial_direct(link.peer, easy_endpoint, "birthday", transport=extra, timeout=4.0)
        return easy_endpoint

    async def disconnect(self, peer: PeerId) -> None:
        """Close every path to ``peer`` and forget its link (relay reservation stays)."""
        link = self.links.pop(peer, None)
        if link is None:
            return
        if link.upgrade_task is not None:
            link.upgrade_task.cancel()
            await asyncio.gather(link.upgrade_task, return_exceptions=True)
        for session in (link.direct, link.relayed):
            if session is not None:
                await session.aclose("disconnect")
        if link.direct_conn is not None:
            link.direct_conn.close("disconnect")

    # -- introspection ------------------------------------------------------------------------
    def path_of(self, peer: PeerId) -> str:
        link = self.links.get(peer)
        return link.path if link else "none"
