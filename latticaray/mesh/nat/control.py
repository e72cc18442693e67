"""The NAT control plane: small datagrams on the node's shared QUIC UDP socket.

A control datagram is :data:`MAGIC` (first byte 0x1a, never a QUIC packet: the QUIC transport
hands it over as an "unknown datagram") followed by one bounded msgpack map
(docs/protocol/nat.md). :class:`ControlPlane` owns that protocol for one node:

* it answers ``obs_req`` (what address did this come from), on the main socket and, on an AutoNAT
  server, on an alternate observer socket too (:class:`AltObserver`);
* as an AutoNAT server it plans dial-backs with the sans-I/O :class:`AutoNatServerCore` and sends
  them from a *separate* socket;
* for the client roles it sends requests and matches replies by transaction id
  (:meth:`request`, :meth:`request_raw`), feeds dial-backs to the :class:`AutoNatClientCore`, and
  hands hole-punch packets to whoever waits for their token (:meth:`expect_punch`).

Anything malformed is counted in ``stats["control_rejected"]`` and dropped; nothing crashes it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any, cast

from ..errors import PeerUnreachable
from ..transport.quic import QuicTransport
from . import autonat, wire
from .addresses import Endpoint
from .autonat import AutoNatClientCore, AutoNatServerCore
from .errors import DialBackRefused, MalformedMessage, NatError

log = logging.getLogger(__name__)

MAGIC = b"\x1aLR1"
MAX_CONTROL_DATAGRAM = 2048

Reply = tuple[dict[str, Any], Endpoint]


def _source(addr: tuple[Any, ...]) -> Endpoint:
    return (str(addr[0]).removeprefix("::ffff:"), int(addr[1]))


class AltObserver(asyncio.DatagramProtocol):
    """An AutoNAT server's alternate observer socket: answers ``obs_req`` and nothing else."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if not data.startswith(MAGIC) or len(data) > MAX_CONTROL_DATAGRAM or self.transport is None:
            return
        source = _source(addr)
        try:
            msg = wire.decode(data[len(MAGIC) :], MAX_CONTROL_DATAGRAM)
            if msg["t"] != "obs_req":
                raise MalformedMessage("the alternate observer port answers obs_req only")
            txid = wire.get_int(msg, "id", 0, 2**63)
        except NatError as exc:
            self.stats["control_rejected"] = self.stats.get("control_rejected", 0) + 1
            log.debug("datagram to the alternate observer port from %s rejected: %s", source, exc)
            return
        self.transport.sendto(MAGIC + wire.encode("obs", id=txid, a=list(source)), source)


