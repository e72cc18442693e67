"""The NAT service of one node: reachability, relaying and hole punching over its shared socket.

:class:`NatService` composes the NAT-traversal pieces on the node's ONE QUIC UDP socket (so the
mapping AutoNAT tests and punches open is the one QUIC uses) and its RPC router:

* :class:`~.control.ControlPlane`: the control datagrams (observer, AutoNAT server and client,
  punch packets);
* :class:`~.reachability.ReachabilityService`: observed mappings, NAT type, AutoNAT verdicts;
* :class:`~.reservations.ReservationService`: relay reservations and the circuit addresses they
  give; on a public node, a :class:`~.relay_server.RelayServer` and a rendezvous point;
* :class:`~.punch.HolePunchService`: DCUtR-style upgrades of relayed connections;
* the per-peer :class:`~.links.PeerLink` table.

It is abstract over who owns the node's connections: a subclass says how a direct connection is
dialed and registered, where an inbound relayed circuit goes and what happens when the
addresses to advertise change (:class:`~.links.DirectPaths` plus two hooks). The subclasses are
:class:`~.host.NatHost` (a standalone peer with its own links) and
:class:`~.mesh_service.MeshNatService` (bound to a ``MeshNode``'s connection manager).

Why "service" and not "node": it is not a node of the mesh (``MeshNode`` is); it is the asyncio
shell a node runs to get through NATs, over sans-I/O cores, like the other ``*Service`` classes.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from ..errors import MeshError
from ..identity import KeyPair, PeerId
from ..rpc import CallContext, RpcRouter
from ..transport.quic import QuicConn, QuicTransport
from .addresses import Endpoint
from .autonat import AutoNatClientCore, AutoNatServerCore, Reachability
from .config import NatConfig, RelayAddr, parse_relay_addr
from .control import ControlPlane
from .holepunch import PathMetrics
from .links import PeerLink
from .nattype import NatReport
from .offers import AUTONAT_INFO_PROTOCOL, RELAY_HOP_PROTOCOL, AutoNatInfo, RelayHop
from .punch import HolePunchService
from .reachability import ReachabilityService
from .relay_client import RelayClient
from .relay_server import RelayServer
from .rendezvous import PROTOCOL_ID as RENDEZVOUS_SERVICE
from .rendezvous import RendezvousCore
from .reservations import ReservationService
from .tunnel import SecureTunnel

log = logging.getLogger(__name__)

PING_SERVICE = "/latticaray/nat/ping/1"


class NatService(abc.ABC):
    """A node's NAT traversal over its shared QUIC socket (see the module docstring)."""

    def __init__(
        self, key: KeyPair, config: NatConfig, *, transport: QuicTransport, router: RpcRouter
    ) -> None:
        self.key = key
        self.config = config
        self.transport = transport
        self.router = router
        self.links: dict[PeerId, PeerLink] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.autonat_client = AutoNatClientCore(config.autonat_client, config.policy)
        self.control = ControlPlane(
            transport,
            self.autonat_client,
            AutoNatServerCore(config.autonat_server, config.policy),
            serve_autonat=config.serve_autonat,
            dial_back_copies=config.autonat_server.dial_back_copies,
            spawn=self.spawn,
        )
        self.reachability = ReachabilityService(
            transport,
            self.control,
            self.autonat_client,
            config.policy,
            dial_back_timeout=config.autonat_client.dial_back_timeout,
            spawn=self.spawn,
            on_change=self.addresses_changed,
        )
        self.relay_client = RelayClient(key, self.on_relayed_incoming)
        self.reservations = ReservationService(
            self.relay_client,
            key.peer_id,
            spawn=self.spawn,
            on_change=self.addresses_changed,
            config=config.autorelay,
        )
        self.relay_server: RelayServer | None = None
        self.punch = HolePunchService(
            config,
            key,
            router,
            transport,
            self.control,
            self.reachability,
            self,
            link=self.link,
            spawn=self.spawn,
        )
        self.rendezvous: RendezvousCore | None = None
        router.register_unary(PING_SERVICE, self._handle_ping)
        if config.serve_rendezvous:
            self.rendezvous = RendezvousCore(config.rendezvous)
            router.register_unary(RENDEZVOUS_SERVICE, self._handle_rendezvous)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def peer_id(self) -> PeerId:
        return self.key.peer_id

    @property
    def stats(self) -> dict[str, int]:
        """Counters of the control plane (``control_rejected``, ``dial_backs_confirmed``...)."""
        return self.control.stats

    async def start(self) -> None:
        """Start over the (already listening) shared QUIC transport."""
        self._loop = asyncio.get_running_loop()
        if self.transport.local_address is None:
            raise RuntimeError("the shared QUIC transport must be listening before NAT starts")
        await self.control.start(self.config.listen_host, self.config.observer_alt_port)
        self.reachability.start()
        if self.config.serve_relay:
            self.relay_server = RelayServer(
                self.key,
                self.config.relay_config,
                self.config.listen_host,
                self.config.relay_port,
                capture=self.config.relay_capture,
            )
            await self.relay_server.start()
            self.router.register_unary(RELAY_HOP_PROTOCOL, self._handle_hop)
        if self.config.serve_autonat:
            self.router.register_unary(AUTONAT_INFO_PROTOCOL, self._handle_autonat_info)

    async def stop(self) -> None:
        self.reservations.close()
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
        self.control.stop()
        await self.punch.close()
        for offer in (RELAY_HOP_PROTOCOL, AUTONAT_INFO_PROTOCOL):
            self.router.unregister(offer)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the NAT service is not started")
        return self._loop

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background until it ends or the service stops."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def link(self, peer: PeerId) -> PeerLink:
        """This node's link to ``peer`` (created on first use)."""
        link = self.links.get(peer)
        if link is None:
            link = self.links[peer] = PeerLink(peer, PathMetrics(str(peer)))
        return link

    def path_of(self, peer: PeerId) -> str:
        link = self.links.get(peer)
        return link.path if link else "none"

    async def _handle_ping(self, ctx: CallContext, payload: bytes) -> bytes:
        return bytes(payload)

    async def _handle_hop(self, ctx: CallContext, payload: bytes) -> bytes:
        assert self.relay_server is not None
        return RelayHop(self.relay_server.port).encode()

    async def _handle_autonat_info(self, ctx: CallContext, payload: bytes) -> bytes:
        return AutoNatInfo(self.control.alt_observer_port).encode()

    async def _handle_rendezvous(self, ctx: CallContext, payload: bytes) -> bytes:
        assert self.rendezvous is not None
        return self.rendezvous.handle(str(ctx.peer_id), bytes(payload), self.loop.time())

    # -- what the owner of the connections provides --------------------------------------------
    @abc.abstractmethod
    def direct_up(self, link: PeerLink) -> bool: ...

    @abc.abstractmethod
    async def await_direct(self, link: PeerLink, timeout: float) -> Endpoint | None: ...

    @abc.abstractmethod
    async def dial_direct(
        self,
        peer: PeerId,
        addr: Endpoint,
        path: str,
        transport: QuicTransport | None = None,
        timeout: float | None = None,
    ) -> PeerLink: ...

    @abc.abstractmethod
    def on_quic(self, conn: QuicConn) -> None: ...

    @abc.abstractmethod
    async def on_relayed_incoming(self, tunnel: SecureTunnel) -> None:
        """A peer opened a circuit to us through one of our relays."""

    @abc.abstractmethod
    def addresses_changed(self) -> None:
        """The circuit addresses or the AutoNAT verdicts may have changed."""

    # -- reachability ----------------------------------------------------------------------
    async def detect_nat(self, servers: list[Endpoint]) -> NatReport:
        return await self.reachability.detect_nat(servers)

    async def check_reachability(self, servers: list[Endpoint]) -> Reachability:
        return await self.reachability.check_reachability(servers)

    @property
    def is_public(self) -> bool:
        return self.reachability.is_public

    def public_addresses(self) -> list[str]:
        return self.reachability.public_addresses()

    async def auto_configure(
        self,
        observers: list[Endpoint] | None = None,
        relays: list[RelayAddr] | None = None,
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
        own = set(self.reachability.local_endpoints())
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
            self.reachability.start_maintenance(lambda: servers)
        return report, reach

    # -- relay reservations ----------------------------------------------------------------
    async def reserve_relay(
        self, relay_peer: PeerId, host: str, port: int, keep: bool = True
    ) -> None:
        """Reserve a slot on a relay; with ``keep``, re-reserve (with backoff) whenever it drops."""
        await self.reservations.reserve(relay_peer, host, port, keep)

    def circuit_addresses(self) -> list[str]:
        """One ``/p2p-circuit`` address per live reservation (what to advertise)."""
        return self.reservations.circuit_addresses()

    def circuit_address(self) -> str | None:
        return self.reservations.circuit_address()
