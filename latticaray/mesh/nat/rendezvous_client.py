"""Client side of rendezvous (``/latticaray/rendezvous/1``) over any ``call(peer, service, payload)``.

Works with a ``MeshNode`` (``node.call``) or a ``NatHost``; the rendezvous point learns who
registers from the authenticated connection, never from the message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import wire
from .errors import OK, RendezvousRefused
from .rendezvous import PROTOCOL_ID

Call = Callable[..., Awaitable[bytes]]


@dataclass(frozen=True)
class DiscoveredPeer:
    peer: str
    addrs: tuple[str, ...]
    ttl: float


def _check(reply: bytes, expected: str) -> dict[str, Any]:
    msg = wire.decode(reply)
    if msg["t"] == "error" or msg.get("s") != OK:
        raise RendezvousRefused(str(msg.get("s", "MALFORMED")), str(msg.get("m", ""))[:300])
    if msg["t"] != expected:
        raise RendezvousRefused("MALFORMED", f"expected {expected}, got {msg['t']!r}")
    return msg


async def register(
    call: Call,
    point,
    namespace: str,
    addrs: list[str],
    ttl: float | None = None,
    timeout: float = 10.0,
) -> float:
    """Register our ``addrs`` under ``namespace`` at rendezvous ``point``; returns the granted TTL."""
    fields: dict[str, object] = {"ns": namespace, "addrs": list(addrs)}
    if ttl is not None:
        fields["ttl"] = ttl
    msg = _check(
        await call(point, PROTOCOL_ID, wire.encode("register", **fields), timeout=timeout),
        "register_resp",
    )
    return wire.get_float(msg, "ttl", 0, 10**7)


async def unregister(call: Call, point, namespace: str, timeout: float = 10.0) -> None:
    await call(point, PROTOCOL_ID, wire.encode("unregister", ns=namespace), timeout=timeout)


async def discover(
    call: Call, point, namespace: str, limit: int = 100, cookie: int = 0, timeout: float = 10.0
) -> tuple[list[DiscoveredPeer], int]:
    msg = _check(
        await call(
            point,
            PROTOCOL_ID,
            wire.encode("discover", ns=namespace, limit=limit, cookie=cookie),
            timeout=timeout,
        ),
        "discover_resp",
    )
    regs = msg.get("regs")
    if not isinstance(regs, list) or len(regs) > 1000:
        raise RendezvousRefused("MALFORMED", "discover reply must hold a bounded list")
    peers = []
    for reg in regs:
        if not isinstance(reg, dict):
            raise RendezvousRefused("MALFORMED", "registration must be a map")
        peers.append(
            DiscoveredPeer(
                wire.get_str(reg, "peer", 128),
                tuple(wire.get_str_list(reg, "addrs", 16, 256)),
                wire.get_float(reg, "ttl", 0, 10**7),
            )
        )
    return peers, wire.get_int(msg, "cookie", 0, 2**63)
