"""What a node's NAT service does and how: :class:`NatConfig` (one place for every knob).

Read by :class:`~latticaray.mesh.nat.service.NatService` and the pieces it composes (control
plane, reachability, reservations, hole punching). ``observers`` and ``relays`` are hand-given
bootstrap lists; ``auto`` turns on discovering both from the peers the node meets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MultiaddrError
from ..identity import PeerId
from ..multiaddr import Multiaddr
from ..transport.quic import QuicConfig
from .addresses import AddressPolicy, Endpoint, policy_from_environment
from .autonat import AutoNatClientConfig, AutoNatServerConfig
from .autorelay import AutoRelayConfig
from .birthday import BirthdayConfig
from .holepunch import HolePunchConfig
from .relay import RelayConfig
from .rendezvous import RendezvousConfig

RelayAddr = tuple[PeerId, str, int]
"""A relay's (peer ID, TCP host, TCP port)."""


def parse_relay_addr(text: str) -> RelayAddr:
    """``/ip4/HOST/tcp/PORT/p2p/RELAY`` -> (relay peer, host, port)."""
    addr = Multiaddr.parse(text)
    if addr.transport != "tcp" or addr.peer_id is None or addr.host is None or not addr.port:
        raise MultiaddrError(f"a relay address must be /ip4|ip6/../tcp/../p2p/<relay>: {text}")
    return addr.peer_id, addr.host, addr.port


@dataclass
class NatConfig:
    #: Bootstrap lists: observers/AutoNAT servers (QUIC endpoints of public nodes) and relays
    #: (``/ip4/../tcp/../p2p/<relay>`` multiaddrs), used by ``NatService.auto_configure``.
    observers: tuple[Endpoint, ...] = ()
    relays: tuple[str, ...] = ()
    #: Auto mode (``MeshNatService``): find AutoNAT servers and relays among the peers met
    #: (identify, DHT), keep ``autorelay.want`` reservations while not publicly reachable.
    auto: bool = False
    autorelay: AutoRelayConfig = field(default_factory=AutoRelayConfig)
    listen_host: str = "0.0.0.0"
    quic_port: int = 0
    #: Which addresses count as public; by default from the environment (``LATTICARAY_LAB``).
    policy: AddressPolicy = field(default_factory=policy_from_environment)
    serve_autonat: bool = False
    observer_alt_port: int = 0  # AutoNAT servers answer obs_req here too (0: any port)
    serve_relay: bool = False
    relay_port: int = 0
    #: with ``serve_relay``: peers outside the mesh may use the libp2p relay (hop) too, within
    #: its public limits (``libp2p_relay.Libp2pRelayConfig``); off: members only
    public_relay: bool = True
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

    @property
    def tcp_punch_port(self) -> int:
        """The local TCP port offered for simultaneous open (0 when punching over UDP)."""
        return self.tcp_port if self.punch_protocol == "tcp" else 0

    @property
    def bind_host(self) -> str:
        """The IPv4 host extra punching sockets bind to."""
        return self.listen_host if self.listen_host != "::" else "0.0.0.0"
