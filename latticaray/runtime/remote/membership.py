"""Membership of the mesh as this node sees it: admission, the peers' views, their liveness.

A peer becomes a member here once both sides checked the other's membership credential
(`/latticaray/admit/1`); every other runtime protocol refuses non-members, and members whose
role does not allow it, before it reads a request (`require_member`). A node renews its own
credential before it runs out at a member holding the mesh key (`/latticaray/renew/1`), and
follows the mesh's revocations (the CRDT `revocations` collection): a revoked peer is cut off
(settled as departed, disconnected) as soon as its revocation arrives.

Members push their view (resources, load, the peers they know, named-actor records) every
VIEW_INTERVAL s over `/latticaray/runtime-view/1`; the views fill the ClusterSnapshot placement
reads (only for peers whose role lets them execute) and introduce peers not met yet.

Peering. "full": every member connected or introduced is admitted and kept (views to all: idle
cost grows with N^2). "sparse" (the default): a node admits its bootstrap peers, the peers its
work needs (placement, DHT capacity ads, objects, named actors) and those that ask, plus peers
introduced in views while it has fewer than FILL_NEIGHBOURS; it keeps live views of at most
MAX_NEIGHBOURS (its neighbourhood): past that it evicts the least recently used peer it has no
stake in (`pinned`: a bootstrap peer, work either way, actors either way, shared objects,
placement-group bundles) and tells it with a `drop` view; the evicted peer stays a member and is
admitted again when needed. Members beyond the neighbourhood are listed (`nodes()`, the state API)
from the CRDT `members` collection.

Liveness is judged by liveness.py's LivenessCore, which this module feeds (it is the core's
shell): everything heard from a member (its views, the requests it makes here, the frames on our
task sessions to it, the answers to our view pushes, and every QUIC packet of its connection, ACKs
included, so a member busy with bulk data on a lossy link is heard from), the view pushes it did
not answer in time (missed keepalives), and its connections coming and going. A member that
loses its connection is redialed (any path the connection manager knows: direct, punched,
relayed) while its task sessions wait to resume; only a member the core judges DOWN (silent over
a window, keepalives missed) is gone (`peer_gone`): its work here is retried elsewhere, its
actors restarted. A member that restarted (a new `inc` in its view) is gone at once and admitted
afresh; one that leaves (`bye`) is gone at once and not redialed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from latticaray.mesh.errors import MeshError, RpcError
from latticaray.mesh.identity import PeerId
from latticaray.mesh.rpc import Status
from latticaray.runtime.admission import Admission, Permission
from latticaray.runtime.errors import CredentialError
from latticaray.runtime.remote.liveness import (
    LivenessConfig,
    LivenessCore,
    MemberState,
    Redial,
    StateChanged,
)
from latticaray.runtime.remote.wire import (
    ADMIT_PROTOCOL,
    MAX_ADMIT_REQUEST,
    RENEW_PROTOCOL,
    VIEW_PROTOCOL,
    Admit,
    RuntimeView,
    WireError,
    decode_admit,
    decode_view,
)
from latticaray.scheduler.policy import ClusterSnapshot, NodeView
from latticaray.state.members import Liveness

if TYPE_CHECKING:
    from latticaray.runtime.remote.caller import PeerSessions
    from latticaray.runtime.remote.runtime import RemoteRuntime
    from latticaray.state.revocations import Revocations

log = logging.getLogger(__name__)

VIEW_INTERVAL = 0.3
VIEW_TIMEOUT = 2.0  # a view push unanswered this long is a missed keepalive
REDIAL_TIMEOUT = 10.0  # one redial of a member that lost its connection
LEAVE_TIMEOUT = 0.5  # the `bye` views a stopping node sends
MAX_LEFT = 4096  # departed processes remembered, so their late views are not taken as rejoins
MAX_INTRODUCED_ADDRS = 8
RENEW_CHECK_INTERVAL = 30.0  # how often a node checks whether its credential needs renewal
RENEW_RETRY = 1.0  # ... and how soon it tries again when it could not (doubling, up to that)
#: Sparse peering: the live views a node keeps (its neighbourhood) before it evicts the least
#: recently used peer it has no stake in (see Membership.pinned).
MAX_NEIGHBOURS = 32
#: Sparse peering: below this many live peers a node also admits the peers its members
#: introduce in their views (so a small mesh is fully connected and a large one is not).
FILL_NEIGHBOURS = 4
#: A view from a peer this node dropped that arrives this soon after was already on its way.
DROP_GRACE = 2.0
#: A peer that goes on pushing views after we dropped it needs us (its bootstrap, its actors'
#: host, ...): it is kept this long before it may be evicted again.
DROP_HOLD = 60.0
MAX_DROPPED = 4096
#: Sparse peering: the `peers` map (introductions) travels in a node's first view to a peer, in
#: the views after it admitted a peer, and otherwise at most this often; the other views carry
#: an empty one (it is most of a view's bytes).
PEERS_INTERVAL = 10.0


class Peer:
    """What this node knows about one admitted peer."""

    def __init__(self, node_id: str, peer_id: Any):
        self.node_id = node_id
        self.peer_id = peer_id
        self.alive = True
        self.view: RuntimeView | None = None  # its last pushed view
        self.incarnation: bytes | None = None  # its process's `inc` (a new one: it restarted)
        #: a view came since it last lost its connection (it is the same process: work may go)
        self.confirmed = True
        self.link: PeerSessions | None = None  # the task sessions to it (caller.py), once used
        self.last_used = time.monotonic()  # admitted, or last picked for work (sparse eviction)
        self.hold_until = 0.0  # not evicted before (it came back after we dropped it)
        self.introduced: dict[str, list[str]] = {}  # the last `peers` map its views carried


class Membership:
    """Admitted peers, their views and liveness; the snapshot placement reads."""

    def __init__(self, remote: RemoteRuntime, admission: Admission):
        self.remote = remote
        self.admission = admission
        self.mesh = remote.mesh
        self.node_id = remote.node_id
        self.peers: dict[str, Peer] = {}
        self.snapshot = ClusterSnapshot(local_node=self.node_id)
        self._last_member_publish = 0.0
        self._introducing: set[str] = set()
        self.issuers: set[str] = set()  # members that said they hold the mesh key
        self.revocations: Revocations | None = None  # the CRDT collection, once state runs
        self.liveness: LivenessCore[str] = LivenessCore(LivenessConfig(tick_interval=VIEW_INTERVAL))
        #: This process's incarnation, in every view it pushes: a peer that sees a new one
        #: knows this node restarted (same peer id, nothing of its old work left).
        self.incarnation = os.urandom(8)
        self._redialing: set[str] = set()
        #: Members that said `bye`, with the incarnation that said it: a view that process
        #: pushed before its `bye` may arrive after it (another stream) and must not admit it
        #: again; a new process under the same peer id (a new incarnation) is welcome.
        self._left: OrderedDict[str, bytes | None] = OrderedDict()
        #: Sparse peering: at most this many live views kept (see `trim`); the bootstrap
        #: peers this node joined through are never evicted; peers dropped, and when.
        self.max_neighbours = MAX_NEIGHBOURS
        self.fill_neighbours = FILL_NEIGHBOURS
        self.bootstrap_ids: set[str] = set()
        self._dropped: OrderedDict[str, float] = OrderedDict()
        self._peers_sent_at = 0.0

    def spawn(self, coro: Any) -> asyncio.Task:
        return self.remote.spawn(coro)

    def alive_peers(self) -> list[str]:
        return [n for n, s in self.peers.items() if s.alive]

    def is_alive(self, node_id: str) -> bool:
        peer = self.peers.get(node_id)
        return peer is not None and peer.alive

    def alive_peer(self, node_id: str | None) -> Peer | None:
        """The live peer, if admitted; asking for it to use it (work, objects, refs) marks it
        as recently used (the neighbourhood evicts the least recently used first)."""
        peer = self.peers.get(node_id) if node_id is not None else None
        if peer is None or not peer.alive:
            return None
        peer.last_used = time.monotonic()
        return peer

    # ------------------------------------------------------------------ admission
    async def join(self, addr: str, connecting: Awaitable[Any] | None = None) -> None:
        """Connect to a bootstrap member and be admitted; a refused credential raises
        CredentialError (an unreachable peer raises MeshError). ``connecting``: the dial to
        ``addr`` already under way (it gives the peer ID), awaited instead of a new one."""
        if connecting is None:
            connecting = self.mesh.connect(addr, timeout=10.0)
        peer = await connecting
        self.bootstrap_ids.add(str(peer))
        await self.admit_with(peer, refresh=True, refused=True)

    async def admit_with(self, peer_id: Any, refresh: bool = False, refused: bool = False) -> None:
        """Present our credential to a connected peer and check its own (``refresh``: again,
        with a renewed credential). ``refused``: a refusal raises CredentialError."""
        node_id = str(peer_id)
        if not refresh and node_id in self.peers and self.peers[node_id].alive:
            return
        if not self.admission.is_member:
            return
        try:
            raw = await self.mesh.call(peer_id, ADMIT_PROTOCOL, self._credential(), timeout=10.0)
            reply = decode_admit(raw)
            self.admission.admit(node_id, reply.cred)
        except RpcError as exc:
            log.info("peer %s did not admit this node: %s", node_id, exc)
            if refused and exc.code == Status.PERMISSION_DENIED:
                raise CredentialError(
                    f"{node_id} refused this node's credential: {exc.message}"
                ) from None
            return
        except (MeshError, CredentialError, ValueError) as exc:
            log.info("peer %s was not admitted: %s", node_id, exc)
            if refused and isinstance(exc, CredentialError):
                raise CredentialError(f"{node_id} showed no valid credential: {exc}") from None
            return
        if reply.iss:
            self.issuers.add(node_id)
        self.add_peer(node_id, peer_id)

    async def serve_admit(self, ctx: Any, payload: bytes) -> bytes:
        if len(payload) > MAX_ADMIT_REQUEST:
            raise RpcError(Status.INVALID_ARGUMENT, "admission request too large")
        if not self.admission.is_member:
            raise RpcError(Status.PERMISSION_DENIED, "this node is not a member of a mesh")
        try:
            self.admission.admit(str(ctx.peer_id), decode_admit(payload).cred)
        except (CredentialError, WireError, ValueError) as exc:
            self.remote.stats["admission_refused"] += 1
            raise RpcError(
                Status.PERMISSION_DENIED, f"membership credential refused: {exc}"
            ) from exc
        self.add_peer(str(ctx.peer_id), ctx.peer_id)
        return self._credential()

    def _credential(self) -> bytes:
        credential = self.admission.own_credential
        assert credential is not None  # checked: this node is a member
        return Admit(credential, self.admission.mesh_key is not None).encode()

    def require_member(self, ctx: Any, permission: Permission = Permission.NONE) -> str:
        """The calling peer's node id, if it is a member whose role grants ``permission`` (any
        of them; NONE: any role); else the call is refused unread."""
        node_id = str(ctx.peer_id)
        if not self.admission.allowed(node_id, permission):
            grant = self.admission.grant(node_id)
            if grant is None:
                self.remote.stats["refused_non_member"] += 1
                why = f"peer {node_id} is not a member of this mesh"
            else:
                self.remote.stats["refused_role"] += 1
                why = f"peer {node_id}'s role {grant.role!r} does not allow {ctx.service}"
            raise RpcError(Status.PERMISSION_DENIED, f"{why}; request refused unread")
        self.heard(node_id)
        return node_id

    def submit_refusal(self) -> str | None:
        """Why this node's own credential does not let it submit work, or None."""
        admission = self.admission
        if admission.may(Permission.SUBMIT):
            return None
        if admission.own_revoked:
            return "this node's membership of the mesh was revoked"
        return f"this node's credential (role {admission.role!r}) does not allow submitting work"

    def may_host(self, node_id: str) -> bool:
        """Whether work may be placed on an admitted peer (its role lets it execute)."""
        return self.admission.allowed(node_id, Permission.EXECUTE)

    # ------------------------------------------------------------------ renewal
    async def serve_renew(self, ctx: Any, payload: bytes) -> bytes:
        """A member's credential renewed by the mesh key this node holds."""
        node_id = self.require_member(ctx)
        if len(payload) > MAX_ADMIT_REQUEST:
            raise RpcError(Status.INVALID_ARGUMENT, "renewal request too large")
        if self.admission.mesh_key is None:
            raise RpcError(Status.PERMISSION_DENIED, "this node does not hold the mesh key")
        try:
            fresh = self.admission.renew_for(node_id, decode_admit(payload).cred)
        except (CredentialError, WireError, ValueError) as exc:
            raise RpcError(Status.PERMISSION_DENIED, f"credential not renewed: {exc}") from exc
        self.remote.stats["credentials_renewed"] += 1
        return Admit(fresh).encode()

    async def credential_loop(self) -> None:
        """Renew this node's credential before it runs out (a bearer invite at once), then
        show the renewed one to every member."""
        retry = RENEW_RETRY
        while not self.remote.stopped:
            delay = RENEW_CHECK_INTERVAL
            if self.admission.needs_renewal():
                if self.admission.mesh_key is None and not self.alive_peers():
                    delay = RENEW_RETRY  # joining: nobody to ask yet
                else:
                    try:
                        await self.renew()
                        retry = RENEW_RETRY
                    except CredentialError as exc:
                        log.warning("membership credential not renewed: %s", exc)
                        delay, retry = retry, min(RENEW_CHECK_INTERVAL, retry * 2)
            await asyncio.sleep(delay)

    async def renew(self) -> None:
        """Renew this node's credential: with the mesh key when held, else at a member that
        holds it (those whose admit reply said so first); then re-present it to every member."""
        admission = self.admission
        if admission.mesh_key is not None:
            admission.renew_own(self.node_id)
        else:
            current = admission.own_credential
            assert current is not None  # needs_renewal: this node is a member
            if not self.issuers.intersection(self.alive_peers()):
                await self._meet_issuers()
            errors = []
            for node_id in sorted(self.alive_peers(), key=lambda n: n not in self.issuers):
                try:
                    raw = await self.mesh.call(
                        self.peers[node_id].peer_id,
                        RENEW_PROTOCOL,
                        Admit(current).encode(),
                        timeout=10.0,
                    )
                    admission.replace_own(decode_admit(raw).cred, self.node_id)
                    self.issuers.add(node_id)
                    break
                except (MeshError, CredentialError, ValueError) as exc:
                    self.issuers.discard(node_id)
                    errors.append(f"{node_id[:16]}: {exc}")
            else:
                raise CredentialError(
                    "no member holding the mesh key renewed it ("
                    + ("; ".join(errors[:4]) or "no member known")
                    + ")"
                )
        self.remote.stats["own_credential_renewed"] += 1
        if admission.own is not None:
            log.info("membership credential renewed until %.0f", admission.own.expires)
        for node_id in self.alive_peers():
            self.spawn(self.admit_with(self.peers[node_id].peer_id, refresh=True))

    async def _meet_issuers(self, most: int = 4) -> None:
        """Sparse peering: no peer we know holds the mesh key; meet (admit) up to ``most`` of
        the peers our members' views name, whose admission replies say whether they hold it."""
        tried = 0
        for peer in list(self.peers.values()):
            if not peer.alive:
                continue
            for other, addrs in peer.introduced.items():
                if tried >= most or self.issuers.intersection(self.alive_peers()):
                    return
                if other != self.node_id and other not in self.peers and addrs:
                    tried += 1
                    await self._introduce(other, addrs)

    # ------------------------------------------------------------------ revocation
    def attach_revocations(self, revocations: Revocations) -> None:
        """Follow the mesh's revocations (the CRDT collection): each one is applied here as it
        is merged or written, those already held at once."""
        self.revocations = revocations
        revocations.on_revoked(self._on_revoked)
        for subject, text in revocations.all().items():
            self._on_revoked(subject, text)

    def check_revocation(self, subject: str, text: str) -> str | None:
        """None if ``text`` is a revocation of ``subject`` signed by the mesh key; else why not
        (the CRDT collection's write rule)."""
        try:
            revocation = self.admission.verify_revocation(text)
        except CredentialError as exc:
            return str(exc)
        return None if subject in revocation.subjects else "it revokes another subject"

    def publish_revocation(self, text: str) -> list[str]:
        """Spread a revocation signed by the mesh key through the CRDT; applied here at once.
        Returns its subjects."""
        if self.revocations is None:
            raise CredentialError("this node keeps no cluster state, so it cannot revoke")
        revocation = self.admission.verify_revocation(text)
        for subject in revocation.subjects:
            if self.revocations.get(subject) is None:
                self.revocations.add(subject, revocation.text)
        return revocation.subjects

    def _on_revoked(self, subject: str, text: str) -> None:
        try:
            revocation = self.admission.verify_revocation(text)
        except CredentialError as exc:  # the collection's rule checked it: not expected
            log.warning("revocation of %s ignored: %s", subject, exc)
            return
        cut = set(self.admission.revoke(revocation, self.node_id))
        if revocation.peer is not None and revocation.peer in self.peers:
            cut.add(revocation.peer)
        for node_id in cut:
            self.cut_off(node_id, "its membership was revoked")
        if self.admission.own_revoked:
            log.error("this node's membership was revoked (%s)", subject)

    def cut_off(self, node_id: str, why: str) -> None:
        """A peer that is no member any more: settled like a departed one, and disconnected."""
        self.admission.forget(node_id)
        self.remote.stats["peers_cut_off"] += 1
        peer = self.peers.get(node_id)
        if peer is not None:
            self.peer_gone(node_id, why)
        self.liveness.unwatch(node_id)  # never redialed (peer_gone left it watched as DOWN)
        try:
            peer_id = peer.peer_id if peer is not None else PeerId.from_string(node_id)
        except ValueError:
            return
        self.spawn(self._block(peer_id, why))

    async def _block(self, peer_id: Any, why: str) -> None:
        """The mesh closes the peer's connections and refuses new ones either way."""
        try:
            await self.mesh.block(peer_id, why)
        except MeshError as exc:
            log.debug("blocking %s: %s", peer_id, exc)

    def add_peer(self, node_id: str, peer_id: Any) -> Peer:
        peer = self.peers.get(node_id)
        if peer is None or not peer.alive:
            peer = Peer(node_id, peer_id)
            self.peers[node_id] = peer
            self._dropped.pop(node_id, None)  # admitted again
            self._peers_sent_at = 0.0  # our next views introduce it to the others
            self.liveness.unwatch(node_id)  # a member admitted again is judged afresh
            self.liveness.watch(
                node_id, time.monotonic(), connected=self.mesh.connection_to(peer_id) is not None
            )
            self.spawn(self._push_view(peer))
            if self.remote.sparse:
                self.trim(keep=node_id)
        return peer

    # ------------------------------------------------------------------ the neighbourhood
    def pinned(self, node_id: str) -> str | None:
        """Why a live peer must stay in the neighbourhood (this node has a stake in its
        liveness), or None: it is a bootstrap peer of ours, our task sessions to it carry work,
        it runs work for us or we for it, it hosts our actors or we host its, it borrows our
        objects or we its, it holds bundles of our placement groups, or it came back after we
        dropped it (it needs us) less than DROP_HOLD s ago."""
        if node_id in self.bootstrap_ids:
            return "bootstrap"
        peer = self.peers.get(node_id)
        if peer is None:
            return None
        if peer.hold_until > time.monotonic():
            return "it needs us"
        link = peer.link
        if link is not None and (link.inflight or link.creating or link.held or link.suspended):
            return "our work on it"
        remote = self.remote
        caller = remote.dedup.callers.get(node_id)
        if caller is not None and caller.running:
            return "its work here"
        if any(actor.host == node_id for actor in remote.actors.owned.values()):
            return "hosts our actors"
        node = remote.node
        if node.actors.hosts_for(node_id):
            return "we host its actors"
        refs = node.refs
        if node_id in refs.owners.values() or any(node_id in b for b in refs.borrowers.values()):
            return "shares objects with us"
        if node_id in node.resources.nodes_in_use():
            return "holds our placement groups' bundles"
        return None

    def trim(self, keep: str | None = None) -> None:
        """Sparse peering: while more than `max_neighbours` peers are live, evict the least
        recently used one this node has no stake in (`pinned`); ``keep`` (just admitted) stays.
        Pinned peers may hold the neighbourhood above the bound: a node does not cut off a
        peer its work depends on."""
        alive = [p for p in self.peers.values() if p.alive]
        excess = len(alive) - self.max_neighbours
        if excess <= 0:
            return
        for peer in sorted(alive, key=lambda p: p.last_used):
            if excess <= 0:
                break
            if peer.node_id == keep or self.pinned(peer.node_id) is not None:
                continue
            self.evict(peer)
            excess -= 1
        if excess > 0:
            self.remote.stats["neighbourhood_over"] += 1

    def evict(self, peer: Peer, notify: bool = True) -> None:
        """Take a live peer out of the neighbourhood: no more views to it, no liveness watch
        over it, out of the placement snapshot. It stays a member (nothing of its work is
        settled as if it were gone) and is admitted again when needed. ``notify``: tell it
        (a `drop` view), so it stops pushing views here unless it has a stake in us."""
        node_id = peer.node_id
        if self.peers.get(node_id) is not peer or not peer.alive:
            return
        del self.peers[node_id]
        peer.alive = False
        self.liveness.unwatch(node_id)
        self.snapshot.remove_node(node_id)
        if peer.link is not None:
            peer.link.cancel_sessions()
        self._dropped[node_id] = time.monotonic()
        self._dropped.move_to_end(node_id)
        while len(self._dropped) > MAX_DROPPED:
            self._dropped.popitem(last=False)
        self.remote.stats["peers_evicted"] += 1
        log.debug("peer %s left this node's neighbourhood", node_id)
        if notify and self.mesh.connection_to(peer.peer_id) is not None:
            self.spawn(self._send_drop(peer))

    async def _send_drop(self, peer: Peer) -> None:
        try:
            await self.mesh.call(
                peer.peer_id,
                VIEW_PROTOCOL,
                self._view_payload(drop=True, peers_too=False),
                timeout=VIEW_TIMEOUT,
            )
        except (RpcError, MeshError) as exc:
            log.debug("drop notice to %s: %s", peer.node_id, exc)

    def neighbourhood(self) -> dict[str, Any]:
        """The live peers, the bound, and why each pinned one is pinned (for state reports)."""
        alive = self.alive_peers()
        return {
            "size": len(alive),
            "max": self.max_neighbours if self.remote.sparse else None,
            "pinned": {n: why for n in alive if (why := self.pinned(n)) is not None},
            "evicted": self.remote.stats["peers_evicted"],
        }

    # ------------------------------------------------------------------ views
    def node_view(self) -> NodeView:
        """This node's capacity and load, as placement and capacity ads read them."""
        node = self.remote.node
        queue = node.tasks.ready_queue
        return NodeView(
            self.node_id,
            dict(node.total_resources),
            node.ledger.available,
            queued=len(queue),
            running=node.workers.running(),
            ad_time=time.monotonic(),
            queue_limit=queue.limit,
        )

    def _view_payload(self, bye: bool = False, drop: bool = False, peers_too: bool = True) -> bytes:
        view = self.node_view()
        peers = {}
        for peer in self.peers.values() if peers_too else ():
            if peer.alive:
                peers[peer.node_id] = [str(a) for a in self.mesh.addrs_of(peer.peer_id)]
        return RuntimeView(
            view.total,
            view.available,
            view.queued,
            view.running,
            peers,
            self.remote.names.shared_records(),
            self.incarnation,
            bye,
            view.queue_limit,
            drop=drop,
        ).encode()

    def _publish_member(self, now: float) -> None:
        """Capacity into the CRDT `members` collection (load hints travel in views)."""
        state = self.remote.state
        if state is None or now - self._last_member_publish < 1.0:
            return
        self._last_member_publish = now
        node = self.remote.node
        try:
            state.members.upsert_self(
                addrs=[str(a) for a in self.mesh.advertised_addrs],
                resources_total=dict(node.total_resources),
                resources_available=node.ledger.available,
            )
        except Exception as exc:  # a rejected write must not stop the view loop
            log.debug("member entry not published: %s", exc)

    async def view_loop(self) -> None:
        """Every VIEW_INTERVAL: our view to each connected member (the keepalives), the
        transport's evidence and a liveness tick (liveness.py), whose actions are applied."""
        while not self.remote.stopped:
            await asyncio.sleep(VIEW_INTERVAL)
            now = time.monotonic()
            self._publish_member(now)
            peers_too = not self.remote.sparse or now - self._peers_sent_at >= PEERS_INTERVAL
            if peers_too:
                self._peers_sent_at = now
            payload = self._view_payload(peers_too=peers_too)
            for peer in list(self.peers.values()):
                if peer.alive and self.mesh.connection_to(peer.peer_id) is not None:
                    self.spawn(self._push_view(peer, payload))
            try:
                self._transport_heard()
                for action in self.liveness.tick(time.monotonic()):
                    if isinstance(action, Redial):
                        self._redial(action.peer)
                    else:
                        self._apply(action)
            except Exception:  # a bug here must not end every member's liveness
                log.exception("liveness tick failed")

    async def _push_view(self, peer: Peer, payload: bytes | None = None) -> None:
        try:
            await self.mesh.call(
                peer.peer_id, VIEW_PROTOCOL, payload or self._view_payload(), timeout=VIEW_TIMEOUT
            )
        except (RpcError, MeshError) as exc:
            if isinstance(exc, RpcError) and exc.code not in (
                Status.DEADLINE_EXCEEDED,
                Status.UNAVAILABLE,
                Status.CANCELLED,
            ):
                self.heard(peer.node_id)  # it answered, if not as we hoped (still an answer)
            elif peer.alive:
                self.liveness.probe_failed(peer.node_id, time.monotonic())
            return
        self.heard(peer.node_id)

    # ------------------------------------------------------------------ liveness (the shell)
    def heard(self, node_id: str, at: float | None = None) -> None:
        """Something arrived from ``node_id`` (at ``at``, default now): evidence of life."""
        self._apply(self.liveness.heard(node_id, time.monotonic() if at is None else at))

    def connected(self, peer_id: Any) -> None:
        """The mesh has a connection to ``peer_id`` again (its first one)."""
        self._apply(self.liveness.connected(str(peer_id), time.monotonic()))

    def disconnected(self, peer_id: Any) -> None:
        """The mesh lost its last connection to ``peer_id``: it is redialed (the liveness
        core's Redial actions), and gone only if the core judges it DOWN. Its work resumes
        once a view shows the same process answers again (not a restarted one)."""
        node_id = str(peer_id)
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.confirmed = False
        self._apply(self.liveness.disconnected(node_id, time.monotonic()))

    def _transport_heard(self) -> None:
        """Every QUIC packet of a member's connection counts as heard from it (ACKs and PINGs
        included): a member whose streams are stalled behind bulk data or loss still answers at
        the transport level."""
        quic = self.mesh.quic
        if quic is None:
            return
        members = {peer.peer_id: peer.node_id for peer in self.peers.values()}
        for conn in quic.connections:
            node_id = members.get(conn.remote_peer)
            if node_id is not None and not conn.is_closed:
                self.heard(node_id, conn.last_received)

    def _redial(self, node_id: str) -> None:
        peer = self.peers.get(node_id)
        if peer is None:
            self.liveness.unwatch(node_id)
            return
        if node_id not in self._redialing:
            self._redialing.add(node_id)
            self.spawn(self._redial_one(peer))

    async def _redial_one(self, peer: Peer) -> None:
        node_id = peer.node_id
        try:
            await self.mesh.connections.get(peer.peer_id, REDIAL_TIMEOUT)
        except (MeshError, OSError) as exc:
            log.debug("redial of %s failed: %s", node_id, exc)
            self.liveness.redial_failed(node_id, time.monotonic())
            return
        finally:
            self._redialing.discard(node_id)
        self.remote.stats["peers_redialed"] += 1
        self.connected(peer.peer_id)

    def _apply(self, change: StateChanged[str] | None) -> None:
        """Act on a member's liveness change."""
        if change is None:
            return
        node_id = change.peer
        peer = self.peers.get(node_id)
        stats = self.remote.stats
        if change.state is MemberState.DOWN:
            self.peer_gone(node_id, f"stopped answering: {change.why}")
        elif change.state is MemberState.SUSPECT:
            stats["peers_suspected"] += 1
            log.info(
                "peer %s is suspect (%s; phi %.1f); its work waits, it stays schedulable",
                node_id,
                change.why,
                change.phi,
            )
        elif change.previous is MemberState.DOWN:
            stats["peers_rejoined"] += 1
            log.info("peer %s answers again after it was declared gone", node_id)
            if peer is not None and not peer.alive and not self.remote.sparse:
                self.spawn(self.admit_with(peer.peer_id))
        else:
            log.info("peer %s is alive again (%s)", node_id, change.why)
            if peer is not None and peer.alive and peer.confirmed:
                self.remote.caller.peer_back(peer)

    def liveness_report(self) -> dict[str, Any]:
        """Per member: state, phi, seconds since heard, missed keepalives; and this node's own
        pauses forgiven (for benchmarks and state reports)."""
        now = time.monotonic()
        core = self.liveness
        members = {}
        for node_id in core.watched():
            state = core.state(node_id)
            members[node_id] = {
                "state": state.value if state is not None else None,
                "phi": round(core.phi(node_id, now), 2),
                "silent_s": round(core.silent_for(node_id, now) or 0.0, 2),
                "missed": core.missed(node_id),
            }
        stats = self.remote.stats
        return {
            "members": members,
            "paused_s": round(core.paused_total, 2),
            "suspected": stats["peers_suspected"],
            "lost": stats["peers_lost"],
            "redialed": stats["peers_redialed"],
            "rejoined": stats["peers_rejoined"],
        }

    async def leave(self) -> None:
        """Tell every connected member this node is leaving (a `bye` view), so they settle
        its work at once instead of waiting for the liveness window."""
        payload = self._view_payload(bye=True, peers_too=False)
        calls = [
            self.mesh.call(peer.peer_id, VIEW_PROTOCOL, payload, timeout=LEAVE_TIMEOUT)
            for peer in self.peers.values()
            if peer.alive and self.mesh.connection_to(peer.peer_id) is not None
        ]
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)

    async def serve_view(self, ctx: Any, payload: bytes) -> bytes:
        node_id = self.require_member(ctx)
        view = decode_view(payload)
        peer = self.peers.get(node_id)
        if view.bye:
            self._left[node_id] = view.inc
            self._left.move_to_end(node_id)
            while len(self._left) > MAX_LEFT:
                self._left.popitem(last=False)
            if peer is not None and peer.alive:
                self.peer_gone(node_id, "left the mesh")
            self.liveness.unwatch(node_id)  # not redialed
            return b""
        if view.drop:  # it took us out of its neighbourhood
            if peer is not None and peer.alive and self.pinned(node_id) is None:
                self.evict(peer, notify=False)
            return b""  # else we keep it (and our views tell it we need it)
        dropped_at = self._dropped.get(node_id)
        if dropped_at is not None and (peer is None or not peer.alive):
            if time.monotonic() - dropped_at < DROP_GRACE:
                return b""  # pushed before it heard of the drop
            del self._dropped[node_id]
            # it goes on pushing views after we dropped it: it needs us; kept a while
            peer = self.add_peer(node_id, ctx.peer_id)
            peer.hold_until = time.monotonic() + DROP_HOLD
            self.remote.stats["neighbours_back"] += 1
        if node_id in self._left:
            if self._left[node_id] == view.inc:
                self.remote.stats["late_views_ignored"] += 1
                return b""  # pushed before its `bye`, arrived after it: it stays gone
            del self._left[node_id]  # a new process under the same peer id
        if (
            peer is not None
            and peer.alive
            and view.inc is not None
            and peer.incarnation is not None
            and view.inc != peer.incarnation
        ):
            self.peer_gone(node_id, "restarted (a new process under the same peer id)")
        if peer is None or not peer.alive:
            peer = self.add_peer(node_id, ctx.peer_id)
        self.heard(node_id)
        if view.inc is not None:
            peer.incarnation = view.inc
        if not peer.confirmed:  # the same process answers again: its suspended work resumes
            peer.confirmed = True
            self.remote.caller.peer_back(peer)
        first_view = peer.view is None
        peer.view = view
        if view.peers:
            peer.introduced = view.peers
        if self.may_host(node_id):  # a driver or an observer is sent no work
            node_view = NodeView(
                node_id,
                dict(view.total),
                dict(view.avail),
                queued=view.queued,
                running=view.running,
                ad_time=time.monotonic(),
                queue_limit=view.qlimit,
            )
            self.snapshot.update_node(node_view)
            self.remote.node.resources.on_view(node_view)  # placement groups being placed
            self.remote.placer.capacity_changed()  # tasks waiting for room may fit there
        capacity = self.remote.capacity
        if first_view and capacity is not None:
            capacity.peer_ready()
        wanted = len(view.peers)
        if self.remote.sparse:  # only while the neighbourhood is small
            wanted = self.fill_neighbours - len(self.alive_peers()) - len(self._introducing)
        for other, addrs in view.peers.items():
            if wanted <= 0:
                break
            if (
                other != self.node_id
                and other not in self.peers
                and other not in self._dropped
                and addrs
            ):
                wanted -= 1
                self.spawn(self._introduce(other, addrs))
        self.remote.names.merge_records(view.names)
        return b""

    async def _introduce(self, node_id: str, addrs: list[str]) -> None:
        """Meet a peer another member told us about: its addresses (circuit ones included) go to
        the peer store and the connection manager picks the path (direct, relayed, or both raced)."""
        if node_id in self._introducing:
            return
        self._introducing.add(node_id)
        try:
            peer_id = PeerId.from_string(node_id)
            self.mesh.add_addrs(
                peer_id, [a for a in addrs[:MAX_INTRODUCED_ADDRS] if isinstance(a, str)]
            )
        except (MeshError, ValueError, TypeError) as exc:
            log.debug("introduction of %s ignored: %s", node_id, exc)
            self._introducing.discard(node_id)
            return
        try:
            await self.admit_with(peer_id)
        finally:
            self._introducing.discard(node_id)

    # ------------------------------------------------------------------ departures
    def peer_gone(self, node_id: str, why: str) -> None:
        """A peer disconnected or stopped answering: what it borrowed, ran or hosted for this
        node is settled (see each part's ``peer_gone``)."""
        peer = self.peers.get(node_id)
        if peer is None or not peer.alive:
            return
        peer.alive = False
        self.liveness.declare_down(node_id, time.monotonic(), why)
        remote = self.remote
        remote.node.refs.node_gone(node_id)
        remote.node.actors.kill_orphans(node_id)
        remote.stats["peers_lost"] += 1
        remote.dedup.caller_gone(node_id)
        remote.objects.holder_gone(node_id)
        log.info("peer %s is gone (%s)", node_id, why)
        self.snapshot.remove_node(node_id)
        remote.node.resources.node_gone(node_id)  # its placement groups' bundles here end
        if remote.capacity is not None:
            remote.capacity.peer_gone(node_id)
        remote.caller.peer_gone(peer)
        remote.actors.peer_gone(node_id)

    def beyond_neighbourhood(self) -> list[tuple[str, bool, dict, dict]]:
        """The members this node keeps no peer entry for (a sparse node does not know everyone
        first-hand), from the CRDT `members` collection: (node id, alive by its heartbeat
        age, resources total, available as last published)."""
        state = self.remote.state
        if state is None:
            return []
        members = state.members
        out = []
        for info in members.all():
            node_id = str(info.peer_id)
            if node_id == self.node_id or node_id in self.peers:
                continue
            alive = members.liveness(node_id) is not Liveness.DEAD
            out.append(
                (
                    node_id,
                    alive,
                    dict(info.resources_total),
                    dict(info.resources_available) if alive else {},
                )
            )
        return out

    def nodes(self) -> list[dict]:
        """The `nodes()` table: this node, every peer whose view has arrived, and the other
        members the CRDT `members` collection knows (beyond a sparse node's neighbourhood)."""
        out = [self.remote.node.local_view()]
        for node_id, peer in self.peers.items():
            view = peer.view
            if view is None:
                continue  # admitted, but its first view (its capacity) has not arrived yet
            out.append(
                {
                    "NodeID": node_id,
                    "Alive": peer.alive,
                    "Resources": dict(view.total),
                    "Available": dict(view.avail) if peer.alive else {},
                }
            )
        for node_id, alive, total, avail in self.beyond_neighbourhood():
            out.append({"NodeID": node_id, "Alive": alive, "Resources": total, "Available": avail})
        return out
