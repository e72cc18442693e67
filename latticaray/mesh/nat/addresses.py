"""Which addresses count as publicly routable, and (ip, port) endpoint helpers.

Python's :mod:`ipaddress` calls documentation/benchmarking ranges (198.18.0.0/15, used by the
netlab) private. Whether such a range is "the internet" is a deployment decision, so it is a
configuration here (:class:`AddressPolicy`), never a hard-coded rule.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from .errors import MalformedMessage

Endpoint = tuple[str, int]
"""A UDP/TCP endpoint: (dotted IPv4 or IPv6 text, port)."""

LAB_PUBLIC_RANGES = ("198.18.0.0/15",)
"""The netlab's ranges; pass them as ``treat_as_public`` to run the NAT stack inside the lab."""

LAB_ENV = "LATTICARAY_LAB"
"""``LATTICARAY_LAB=1`` in the environment marks a process as running inside the netlab."""


@dataclass(frozen=True)
class AddressPolicy:
    """Classifies IPs as public (worth advertising and dial-back testing) or not.

    ``treat_as_public``: networks to consider public although ``ipaddress`` says otherwise.
    ``allow_loopback``: consider loopback public (single-machine tests only).
    """

    treat_as_public: tuple[str, ...] = ()
    allow_loopback: bool = False
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.treat_as_public)
        object.__setattr__(self, "_networks", nets)

    def is_public(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if any(addr in net for net in self._networks):
            return True
        if addr.is_loopback:
            return self.allow_loopback
        return addr.is_global and not addr.is_multicast

    def is_routable_candidate(self, ip: str) -> bool:
        """True if worth asking a peer to dial back (never unspecified or multicast)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return not (addr.is_unspecified or addr.is_multicast) and (
            self.is_public(ip) or addr.is_private
        )


def policy_from_environment() -> AddressPolicy:
    """The default policy of this process: :data:`LAB_PUBLIC_RANGES` count as public when
    ``LATTICARAY_LAB=1`` (so a node in the netlab runs the same code as one on the internet),
    else only ``ipaddress``-global addresses do."""
    if os.environ.get(LAB_ENV) == "1":
        return AddressPolicy(treat_as_public=LAB_PUBLIC_RANGES)
    return AddressPolicy()


def check_endpoint(value: object, what: str = "endpoint") -> Endpoint:
    """Validate an endpoint read off the wire: ``[ip_text, port]`` -> ``(ip, port)``."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise MalformedMessage(f"{what} must be [ip, port], got {type(value).__name__}")
    ip, port = value
    if not isinstance(ip, str) or len(ip) > 64:
        raise MalformedMessage(f"{what} ip must be a short string")
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        raise MalformedMessage(f"{what} ip {ip!r} is not an IP address") from None
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise MalformedMessage(f"{what} port must be an integer in 1..65535")
    return (ip, port)


def endpoint_to_multiaddr_text(endpoint: Endpoint, transport: str = "quic-v1") -> str:
    ip, port = endpoint
    family = "ip6" if ":" in ip else "ip4"
    if transport == "tcp":
        return f"/{family}/{ip}/tcp/{port}"
    return f"/{family}/{ip}/udp/{port}/{transport}"


def circuit_address_text(relay_addr_text: str, relay_peer: str, me: str) -> str:
    """The address a private node advertises: ``<relay addr>/p2p/RELAY/p2p-circuit/p2p/ME``."""
    base = relay_addr_text
    if f"/p2p/{relay_peer}" not in base:
        base = f"{base}/p2p/{relay_peer}"
    return f"{base}/p2p-circuit/p2p/{me}"