class ControlPlane:
    """One node's control datagrams over its shared QUIC socket (see the module docstring)."""

    def __init__(
        self,
        transport: QuicTransport,
        autonat_client: AutoNatClientCore,
        autonat_server: AutoNatServerCore,
        *,
        serve_autonat: bool,
        dial_back_copies: int,
        spawn: Callable[[Any], asyncio.Task[Any]],
    ) -> None:
        self.transport = transport
        self.autonat_client = autonat_client
        self.autonat_server = autonat_server
        self.serve_autonat = serve_autonat
        self.dial_back_copies = dial_back_copies
        self.stats: dict[str, int] = {}
        self._spawn = spawn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dialback: asyncio.DatagramTransport | None = None
        self._alt_observer: asyncio.DatagramTransport | None = None
        self._waiters: dict[int, tuple[asyncio.Future[Reply], Endpoint]] = {}
        self._punch_waiters: dict[bytes, Callable[[Endpoint], None]] = {}
        self._rng = random.SystemRandom()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, listen_host: str, alt_port: int) -> None:
        """Take the transport's unknown datagrams; an AutoNAT server also opens its dial-back
        socket and its alternate observer socket (on ``alt_port``, 0: any)."""
        self._loop = asyncio.get_running_loop()
        self.transport.unknown_datagram_handler = self.on_datagram
        if self.serve_autonat:
            self._dialback, _ = await self._loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=(listen_host, 0)
            )
            self._alt_observer, _ = await self._loop.create_datagram_endpoint(
                lambda: AltObserver(self.stats), local_addr=(listen_host, alt_port)
            )

    def stop(self) -> None:
        if self._dialback is not None:
            self._dialback.close()
        if self._alt_observer is not None:
            self._alt_observer.close()
        if self.transport.unknown_datagram_handler == self.on_datagram:
            self.transport.unknown_datagram_handler = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the NAT control plane is not started")
        return self._loop

    @property
    def alt_observer_port(self) -> int:
        """The port of this node's alternate observer socket (0: it serves none)."""
        if self._alt_observer is None:
            return 0
        return int(self._alt_observer.get_extra_info("sockname")[1])

    def count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    # -- sending ---------------------------------------------------------------------------
    def send(self, addr: Endpoint, data: bytes) -> None:
        """Send one encoded control message (without the magic) from the shared socket."""
        self.transport.send_raw(addr, MAGIC + data)

    @staticmethod
    def punch_packet(token: bytes) -> bytes:
        """The whole datagram of a hole-punch packet carrying ``token``."""
        return MAGIC + wire.encode("punch", tok=token)

    async def request(
        self,
        addr: Endpoint,
        msg_type: str,
        timeout: float = 2.0,
        tries: int = 4,
        **fields: Any,
    ) -> Reply:
        """Send ``msg_type`` with a fresh transaction id until ``addr`` answers (``tries`` sends
        spread over ``timeout``); returns the reply and where it came from."""
        txid = self._rng.getrandbits(62) | (1 << 62)  # unguessable, never an AutoNAT probe id
        payload = wire.encode(msg_type, id=txid, **fields)
        return await self._exchange(addr, payload, txid, timeout, tries, f"no answer to {msg_type}")

    async def request_raw(
        self, addr: Endpoint, payload: bytes, txid: int, timeout: float, tries: int = 3
    ) -> dict[str, Any]:
        """Send an already encoded request whose transaction id is ``txid`` (AutoNAT probes)."""
        reply = await self._exchange(addr, payload, txid, timeout, tries, "no AutoNAT answer")
        return reply[0]

    async def _exchange(
        self,
        addr: Endpoint,
        payload: bytes,
        txid: int,
        timeout: float,
        tries: int,
        failure: str,
    ) -> Reply:
        future: asyncio.Future[Reply] = self.loop.create_future()
        self._waiters[txid] = (future, (addr[0], addr[1]))
        try:
            for _ in range(tries):
                self.send(addr, payload)
                try:
                    return await asyncio.wait_for(asyncio.shield(future), timeout / tries)
                except TimeoutError:
                    continue
            raise PeerUnreachable(f"{failure} from {addr[0]}:{addr[1]}")
        finally:
            self._waiters.pop(txid, None)

    def expect_punch(self, token: bytes, on_punch: Callable[[Endpoint], None]) -> None:
        """Call ``on_punch(source)`` for every punch packet carrying ``token`` until
        :meth:`forget_punch`."""
        self._punch_waiters[token] = on_punch

    def forget_punch(self, token: bytes) -> None:
        self._punch_waiters.pop(token, None)

    # -- receiving -------------------------------------------------------------------------
    def on_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """The transport's handler for datagrams that are not QUIC."""
        if not data.startswith(MAGIC) or len(data) > MAX_CONTROL_DATAGRAM:
            self.count("datagrams_ignored")
            return
        source = _source(addr)
        try:
            msg = wire.decode(data[len(MAGIC) :], MAX_CONTROL_DATAGRAM)
            self._dispatch(msg, source)
        except NatError as exc:
            self.count("control_rejected")
            log.debug("control datagram from %s rejected: %s", source, exc)

    def _dispatch(self, msg: dict[str, Any], source: Endpoint) -> None:
        kind = msg["t"]
        now = self.loop.time()
        if kind == "obs_req":
            txid = wire.get_int(msg, "id", 0, 2**63)
            alt = self.alt_observer_port
            extra = {"ap": alt} if alt else {}
            self.send(source, wire.encode("obs", id=txid, a=list(source), **extra))
        elif kind == "dial":
            self._serve_dial(msg, source, now)
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
            self.count("dial_backs_confirmed")
        elif kind == "punch":
            token = wire.get_bytes(msg, "tok", 16, 16)
            on_punch = self._punch_waiters.get(token)
            if on_punch is None:
                raise MalformedMessage("punch packet with an unknown token")
            on_punch(source)
        else:
            raise MalformedMessage(f"unknown control message {kind!r}")

    def _serve_dial(self, msg: dict[str, Any], source: Endpoint, now: float) -> None:
        if not self.serve_autonat:
            raise MalformedMessage("this node does not serve AutoNAT")
        try:
            plan = self.autonat_server.handle_request(source, msg, now)
        except DialBackRefused as exc:
            self.send(
                source, wire.encode("dial_err", id=msg.get("id", 0), s=exc.code, m=exc.message)
            )
            return
        self.send(source, plan.response())
        for dial_back in plan.dial_backs:
            self._spawn(self._send_dial_backs(dial_back))

    async def _send_dial_backs(self, dial_back: autonat.DialBack) -> None:
        data = MAGIC + autonat.encode_dial_back(dial_back.nonce)
        for delay in (0.0, 0.2, 0.5)[: self.dial_back_copies]:
            await asyncio.sleep(delay)
            if self._dialback is not None:
                self._dialback.sendto(data, dial_back.endpoint)
