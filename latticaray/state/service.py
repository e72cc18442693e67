"""StateService: the asyncio driver that runs a node's :class:`StateCore` over mesh RPC.

It registers the unary service ``/latticaray/state/1`` on the node, feeds every request to the
sans-I/O replica (``ctx.peer_id`` is the authenticated sender), sends what the replica emits with
``node.call`` and feeds replies back, runs the replica's timers, re-publishes this node's member
entry every ``heartbeat_interval``, keeps the replica's peer list (alive members plus connected
peers) and the node's peer store (members' addresses) current, and snapshots state to disk.

Usage::

    state = StateService(node, is_member=credentials.is_member, snapshot_path=".../state.snap")
    await state.start()
    state.members.upsert_self(resources_total={"CPU": 8}, resources_available={"CPU": 8})
    result = state.actors.claim("counter", actor_id, host=node.peer_id)
    state.members.alive(); state.jobs.get(job_id)
    await state.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from ..mesh.errors import MeshError, RpcError
from ..mesh.identity import KeyPair, PeerId
from .atoms import DEFAULT_LIMITS, Limits
from .core import StateCore
from .crdts import CrdtMap, LWWMap
from .errors import MalformedDelta, NotAMember, SnapshotError, StateError
from .members import FailureDetector, MemberInfo
from .persistence import SnapshotLoad, encode_snapshot, load_snapshot, write_snapshot_file
from .replication import PROTOCOL_ID, ReplicationConfig

__all__ = ["StateService"]

log = logging.getLogger(__name__)


class StateService:
    """Cluster metadata of one mesh node: ``members``, ``actors``, ``jobs`` and custom CRDTs.

    Not thread-safe: use it (reads and writes alike) from the event loop that runs the node.
    """

    PEER_REFRESH_INTERVAL = 0.5

    def __init__(
        self,
        node: Any,
        key: KeyPair | None = None,
        *,
        is_member: Callable[[PeerId], bool] | None = None,
        config: ReplicationConfig | None = None,
        detector: FailureDetector | None = None,
        limits: Limits = DEFAULT_LIMITS,
        snapshot_path: str | None = None,
        snapshot_interval: float = 30.0,
        heartbeat_interval: float | None = None,
        call_timeout: float = 5.0,
        max_in_flight: int = 64,
        tombstone_ttl: float = 24 * 3600.0,
        publish_self: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.core = StateCore(
            key or node.key,
            wall_clock=time.time,
            is_member=is_member,
            config=config,
            detector=detector,
            limits=limits,
            tombstone_ttl=tombstone_ttl,
            rng=rng,
        )
        self.replica = self.core.replica
        self.members = self.core.members
        self.actors = self.core.actors
        self.jobs = self.core.jobs
        self.peer_id = self.core.peer_id
        self.snapshot_path = snapshot_path
        self.snapshot_interval = snapshot_interval
        self.heartbeat_interval = heartbeat_interval
        self.call_timeout = call_timeout
        self.publish_self = publish_self
        self.snapshot_load: SnapshotLoad | None = None
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._stopping = False
        self._known_addrs: dict[PeerId, tuple[str, ...]] = {}
        self.replica.on_pending = self._wake.set
        self.members.watch(self._on_member_change)

    # collections ------------------------------------------------------------------------------
    def define(self, name: str, kind: str, live_ttl: float | None = None) -> CrdtMap:
        return self.core.define(name, kind, live_ttl)

    def lww_map(self, name: str) -> LWWMap:
        return self.core.lww_map(name)

    # lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.snapshot_path is not None:
            try:
                self.snapshot_load = load_snapshot(self.snapshot_path, self.core.store, time.time())
            except SnapshotError as exc:
                log.warning("ignoring state snapshot: %s", exc)
        self.node.register_unary(PROTOCOL_ID, self._handle)
        if self.publish_self:
            self._heartbeat()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="latticaray-state")

    async def stop(self, leave: bool = False) -> None:
        """Stop replicating; ``leave=True`` first tombstones this node's member entry."""
        if leave:
            self.members.leave()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.call_timeout):
                    await self._flush_now()
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        unregister = getattr(self.node, "unregister", None)
        if unregister is not None:
            with contextlib.suppress(Exception):
                unregister(PROTOCOL_ID)
        if self.snapshot_path is not None:
            await self.save_snapshot()

    async def save_snapshot(self) -> int:
        if self.snapshot_path is None:
            raise StateError("no snapshot path was configured")
        data = encode_snapshot(self.core.store, time.time())
        return await asyncio.to_thread(write_snapshot_file, self.snapshot_path, data)

    async def anti_entropy_with(self, peer: PeerId) -> None:
        """Run one anti-entropy session with ``peer`` now and wait for it to finish."""
        await self._exchange(*self.replica.start_anti_entropy(peer, time.time()))

    # inbound ----------------------------------------------------------------------------------
    async def _handle(self, ctx: Any, payload: bytes) -> bytes:
        try:
            reply, sends = self.replica.handle_message(ctx.peer_id, bytes(payload), time.time())
        except NotAMember as exc:
            raise RpcError("PERMISSION_DENIED", str(exc)) from None
        except MalformedDelta as exc:
            raise RpcError("INVALID_ARGUMENT", str(exc)) from None
        self._dispatch(sends)
        return reply or b""

    # outbound ---------------------------------------------------------------------------------
    def _dispatch(self, sends: list[tuple[PeerId, bytes]]) -> None:
        if self._stopping:
            return
        for peer, data in sends:
            task = asyncio.get_running_loop().create_task(self._exchange(peer, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _exchange(self, peer: PeerId, first: bytes) -> None:
        """One call; an anti-entropy reply is fed back and the session continues."""
        data: bytes | None = first
        while data is not None:
            async with self._in_flight:
                try:
                    reply = await self.node.call(peer, PROTOCOL_ID, data, timeout=self.call_timeout)
                except (TimeoutError, MeshError, OSError) as exc:
                    log.debug("state call to %s failed: %s", peer.short(), exc)
                    self.replica.session_failed(peer)
                    return
            if not reply:
                return
            try:
                _, sends = self.replica.handle_message(peer, bytes(reply), time.time())
            except StateError as exc:
                log.warning("bad state reply from %s: %s", peer.short(), exc)
                self.replica.session_failed(peer)
                return
            same_peer = [d for p, d in sends if p == peer]
            self._dispatch([(p, d) for p, d in sends if p != peer])
            data = same_peer[0] if same_peer else None
            self._dispatch([(peer, d) for d in same_peer[1:]])

    async def _flush_now(self) -> None:
        sends = self.replica.flush_gossip()
        await asyncio.gather(*(self._exchange(p, d) for p, d in sends), return_exceptions=True)

    # timers -----------------------------------------------------------------------------------
    async def _run(self) -> None:
        next_heartbeat = time.time() + self._heartbeat_every()
        next_snapshot = time.time() + self.snapshot_interval
        next_peer_refresh = 0.0
        while True:
            now = time.time()
            try:
                if now >= next_peer_refresh:
                    next_peer_refresh = now + self.PEER_REFRESH_INTERVAL
                    self._refresh_peers(now)
                if now >= next_heartbeat:
                    next_heartbeat = now + self._heartbeat_every()
                    if self.publish_self:
                        self._heartbeat()
                self._dispatch(self.replica.tick(now))
                if self.snapshot_path is not None and now >= next_snapshot:
                    next_snapshot = now + self.snapshot_interval
                    await self.save_snapshot()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep replicating whatever one step's bug was
                log.exception("state driver step failed")
            deadline = min(
                t
                for t in (
                    self.replica.next_deadline(),
                    next_heartbeat,
                    next_snapshot if self.snapshot_path else None,
                )
                if t is not None
            )
            self._wake.clear()
            # a timer that sets the event, not wait_for, which can swallow a cancel on 3.11
            alarm = asyncio.get_running_loop().call_later(
                max(0.0, deadline - time.time()), self._wake.set
            )
            try:
                await self._wake.wait()
            finally:
                alarm.cancel()

    def _heartbeat_every(self) -> float:
        if self.heartbeat_interval is not None:
            return self.heartbeat_interval
        return self.members.heartbeat_interval()

    def _heartbeat(self) -> None:
        own = self.members.get(self.peer_id)
        if own is None:
            addrs = [str(a) for a in getattr(self.node, "listen_addrs", [])]
            self.members.upsert_self(addrs=addrs)
        else:
            self.members.heartbeat()

    def _refresh_peers(self, now: float) -> None:
        peers = {m.peer_id for m in self.members.alive(now)}
        connected = getattr(self.node, "connected_peers", None)
        if connected is not None:
            peers.update(connected())
        peers.discard(self.peer_id)
        # cluster state goes to members only: not to a peer merely connected (a stranger using
        # the public DHT), nor to one whose membership ended (revoked, expired)
        is_member = self.replica.store.is_member
        self.replica.set_peers(sorted(p for p in peers if is_member(p)))

    def _on_member_change(self, peer: PeerId, info: MemberInfo | None) -> None:
        if info is None:
            self._known_addrs.pop(peer, None)
            return
        if peer == self.peer_id or self._known_addrs.get(peer) == info.addrs:
            return
        self._known_addrs[peer] = info.addrs
        add_addrs = getattr(self.node, "add_addrs", None)
        if add_addrs is None:
            return
        try:
            from ..mesh.multiaddr import Multiaddr

            add_addrs(peer, [Multiaddr.parse(a) for a in info.addrs])
        except (MeshError, ValueError) as exc:
            log.debug("member %s advertises unusable addresses: %s", peer.short(), exc)
