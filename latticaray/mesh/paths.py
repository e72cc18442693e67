"""Which address to dial and which connection to use: the mesh's path policy, pure functions.

* :func:`is_dialable_addr`: unspecified addresses (``0.0.0.0``, ``::``) and port 0 are never
  stored, advertised nor dialed.
* :func:`dial_schedule`: the order of happy-eyeballs attempts. Relay (circuit) addresses come
  last, except that for a peer offering only private-range direct addresses the first relay
  attempt starts with the first direct one.
* :func:`expand_unspecified`: a wildcard listen address stands for one address per interface
  (:func:`interface_addresses`); those are what a node can advertise.
* :func:`path_of_transport`: the path type a connection's bytes count under in the metrics.
* :func:`path_rank`: the rank that picks a peer's *primary* connection (same-host Unix socket,
  then TCP, then QUIC, then any other direct transport, relayed connections last). It is fixed,
  not configurable, so both ends of a pair of connections agree on the primary.
"""

from __future__ import annotations

import ipaddress
import socket

from .multiaddr import Multiaddr

__all__ = [
    "DEFAULT_TRANSPORT_PREFERENCE",
    "RELAYED_TRANSPORTS",
    "TRANSPORT_QUALITY",
    "dial_schedule",
    "expand_unspecified",
    "interface_addresses",
    "is_dialable_addr",
    "path_of_transport",
    "path_rank",
]

DEFAULT_TRANSPORT_PREFERENCE = ("unix", "tcp", "quic")
#: Path quality used to pick a peer's primary connection (lower is better; others rank last).
#: Fixed, not configurable, so both ends of a pair of connections agree on the primary.
TRANSPORT_QUALITY = {"unix": 0, "tcp": 1, "quic": 2}
#: Transport names of connections that go through a relay; they rank below every direct path.
RELAYED_TRANSPORTS = frozenset({"relay"})
_UNKNOWN_DIRECT_RANK = 50
_RELAYED_RANK = 100


def path_rank(transport: str) -> int:
    """Primary-selection rank of a connection's transport (lower is better): known direct
    transports by quality, other direct transports after them, relayed connections last."""
    if transport in RELAYED_TRANSPORTS:
        return _RELAYED_RANK
    return TRANSPORT_QUALITY.get(transport, _UNKNOWN_DIRECT_RANK)


def path_of_transport(transport: str) -> str:
    """The path type a transport's connections count as in the metrics: unix, relayed or
    direct (the NAT service says when a direct one was hole-punched)."""
    if transport == "unix":
        return "unix"
    if transport in RELAYED_TRANSPORTS:
        return "relayed"
    return "direct"


def is_dialable_addr(addr: Multiaddr) -> bool:
    """False for addresses nobody can dial: an unspecified IP (``0.0.0.0``, ``::``) or port 0
    (for a circuit address this checks the relay's part)."""
    host = addr.host
    if host is not None:
        try:
            if ipaddress.ip_address(host).is_unspecified:
                return False
        except ValueError:
            pass  # a DNS name
        if addr.port == 0:
            return False
    return True


def _is_public_or_local(addr: Multiaddr) -> bool:
    """True for a direct address likely to be dialable from anywhere it is offered: a global IP,
    loopback (same host), a DNS name or a Unix socket. False for private-use IPs (a LAN behind
    a NAT, or a lab range)."""
    host = addr.host
    if host is None:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True
    return ip.is_global or ip.is_loopback


def dial_schedule(addrs: list[Multiaddr]) -> tuple[list[Multiaddr], set[int]]:
    """Order of happy-eyeballs attempts and the indexes after which the next attempt starts
    without waiting.

    Circuit (relay) addresses normally come last. When a peer offers a relay address and no
    public (or same-host) direct address, its private direct addresses are probably behind a
    NAT: the first relay attempt then starts together with the first direct one, so the first
    call does not wait for a direct address that may be unreachable (the direct path is found
    later by hole punching)."""
    direct = [a for a in addrs if a.transport != "circuit"]
    relayed = [a for a in addrs if a.transport == "circuit"]
    if not relayed or not direct or any(_is_public_or_local(a) for a in direct):
        return direct + relayed, set()
    return direct[:1] + relayed + direct[1:], {0}


def interface_addresses() -> list[str]:
    """IP addresses of this host's interfaces (loopback included)."""
    try:
        import psutil
    except ImportError:
        return ["127.0.0.1"]
    addrs = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                addrs.append(entry.address.split("%")[0])  # drop an IPv6 zone
    return addrs


def expand_unspecified(bound: list[Multiaddr], host_addrs: list[str]) -> list[Multiaddr]:
    """Replace a wildcard listen address (0.0.0.0 / ::) by one address per interface IP.

    Peers cannot dial 0.0.0.0; they can dial the addresses it stands for. IPv6 link-local
    addresses are skipped (they need a zone to be dialable).
    """
    out: list[Multiaddr] = []
    for addr in bound:
        host = addr.host
        try:
            ip = ipaddress.ip_address(host) if host else None
        except ValueError:
            ip = None
        if ip is None or not ip.is_unspecified:
            out.append(addr)
            continue
        for text in host_addrs:
            try:
                candidate = ipaddress.ip_address(text)
            except ValueError:
                continue
            if candidate.version != ip.version or candidate.is_link_local:
                continue
            family = "ip4" if candidate.version == 4 else "ip6"
            out.append(Multiaddr(((family, str(candidate)),) + addr.components[1:]))
    return out
