"""What this node's address looks like from outside: observed mappings, NAT type, AutoNAT.

:class:`ReachabilityService` is the asyncio shell of the sans-I/O :class:`AutoNatClientCore` and
:class:`NatTypeDetector` over the node's :class:`~latticaray.mesh.nat.control.ControlPlane`:

* :meth:`observe` asks an observer which endpoint our shared socket's packets come from (and
  learns the observer's alternate port from its reply);
* :meth:`detect_nat` classifies the NAT from several observers' answers (falling back to their
  alternate ports when too few observers answer);
* :meth:`check_reachability` runs one AutoNAT round (dial-back requests for every candidate
  address: local ones and observed mappings), and :meth:`start_maintenance` repeats it whenever
  an address is due a re-check.

Its results are what the node advertises (``public_addresses``) and offers for hole punching
(``punch_addresses``); ``on_change`` is called after every AutoNAT round.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import MeshError, PeerUnreachable
from ..transport.quic import QuicTransport
from . import wire
from .addresses import AddressPolicy, Endpoint, check_endpoint, endpoint_to_multiaddr_text
from .autonat import AutoNatClientCore, Probe, Reachability
from .control import ControlPlane
from .errors import NatError
from .nattype import NatReport, NatType, NatTypeDetector

log = logging.getLogger(__name__)


def interface_addresses() -> set[str]:
    """The IPv4 addresses of this network namespace's interfaces (no DNS lookups)."""
    names: set[str] = set()
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET:
                    names.add(a.address)
    except Exception:
        pass
    return names


