"""Rendezvous (sans-I/O): namespace registrations on public nodes, for discovery without a DHT key.

A peer registers ``(namespace, its addresses)`` with a TTL at a rendezvous point; others discover
the registrations of a namespace, page by page with a cookie. The registering peer is the
*authenticated* caller (the driver passes it in), so nobody can register for someone else. TTLs
are clamped; namespaces, addresses, registrations per peer, per namespace and in total are bounded.

Wire messages (protocol id ``/latticaray/rendezvous/1``): ``register {ns, addrs, ttl}`` ->
``register_resp {s, ttl, m}``; ``unregister {ns}``; ``discover {ns, limit, cookie}`` ->
``discover_resp {s, regs: [{peer, addrs, ttl}], cookie, m}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire
from .errors import MALFORMED, NOT_FOUND, OK, RESOURCE_LIMIT_EXCEEDED, RendezvousRefused

PROTOCOL_ID = "/latticaray/rendezvous/1"


@dataclass
class RendezvousConfig:
    min_ttl: float = 30.0
    max_ttl: float = 72 * 3600.0
    default_ttl: float = 2 * 3600.0
    max_namespace_len: int = 255
    max_addrs: int = 16
    max_addr_len: int = 256
    max_registrations_per_peer: int = 32
    max_registrations_per_namespace: int = 1000
    max_registrations: int = 10000
    max_discover: int = 100


@dataclass
class Registration:
    namespace: str
    peer: str
    addrs: tuple[str, ...]
    expires: float
    seq: int


class RendezvousCore:
    def __init__(self, config: RendezvousConfig | None = None) -> None:
        self.config = config or RendezvousConfig()
        self._by_ns: dict[str, dict[str, Registration]] = {}
        self._count = 0
        self._seq = 0

    def _check_namespace(self, namespace: object) -> str:
        if (
            not isinstance(namespace, str)
            or not 1 <= len(namespace) <= self.config.max_namespace_len
        ):
            raise RendezvousRefused(
                MALFORMED, f"namespace must be 1..{self.config.max_namespace_len} characters"
            )
        return namespace

    def register(
        self, peer: str, namespace: str, addrs: list[str], ttl: float | None, now: float
    ) -> Registration:
        self.expire(now)
        cfg = self.config
        namespace = self._check_namespace(namespace)
        if not isinstance(addrs, (list, tuple)) or not 1 <= len(addrs) <= cfg.max_addrs:
            raise RendezvousRefused(MALFORMED, f"a registration needs 1..{cfg.max_addrs} addresses")
        if any(
            not isinstance(a, str) or not a.startswith("/") or len(a) > cfg.max_addr_len
            for a in addrs
        ):
            raise RendezvousRefused(MALFORMED, "addresses must be multiaddr strings")
        ttl = cfg.default_ttl if ttl is None else ttl
        if not cfg.min_ttl <= ttl <= cfg.max_ttl:
            raise RendezvousRefused(MALFORMED, f"ttl must be within {cfg.min_ttl}..{cfg.max_ttl} s")
        regs = self._by_ns.setdefault(namespace, {})
        if peer not in regs:
            if self._count >= cfg.max_registrations:
                raise RendezvousRefused(RESOURCE_LIMIT_EXCEEDED, "the rendezvous point is full")
            if len(regs) >= cfg.max_registrations_per_namespace:
                raise RendezvousRefused(RESOURCE_LIMIT_EXCEEDED, f"namespace {namespace!r} is full")
            mine = sum(1 for r in self._by_ns.values() if peer in r)
            if mine >= cfg.max_registrations_per_peer:
                raise RendezvousRefused(
                    RESOURCE_LIMIT_EXCEEDED, f"peer {peer} already holds {mine} registrations"
                )
            self._count += 1
        self._seq += 1
        reg = Registration(namespace, peer, tuple(addrs), now + ttl, self._seq)
        regs[peer] = reg
        return reg

    def unregister(self, peer: str, namespace: str) -> bool:
        regs = self._by_ns.get(namespace)
        if regs and regs.pop(peer, None) is not None:
            self._count -= 1
            if not regs:
                del self._by_ns[namespace]
            return True
        return False

    def discover(
        self, namespace: str, limit: int, cookie: int, now: float
    ) -> tuple[list[Registration], int]:
        """Registrations newer than ``cookie`` (a sequence number), oldest first; new cookie."""
        self.expire(now)
        namespace = self._check_namespace(namespace)
        limit = max(1, min(limit, self.config.max_discover))
        regs = sorted(
            (r for r in self._by_ns.get(namespace, {}).values() if r.seq > cookie),
            key=lambda r: r.seq,
        )[:limit]
        return regs, (regs[-1].seq if regs else cookie)

    def expire(self, now: float) -> int:
        dropped = 0
        for ns in list(self._by_ns):
            regs = self._by_ns[ns]
            for peer in [p for p, r in regs.items() if r.expires <= now]:
                del regs[peer]
                dropped += 1
            if not regs:
                del self._by_ns[ns]
        self._count -= dropped
        return dropped

    def __len__(self) -> int:
        return self._count

    # ------------------------------------------------------------------- wire dispatch
    def handle(self, peer: str, data: bytes, now: float) -> bytes:
        """Decode one request from authenticated ``peer``, apply it, return the encoded reply."""
        try:
            msg = wire.decode(data)
            kind = msg["t"]
            if kind == "register":
                addrs = wire.get_str_list(
                    msg, "addrs", self.config.max_addrs, self.config.max_addr_len
                )
                ttl_raw = msg.get("ttl")
                if ttl_raw is not None and (
                    isinstance(ttl_raw, bool) or not isinstance(ttl_raw, (int, float))
                ):
                    raise RendezvousRefused(MALFORMED, "ttl must be a number")
                reg = self.register(peer, wire.get_str(msg, "ns", 1024), addrs, ttl_raw, now)
                return wire.encode("register_resp", s=OK, ttl=reg.expires - now, m="")
            if kind == "unregister":
                found = self.unregister(peer, wire.get_str(msg, "ns", 1024))
                return wire.encode("unregister_resp", s=OK if found else NOT_FOUND, m="")
            if kind == "discover":
                limit = wire.get_int(
                    msg, "limit", 1, 10_000, optional=True, default=self.config.max_discover
                )
                cookie = wire.get_int(msg, "cookie", 0, 2**63, optional=True, default=0)
                regs, cookie = self.discover(wire.get_str(msg, "ns", 1024), limit, cookie, now)
                return wire.encode(
                    "discover_resp",
                    s=OK,
                    cookie=cookie,
                    m="",
                    regs=[
                        {"peer": r.peer, "addrs": list(r.addrs), "ttl": r.expires - now}
                        for r in regs
                    ],
                )
            raise RendezvousRefused(MALFORMED, f"unknown rendezvous message {kind!r}")
        except RendezvousRefused as exc:
            return wire.encode("error", s=exc.code, m=exc.message)
        except Exception as exc:  # MalformedMessage and friends: never crash the point
            return wire.encode("error", s=MALFORMED, m=str(exc)[:200])
