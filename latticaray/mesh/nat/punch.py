"""Hole punching (DCUtR-style): upgrade a relayed connection to a direct one.

:class:`HolePunchService` is the asyncio shell of the sans-I/O :class:`HolePunchSession`. The
dialer of a relayed connection is the initiator (:meth:`upgrade`): it coordinates over the
relayed RPC session (``/latticaray/dcutr/1``), then punches; the other side answers in
:meth:`handle_dcutr` and punches at the agreed moment. The punch modes:

* ``direct``: both sides spray punch packets from their shared socket; the initiator dials QUIC
  to the address the peer's packet came from (or, with TCP preferred, TCP simultaneous open and
  end-to-end TLS);
* ``dial`` / ``await``: the other side is public, so it is simply dialed (a connection reversal);
* ``birthday``: exactly one side is behind an endpoint-dependent NAT; the easy side probes many
  ports of the hard side's IP (:class:`EasySideProber`), the hard side opens many sockets toward
  the easy side (:class:`HardSidePlan`) and re-binds QUIC on the one that got through.

A direct connection is registered through the owner's :class:`~latticaray.mesh.nat.links.DirectPaths`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import MeshError, PeerIdMismatch, RpcError
from ..identity import KeyPair, PeerId
from ..rpc import CallContext, RpcRouter, RpcSession
from ..transport.quic import QuicTransport
from . import wire
from .addresses import Endpoint
from .birthday import EasySideProber, HardSidePlan
from .config import NatConfig
from .control import MAX_CONTROL_DATAGRAM, ControlPlane
from .holepunch import (
    GiveUp,
    HolePunchConfig,
    HolePunchSession,
    PunchMode,
    PunchSucceeded,
    Role,
    SendMessage,
    StartPunch,
)
from .links import DirectPaths, PeerLink, StreamHandle
from .reachability import ReachabilityService
from .tcp_punch import simultaneous_open
from .tunnel import SecureTunnel, StreamPair

log = logging.getLogger(__name__)

DCUTR_SERVICE = "/latticaray/dcutr/1"

# the label a punch mode gives the direct path it brings
_PATH_OF_MODE = {
    PunchMode.BIRTHDAY_EASY: "birthday",
    PunchMode.BIRTHDAY_HARD: "birthday",
    PunchMode.DIAL: "reversal",
    PunchMode.AWAIT: "reversal",
}


class HolePunchService:
    """Hole punching for one node (see the module docstring)."""

    def __init__(
        self,
        config: NatConfig,
        key: KeyPair,
        router: RpcRouter,
        transport: QuicTransport,
        control: ControlPlane,
        reachability: ReachabilityService,
        paths: DirectPaths,
        *,
        link: Callable[[PeerId], PeerLink],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self.config = config
        self.key = key
        self.router = router
        self.transport = transport
        self.control = control
        self.reachability = reachability
        self.paths = paths
        self._link = link
        self._spawn = spawn
        self._rng = random.SystemRandom()
        self._extra_transports: list[QuicTransport] = []
        router.register_unary(DCUTR_SERVICE, self.handle_dcutr)

    async def close(self) -> None:
        for extra in self._extra_transports:
            await extra.close()
        self._extra_transports.clear()

    def _now(self) -> float:
        return self.control.loop.time()

    def _session(self, role: Role, config: HolePunchConfig) -> HolePunchSession:
        return HolePunchSession(
            role,
            self.reachability.punch_addresses(),
            self.reachability.nat_type,
            config,
            our_public=self.reachability.is_public,
            our_tcp_port=self.config.tcp_punch_port,
        )

    # -- coordination ----------------------------------------------------------------------
    async def upgrade(self, link: PeerLink, start: float) -> bool:
        """Initiator side: coordinate over the relayed session, punch, retry up to 3 times."""
        session = self._session(Role.INITIATOR, self.config.punch)
        pending = list(session.start(self._now()))
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
                        pending += session.on_message(reply, self._now())
                elif isinstance(action, StartPunch):
                    link.metrics.punch_attempts += 1
                    link.metrics.rtt_relay = session.rtt
                    remote = await self._punch(link, action, initiator=True)
                    pending += session.on_punch_result(action.attempt, remote, self._now())
                elif isinstance(action, PunchSucceeded):
                    log.info(
                        "hole punch with %s: direct (%s, attempt %d, %.2f s)",
                        link.peer,
                        link.pending_path,
                        action.attempt,
                        self._now() - start,
                    )
                    return True
                elif isinstance(action, GiveUp):
                    link.metrics.record(self._now(), f"punch-gave-up: {action.reason}")
                    log.info(
                        "hole punch with %s gave up (%s; we are %s, they are %s)",
                        link.peer,
                        action.reason,
                        self.reachability.nat_type.value,
                        session.remote_nat.value,
                    )
                    return False
            timer = session.next_timer()
            if session.done or timer is None:
                return session.state.value == "succeeded"
            await asyncio.sleep(max(0.0, timer - self._now()))
            pending += session.tick(self._now())

    async def handle_dcutr(self, ctx: CallContext, payload: bytes) -> bytes:
        """Responder side: answer the initiator's coordination; punch when it says so."""
        link = self._link(ctx.peer_id)
        session = link.dcutr
        msg = wire.decode(bytes(payload))
        if msg["t"] == "hp_connect" or session is None:
            session = self._session(
                Role.RESPONDER, HolePunchConfig(enabled=self.config.hole_punching)
            )
            link.dcutr = session
        reply = b""
        for action in session.on_message(bytes(payload), self._now()):
            if isinstance(action, SendMessage):
                reply = action.data
            elif isinstance(action, StartPunch):
                self._spawn(self._responder_punch(link, session, action))
        return reply

    async def _responder_punch(
        self, link: PeerLink, session: HolePunchSession, action: StartPunch
    ) -> None:
        remote = await self._punch(link, action, initiator=False)
        session.on_punch_result(action.attempt, remote, self._now())

    # -- punching --------------------------------------------------------------------------
    async def _punch(self, link: PeerLink, action: StartPunch, initiator: bool) -> Endpoint | None:
        mode = action.mode
        link.pending_path = _PATH_OF_MODE.get(mode, "punched")
        delay = action.at - self._now()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            if mode is PunchMode.DIAL:
                return await self._punch_dial(link, action)
            if mode is PunchMode.AWAIT:
                return await self.paths.await_direct(link, self.config.punch_budget + 2)
            if mode is PunchMode.DIRECT and self.config.tcp_punch_port and action.remote_tcp_port:
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

    async def _punch_dial(self, link: PeerLink, action: StartPunch) -> Endpoint | None:
        for addr in action.remote_addrs:
            try:
                await self.paths.dial_direct(link.peer, addr, "reversal")
                return addr
            except (MeshError, OSError):
                continue
        return None

    async def _wait_for(self, future: asyncio.Future[Any], timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            pass

    async def _punch_spray(
        self, link: PeerLink, action: StartPunch, initiator: bool
    ) -> Endpoint | None:
        """Both sides spray punch packets; the initiator dials QUIC once the peer's packet arrives."""
        seen: asyncio.Future[Endpoint] = self.control.loop.create_future()

        def on_punch(source: Endpoint) -> None:
            if not seen.done():
                seen.set_result(source)

        self.control.expect_punch(action.token, on_punch)
        packet = self.control.punch_packet(action.token)
        deadline = self._now() + self.config.punch_budget
        try:
            while self._now() < deadline and not self.paths.direct_up(link):
                for addr in action.remote_addrs:
                    self.transport.send_raw(addr, packet)
                if seen.done() and initiator:
                    remote = seen.result()
                    for _ in range(3):
                        self.transport.send_raw(remote, packet)
                    await self.paths.dial_direct(
                        link.peer, remote, "punched", timeout=max(1.0, deadline - self._now())
                    )
                    return remote
                await self._wait_for(seen, 0.05)
            if not initiator:
                return await self.paths.await_direct(link, 2.0)
            return None
        finally:
            self.control.forget_punch(action.token)

    async def _punch_tcp(
        self, link: PeerLink, action: StartPunch, initiator: bool
    ) -> Endpoint | None:
        """TCP simultaneous open to the peer's mapped IP and TCP port; then end-to-end TLS."""
        remote = (action.remote_addrs[0][0], action.remote_tcp_port)
        deadline = self._now() + self.config.punch_budget + 2.0
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
        session = RpcSession(tunnel, self.router)
        link.attach_direct(StreamHandle(remote, tunnel), session, "tcp-punched", self._now)
        return remote

    async def _birthday_easy(self, link: PeerLink, action: StartPunch) -> Endpoint | None:
        """We are behind a cone NAT (or none): probe many ports of the hard side's public IP."""
        hard_ips = list(dict.fromkeys(ip for ip, _ in action.remote_addrs))[:1]
        if not hard_ips:
            return None
        hard_ip = hard_ips[0]
        hit: asyncio.Future[Endpoint] = self.control.loop.create_future()

        def on_punch(source: Endpoint) -> None:
            if source[0] == hard_ip and not hit.done():
                hit.set_result(source)

        self.control.expect_punch(action.token, on_punch)
        packet = self.control.punch_packet(action.token)
        await asyncio.sleep(0.1)  # let the hard side's mappings exist first
        prober = EasySideProber(self.config.birthday, self._now(), self._rng)
        try:
            while (
                not prober.finished(self._now())
                and not hit.done()
                and not self.paths.direct_up(link)
            ):
                for port in prober.next_batch(self._now()):
                    self.transport.send_raw((hard_ip, port), packet)
                await self._wait_for(hit, 0.02)
            link.metrics.record(self._now(), f"birthday-probes:{prober.probes_sent}")
            if hit.done():
                # the hard side's packet got in (a mapping we probed, maybe in an earlier round):
                # answer it so the hard side learns which of its sockets matched
                prober.on_reply(hit.result()[1])
                for _ in range(3):
                    self.transport.send_raw(hit.result(), packet)
            elif not self.paths.direct_up(link):
                return None
            # the hard side now dials us from the socket that matched
            return await self.paths.await_direct(link, 5.0)
        finally:
            self.control.forget_punch(action.token)

    async def _birthday_hard(self, link: PeerLink, action: StartPunch) -> Endpoint | None:
        """We are behind a symmetric NAT: open many sockets toward the easy side's mapping."""
        policy = self.config.policy
        easy = [a for a in action.remote_addrs if policy.is_public(a[0])] or list(
            action.remote_addrs
        )
        matched = await self._probe_from_many_sockets(easy[0], action.token)
        if matched is None:
            return None
        local_port, easy_endpoint = matched
        # re-bind a QUIC endpoint on the socket's port: the NAT mapping belongs to the 5-tuple
        extra = QuicTransport(self.key, self.config.quic, on_connection=self.paths.on_quic)
        await extra.listen(self.config.listen_host, local_port)
        extra.unknown_datagram_handler = self.control.on_datagram
        self._extra_transports.append(extra)
        await self.paths.dial_direct(
            link.peer, easy_endpoint, "birthday", transport=extra, timeout=4.0
        )
        return easy_endpoint

    async def _probe_from_many_sockets(
        self, target: Endpoint, token: bytes
    ) -> tuple[int, Endpoint] | None:
        """The hard side's probing: returns (local port that matched, the easy side's endpoint)
        once a punch packet gets in on one of the sockets, None when the plan runs out."""
        cfg = self.config.birthday
        loop = self.control.loop
        packet = self.control.punch_packet(token)
        socks: list[socket.socket] = []
        hit: asyncio.Future[tuple[int, Endpoint]] = loop.create_future()

        def make_reader(sock: socket.socket) -> Callable[[], None]:
            def readable() -> None:
                try:
                    data, src = sock.recvfrom(MAX_CONTROL_DATAGRAM)
                except OSError:
                    return
                if data == packet and not hit.done():
                    hit.set_result((sock.getsockname()[1], (src[0], src[1])))

            return readable

        try:
            for _ in range(cfg.hard_sockets):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.bind((self.config.bind_host, 0))
                socks.append(sock)
            for sock in socks:
                loop.add_reader(sock.fileno(), make_reader(sock))
            plan = HardSidePlan(cfg, self._now())
            while not plan.finished(self._now()) and not hit.done():
                if plan.sends_due(self._now()):
                    for sock in socks:
                        try:
                            sock.sendto(packet, target)
                        except OSError:
                            pass
                await self._wait_for(hit, max(0.01, min(0.1, plan.next_timer() - self._now())))
            if not hit.done():
                return None
            local_port, easy_endpoint = hit.result()
            hit_sock = next(s for s in socks if s.getsockname()[1] == local_port)
            for _ in range(3):  # tell the easy side which port matched
                try:
                    hit_sock.sendto(packet, easy_endpoint)
                except OSError:
                    pass
            return local_port, easy_endpoint
        finally:
            for sock in socks:
                try:
                    loop.remove_reader(sock.fileno())
                except Exception:
                    pass
                sock.close()