class ReachabilityService:
    """Observed addresses, NAT type and AutoNAT verdicts of one node (see the module docstring)."""

    def __init__(
        self,
        transport: QuicTransport,
        control: ControlPlane,
        client: AutoNatClientCore,
        policy: AddressPolicy,
        *,
        dial_back_timeout: float,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        on_change: Callable[[], None],
    ) -> None:
        self.transport = transport
        self.control = control
        self.client = client
        self.policy = policy
        self.dial_back_timeout = dial_back_timeout
        self.detector = NatTypeDetector()
        self.report: NatReport | None = None
        self.mapped: dict[Endpoint, Endpoint] = {}  # observer -> mapped endpoint of our socket
        self._alt_ports: dict[Endpoint, int] = {}  # observer -> its alternate port
        self._spawn = spawn
        self._on_change = on_change
        self._maintenance: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Once the shared socket is bound: the NAT detector learns the local endpoints."""
        self.detector = NatTypeDetector(self.local_endpoints())

    # -- addresses -------------------------------------------------------------------------
    @property
    def local_endpoint(self) -> Endpoint:
        local = self.transport.local_address
        if local is None:
            raise RuntimeError("the shared QUIC transport is not listening")
        return (str(local[0]), int(local[1]))

    def local_endpoints(self) -> list[Endpoint]:
        """The shared socket's endpoints worth testing: its address, or, bound to a wildcard,
        every routable interface address with its port."""
        host, port = self.local_endpoint
        if host not in ("0.0.0.0", "::"):
            return [(host, port)]
        return [
            (ip, port)
            for ip in sorted(interface_addresses())
            if not ip.startswith("127.") and self.policy.is_routable_candidate(ip)
        ]

    def punch_addresses(self) -> list[Endpoint]:
        """Observed mappings first, then local endpoints (what hole punching offers the peer)."""
        addrs = list(dict.fromkeys(self.mapped.values()))
        return addrs + [ep for ep in self.local_endpoints() if ep not in addrs]

    def public_addresses(self) -> list[str]:
        """AutoNAT-confirmed public QUIC addresses of this node, as multiaddr text."""
        return [endpoint_to_multiaddr_text(ep) for ep in self.client.public_addresses()]

    def alternate_observers(self) -> dict[Endpoint, Endpoint]:
        """Observer -> its alternate observer endpoint, as learned from ``obs`` replies."""
        return {server: (server[0], port) for server, port in self._alt_ports.items()}

    @property
    def is_public(self) -> bool:
        return self.client.reachability() is Reachability.PUBLIC

    @property
    def nat_type(self) -> NatType:
        return self.report.nat_type if self.report else NatType.UNKNOWN

    # -- observations and NAT type -----------------------------------------------------------
    async def observe(
        self, server: Endpoint, timeout: float = 2.0, *, alternate: bool = False
    ) -> Endpoint:
        """Ask ``server`` which address our shared socket's packets come from. ``alternate``
        marks a server's alternate observer port: it feeds NAT type detection only (the mapping
        it sees is not one other peers would reach us at)."""
        msg, _ = await self.control.request(server, "obs_req", timeout)
        mapped = check_endpoint(msg.get("a"), "observed address")
        if not alternate:
            self.mapped[server] = mapped
            alt = wire.get_int(msg, "ap", 0, 65535, optional=True, default=0)
            if alt and alt != server[1]:
                self._alt_ports[server] = alt
        self.detector.observe(server, mapped, self.control.loop.time())
        return mapped

    async def _observe_all(self, servers: list[Endpoint], alternate: bool = False) -> None:
        results = await asyncio.gather(
            *(self.observe(s, alternate=alternate) for s in servers), return_exceptions=True
        )
        for server, result in zip(servers, results):
            if isinstance(result, Exception):
                kind = "alternate port" if alternate else "observer"
                log.info("observe via %s %s failed: %s", kind, server, result)

    async def detect_nat(self, servers: list[Endpoint]) -> NatReport:
        await self._observe_all(servers)
        report = self.detector.report(self.control.loop.time())
        if report.nat_type is NatType.UNKNOWN:
            # too few observers: ask their alternate ports (a second destination per observer)
            alternates = [(s[0], self._alt_ports[s]) for s in servers if s in self._alt_ports]
            await self._observe_all(alternates, alternate=True)
        self.report = self.detector.report(self.control.loop.time())
        return self.report

    # -- AutoNAT ---------------------------------------------------------------------------
    async def check_reachability(self, servers: list[Endpoint]) -> Reachability:
        """One AutoNAT round against ``servers`` (their QUIC endpoints)."""
        loop = self.control.loop
        now = loop.time()
        for ep in self.local_endpoints():
            self.client.add_candidate(ep, now)
        for mapped in set(self.mapped.values()):
            self.client.add_candidate(mapped, now)
        probes = self.client.probes_due(now, [(f"{h}:{p}", h) for h, p in servers])
        await asyncio.gather(*(self._probe(p) for p in probes))
        deadline = loop.time() + self.dial_back_timeout
        # dial-backs arrive on other connections, not as an event here: poll, bounded by deadline
        while loop.time() < deadline and self.client.pending_probes:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self.client.finish_pending(loop.time())
        self._on_change()
        return self.client.reachability()

    async def _probe(self, probe: Probe) -> None:
        host, port = probe.server.rsplit(":", 1)
        try:
            msg = await self.control.request_raw(
                (host, int(port)), probe.request, probe.probe_id, 3.0
            )
        except PeerUnreachable:
            return
        now = self.control.loop.time()
        try:
            if msg["t"] == "dial_err":
                self.client.on_refused(probe.server, probe.probe_id, now)
            else:
                self.client.on_response(probe.server, msg, now)
        except NatError as exc:
            log.info("bad AutoNAT response from %s: %s", probe.server, exc)

    def start_maintenance(
        self, servers: Callable[[], list[Endpoint]], max_interval: float = 60.0
    ) -> None:
        """Re-run AutoNAT against ``servers()`` whenever an address is due a re-check (at most
        ``max_interval`` apart)."""
        if self._maintenance is None:
            self._maintenance = self._spawn(self._maintain(servers, max_interval))

    async def _maintain(self, servers: Callable[[], list[Endpoint]], max_interval: float) -> None:
        loop = self.control.loop
        while True:
            due = self.client.next_timer()
            delay = max_interval if due is None else min(max_interval, max(1.0, due - loop.time()))
            await asyncio.sleep(delay)
            try:
                await self.check_reachability(servers())
            except (MeshError, OSError) as exc:
                log.info("AutoNAT re-check failed: %s", exc)
