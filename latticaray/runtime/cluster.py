"""The runtime over the mesh: remote tasks and actors, object fetches, admission, node views.

`MeshRuntime` starts a MeshNode next to a RuntimeNode and attaches a `MeshCluster` to it; the
RuntimeNode then asks the cluster where to place work (the scheduler's PlacementPolicy over a
ClusterSnapshot built from the views peers push), and the cluster carries it to the chosen peer.

Protocols (all payloads msgpack; see docs/protocol/runtime.md):
  /latticaray/admit/1         unary   present a membership credential, get the peer's back
  /latticaray/runtime-view/1  unary   push this node's resources/load and the peers it knows
  /latticaray/task/1          bidi    one session per (caller node -> executor node): tasks,
                                      actor creation and calls, cancel, stream acks in; results,
                                      stream items and chunked large values out
  /latticaray/object/1        server  an object by id (from its owner) or by CID (from a holder)
  /latticaray/names/1         unary   named-actor claims and lookups at the name's arbiter
  /latticaray/ref/1           unary   borrow / unborrow registrations at an object's owner
Every handler refuses non-members before it decodes anything beyond the admission request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import time

import msgpack

from latticaray.mesh.connmgr import path_rank
from latticaray.mesh.errors import MeshError, RpcError
from latticaray.mesh.identity import KeyPair, PeerId
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.mesh.rpc import Status
from latticaray.runtime import refcount, serialization
from latticaray.runtime.admission import Admission, MeshKey
from latticaray.runtime.errors import (
    ActorDiedError,
    ActorNameTakenError,
    CredentialError,
    GetTimeoutError,
    NodeDiedError,
    ObjectLostError,
    TaskCancelledError,
    TaskUnschedulableError,
)
from latticaray.runtime.ids import object_id
from latticaray.runtime.node import (
    ERROR,
    OK,
    PENDING,
    STREAMING,
    ObjectEntry,
    TaskRecord,
    error_blob,
)
from latticaray.runtime.placement import DEFERRED
from latticaray.scheduler.policy import (
    ClusterSnapshot,
    DecisionKind,
    NodeView,
    PlacementPolicy,
    PlacementRequest,
)
from latticaray.state.actors import ActorState

log = logging.getLogger(__name__)

ADMIT_PROTOCOL = "/latticaray/admit/1"
VIEW_PROTOCOL = "/latticaray/runtime-view/1"
TASK_PROTOCOL = "/latticaray/task/1"
OBJECT_PROTOCOL = "/latticaray/object/1"
NAMES_PROTOCOL = "/latticaray/names/1"
STREAM_PROTOCOL = "/latticaray/stream/1"
STREAM_POLL = 20.0  # longest one remote stream_next waits at the owner before re-asking
REF_PROTOCOL = "/latticaray/ref/1"
MAX_REF_OPS = 65536

VIEW_INTERVAL = 0.3
PEER_DEAD_AFTER = 4.0
SESSION_TIMEOUT = 20 * 3600.0
MAX_INTRODUCED_ADDRS = 8
DHT_BOOTSTRAP_TIMEOUT = 30.0
CAPACITY_TTL = 15.0  # DHT capacity ads: lifetime, refresh period, least gap on change
CAPACITY_REFRESH = 5.0
CAPACITY_MIN_INTERVAL = 2.0
CAPACITY_WAIT = 10.0  # how long work no known node can take waits for DHT capacity ads
NAME_POLL_S = 0.2  # a lookup of a named actor pending placement re-asks this often,
NAME_SETTLE_S = 5.0  # ... past its creator's wait by this much (for the news to arrive)
MAX_SESSION_REOPENS = 5  # task sessions reopened per peer within SESSION_REOPEN_WINDOW
FENCE_TIMEOUT = 5.0  # a moved task session waits this long for the old one's fence
SESSION_REOPEN_WINDOW = 60.0
SEEN_TASKS = 10_000  # finished task ids an executor remembers per caller, and how long
SEEN_TASKS_TTL = 600.0
SEEN_RESULT_BYTES = 64 << 20  # reply bytes it keeps per caller to answer a re-sent task again
CHUNK = 4 << 20
#: A fetched object this large is joined from its chunks on an executor thread.
JOIN_OFF_LOOP = 8 << 20
BY_REF_ARG = 256 << 10
MAX_CONTROL_MESSAGE = 1 << 20
UNPACK_LIMITS = {"raw": False, "strict_map_key": False}


def _unpack(data: bytes) -> dict:
    message = msgpack.unpackb(data, **UNPACK_LIMITS)
    if not isinstance(message, dict):
        raise RpcError(Status.INVALID_ARGUMENT, "runtime messages are msgpack maps")
    return message


def _pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


class TaskSession:
    """One task session (caller side) to a peer: its outbox, the connection it runs on and the
    work sent over it whose reply has not come back (task/actor-call ids, ("create", aid)).

    When the peer's primary connection changes (relayed -> hole-punched direct), the session
    *retires*: it sends a ``fence`` and takes no new work; a new session on the new connection
    holds its messages until the executor answers the fence (``fenced``: everything sent before
    it has been dispatched, so per-caller order holds across the move), and the retired session
    stays open until every reply it owes has come back."""

    def __init__(self, gate: asyncio.Event | None = None):
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.conn = None
        self.pending: set = set()
        self.gate = gate
        self.next_gate: asyncio.Event | None = None
        self.retiring = False
        self.fenced = False


def _reply_key(message: dict, outgoing: bool):
    """What a session message is owed (outgoing) or settles (a reply): a task id, or
    ("create", actor id); None for anything else."""
    kind = message.get("k")
    if outgoing and kind in ("task", "acall"):
        return message["m"]["tid"]
    if outgoing and kind == "create":
        return ("create", message["m"]["aid"])
    if not outgoing and kind == "done":
        return message.get("tid")
    if not outgoing and kind == "created":
        return ("create", message.get("aid"))
    return None


class CallerTasks:
    """Executor side: the task and actor-call ids one caller node sent here, so that one it sends
    again (its task session broke or moved with the work in flight) is not run twice. A running
    one is answered on the session that sent it last; a finished one with its reply frames, kept
    while they fit in SEEN_RESULT_BYTES (oldest dropped first) for SEEN_TASKS_TTL. Only a message
    the caller marks as sent again (`again`) is matched: a retry or a lineage re-execution reuses
    the task id on purpose and runs. A finished id whose frames were dropped runs again when
    re-sent; one past SEEN_TASKS or SEEN_TASKS_TTL is forgotten.

    A streaming task keeps the frames of every item its consumer has not acknowledged (`ack`;
    at most the backpressure window of them while it runs) in ``streams``, counted in the same
    budget: a re-sent one gets the items from the count the caller says it has (`got`), then
    the later ones. When the budget is short the oldest finished replies go first, then the
    oldest kept items; a stream that lost items its caller still needs ends with an error
    instead of delivering a gap (``lost``: items below it are gone)."""

    def __init__(self):
        self.running: dict[bytes, RemoteClient] = {}
        # tid -> [finished at, frames | None, size, lost]
        self.finished: collections.OrderedDict[bytes, list] = collections.OrderedDict()
        self.streams: dict[bytes, StreamFrames] = {}
        self.result_bytes = 0

    def expire(self, now: float) -> None:
        finished = self.finished
        while finished:
            _tid, (at, _frames, size, _lost) = next(iter(finished.items()))
            if len(finished) <= SEEN_TASKS and now - at < SEEN_TASKS_TTL:
                break
            finished.popitem(last=False)
            self.result_bytes -= size

    def forget(self, tid: bytes) -> None:
        entry = self.finished.pop(tid, None)
        if entry is not None:
            self.result_bytes -= entry[2]
        stream = self.streams.pop(tid, None)
        if stream is not None:
            self.result_bytes -= stream.size

    def record(self, tid: bytes, frames: list, size: int, now: float, lost: int = 0) -> None:
        self.forget(tid)
        self.finished[tid] = [now, frames, size, lost]
        self.result_bytes += size
        self._trim()
        self.expire(now)

    def keep_item(self, tid: bytes, index: int, frames: list, size: int) -> None:
        """A streamed item went out (or would have, had the session been open): kept until
        the caller's consumer acknowledges it."""
        stream = self.streams.get(tid)
        if stream is None or index < stream.acked:
            return
        stream.items[index] = (frames, size)
        stream.size += size
        self.result_bytes += size
        self._trim()

    def acked(self, tid: bytes, consumed: int) -> None:
        stream = self.streams.get(tid)
        if stream is not None:
            self.result_bytes -= stream.drop_below(consumed)

    def stream_finished(self, tid: bytes, done_frames: list, size: int, now: float) -> None:
        """A streaming task ended: its unacknowledged items and its `done` are kept as one
        finished reply."""
        stream = self.streams.pop(tid, None)
        if stream is None:
            self.record(tid, done_frames, size, now)
            return
        self.result_bytes -= stream.size
        frames = [frame for item, _size in stream.items.values() for frame in item]
        self.record(tid, frames + done_frames, stream.size + size, now, stream.lost)

    def _trim(self) -> None:
        for entry in self.finished.values():
            if self.result_bytes <= SEEN_RESULT_BYTES:
                return
            if entry[1] is not None:
                self.result_bytes -= entry[2]
                entry[1], entry[2] = None, 0
        for stream in self.streams.values():
            while self.result_bytes > SEEN_RESULT_BYTES and stream.items:
                index, (_frames, size) = stream.items.popitem(last=False)
                stream.size -= size
                self.result_bytes -= size
                stream.lost = index + 1


class StreamFrames:
    """The kept frames of one running streaming task's unacknowledged items (see CallerTasks):
    index -> (frames, size), in order; items below ``acked`` were acknowledged, items below
    ``lost`` that were not are gone (budget)."""

    __slots__ = ("acked", "items", "lost", "size")

    def __init__(self):
        self.items: collections.OrderedDict[int, tuple[list, int]] = collections.OrderedDict()
        self.size = 0
        self.acked = 0
        self.lost = 0

    def drop_below(self, consumed: int) -> int:
        self.acked = max(self.acked, consumed)
        freed = 0
        while self.items and next(iter(self.items)) < consumed:
            _index, (_frames, size) = self.items.popitem(last=False)
            freed += size
        self.size -= freed
        return freed


class PeerState:
    """What this node knows about one admitted peer."""

    def __init__(self, node_id: str, peer_id):
        self.node_id = node_id
        self.peer_id = peer_id
        self.last_seen = time.monotonic()
        self.alive = True
        self.session: TaskSession | None = None
        self.retiring: list[TaskSession] = []
        self.inflight: dict[bytes, TaskRecord] = {}
        self.shipped: set[bytes] = set()
        self.parts: dict[tuple, list[bytes]] = {}
        self.view: dict = {}
        self.reopen_times: list[float] = []
        self.resent: set[bytes] = set()  # work to mark `again` when it is sent (see CallerTasks)

    def cancel_sessions(self) -> None:
        for session in [self.session, *self.retiring]:
            if (
                session is not None
                and session.task is not None
                and session.task is not asyncio.current_task()
            ):
                session.task.cancel()
        self.session = None
        self.retiring = []


class OwnedActor:
    """An actor this node created (owns): where it lives and how many restarts it used."""

    def __init__(self, aid: bytes, message: dict, host: str):
        self.aid = aid
        self.message = message
        self.host = host
        self.restarts = 0
        self.max_restarts = int(message["opts"].get("max_restarts", 0))
        self.dead_cause: str | None = None


class RemoteClient:
    """A peer that opened a task session to this node, as a client of the RuntimeNode."""

    kind = "remote"
    current_task = None
    ref_holds = None  # its caller node counts the refs

    def __init__(self, cluster: MeshCluster, node_id: str, outbox: asyncio.Queue):
        self.cluster = cluster
        self.node_id = node_id
        self.outbox = outbox
        self.closed = False
        self.held_back: list | None = None  # replies waiting for this node's registrations

    def send(self, message: dict) -> None:
        if self.closed:
            return
        vals = message.get("vals")
        if (
            message.get("k") == "done"
            and vals
            and any(
                serialization.is_store_ref(v) and v[len(serialization.STORE_MAGIC) :][:1] != b"b"
                for v in vals
            )
        ):
            # results under local names: hashed off the event loop, sent in their turn
            self.outbox.put_nowait(self.cluster.spawn(self._packed_portable(message)))
        else:
            self.outbox.put_nowait(_pack(message))

    async def _packed_portable(self, message: dict) -> bytes:
        node = self.cluster.node
        vals, named = message["vals"], []
        try:
            out = []
            for v in vals:
                if serialization.is_store_ref(v):
                    portable = await node.portable_async(v, awaiting_fetch=True)
                    if portable is not v:
                        named.append(serialization.store_name(portable))
                    v = portable
                out.append(v)
            message["vals"] = out
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # the caller gets an error, not the results, so it never answers "fetched": the
            # results kept for it (`on_task_complete`) are let go of here
            for cid in named:
                node.name_fetched(cid)
            for v in vals:
                name = serialization.store_name(v) if serialization.is_store_ref(v) else None
                if name is not None and node.store_refs.get(name, 0) > 0:
                    node._unpin(name)
            message = {
                "k": "done",
                "tid": message["tid"],
                "err": error_blob(
                    ObjectLostError(f"a result could not be named by CID to send it: {exc!r}")
                ),
            }
        return _pack(message)

    def _send_value(self, tid: bytes, slot, data: bytes, sent: list | None = None) -> bytes | None:
        """Large values travel as parts ahead of the frame that refers to them. A store value's
        buffers are not copied here: its parts are slices of the store's mapping (the views keep
        the mapped bytes, whatever becomes of the object), packed one by one as the session's
        flow control takes them. ``sent`` collects ``(slot, pieces)`` to answer a re-sent task."""
        if data is None:
            return None
        pieces = serialization.materialize_pieces(data)
        if sum(len(p) for p in pieces) <= CHUNK:
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if sent is not None:
            sent.append((slot, pieces))
        if not self.closed:
            self.outbox.put_nowait(self._parts(tid, slot, pieces))
        return None

    @staticmethod
    async def _parts(tid: bytes, slot, pieces: list):
        for piece in pieces:
            view = memoryview(piece)
            for start in range(0, len(view), CHUNK):
                yield _pack(
                    {"k": "part", "tid": tid, "slot": slot, "d": view[start : start + CHUNK]}
                )

    def on_task_complete(self, rec: TaskRecord, message: dict, answering: bool = False) -> None:
        seen = self.cluster.seen_tasks.get(self.node_id)
        answerer = seen.running.pop(rec.tid, None) if seen is not None else None
        if answerer is not None and answerer is not self:
            # the task was sent again on a later session
            answerer.on_task_complete(rec, message, answering=True)
            return
        if answering:
            answerer = self
        node = self.cluster.node
        tid = rec.tid
        parts: list = []
        out = {"k": "done", "tid": tid}
        if message.get("err") is not None:
            out["err"] = message["err"]
            out["mro"] = message.get("mro", [])
        if "vals" in message:
            # store results keep their local names until `send` names them by CID
            out["vals"] = [
                v
                if self.cluster.exchange is not None and serialization.is_store_ref(v)
                else self._send_value(tid, i, v, parts)
                for i, v in enumerate(message["vals"])
            ]
        if rec.nret == STREAMING:
            node.streams.pop(tid, None)
        else:
            if message.get("inner"):  # held here until the caller holds them (`held`)
                node.refs.forward(tid, self.node_id, [object_id(tid, i) for i in range(rec.nret)])
                out["inner"] = message["inner"]
            sent_by_ref = {
                i for i, v in enumerate(out.get("vals") or []) if serialization.is_store_ref(v)
            }
            for i in range(rec.nret):
                entry = node.objects.pop(object_id(tid, i), None)
                # a store object sent by reference stays until the caller says it has its copy
                if entry is not None and i not in sent_by_ref:
                    node._forget(entry)
        if answerer is not None:  # kept to answer this task id again if it is re-sent
            size = (
                _parts_size(parts)
                + len(out.get("err") or b"")
                + sum(len(v) for v in out.get("vals") or [] if v is not None)
            )
            if rec.nret == STREAMING:
                seen.stream_finished(tid, [*parts, out], size, time.monotonic())
            else:
                seen.record(tid, [*parts, out], size, time.monotonic())
        elif seen is not None and rec.nret == STREAMING:
            seen.forget(tid)  # detached (`_replay_stream`): nothing is kept for it
        # refs the task borrowed are registered with their owners before the caller, which
        # lets go of the task's arguments on `done`, hears of it
        self._send_settled(out)

    def _send_settled(self, out: dict) -> None:
        """Send once every borrow registration made so far has reached its owner, in order."""
        if self.held_back is not None:
            self.held_back.append(out)
        elif self.cluster.node.refs.unsettled():
            self.held_back = [out]
            self.cluster.spawn(self._send_when_settled())
        else:
            self.send(out)

    async def _send_when_settled(self) -> None:
        await self.cluster.node.refs.settled()
        held, self.held_back = self.held_back, None
        for out in held:
            self.send(out)

    def on_task_yield(self, rec: TaskRecord, message: dict) -> None:
        tid, index = rec.tid, message["i"]
        seen = self.cluster.seen_tasks.get(self.node_id)
        streamer = seen.running.get(tid, self) if seen is not None else self
        if streamer is not self:  # the task was sent again on a later session
            streamer.on_task_yield(rec, message)
            return
        oid = object_id(tid, index)
        node = self.cluster.node
        parts: list = []
        data = self._send_value(tid, ("y", index), message["d"], parts)
        out = {"k": "yield", "tid": tid, "i": index, "d": data}
        if message.get("inner"):  # held here until the caller holds them (`held` with oid)
            node.refs.forward(oid, self.node_id, [oid])
            out["inner"] = message["inner"]
        if seen is not None:  # kept until acknowledged, to deliver again if the task is re-sent
            seen.keep_item(tid, index, [*parts, out], _parts_size(parts) + len(data or b""))
        self._send_settled(out)
        entry = node.objects.pop(oid, None)
        if entry is not None:
            node._forget(entry)


def _parts_size(parts: list) -> int:
    return sum(len(piece) for _, pieces in parts for piece in pieces)


class MeshCluster:
    """Placement across peers, remote execution, object fetches and admission for one node."""

    def __init__(self, node, mesh: MeshNode, admission: Admission):
        self.node = node
        self.mesh = mesh
        self.admission = admission
        self.node_id = node.node_id
        self.loop = asyncio.get_running_loop()
        self.peers: dict[str, PeerState] = {}
        self.snapshot = ClusterSnapshot(local_node=self.node_id)
        self.policy = PlacementPolicy()
        self.owned_actors: dict[bytes, OwnedActor] = {}
        self.actor_outbox: dict[bytes, collections.deque] = {}
        self.actor_location: dict[bytes, str] = {}
        self.names: dict[tuple[str, str], dict] = {}
        # named creations waiting for placement under a pending claim: "ns/name" -> (aid, settle)
        self._pending_names: dict[str, tuple] = {}
        self.stats = collections.Counter()
        self.seen_tasks: dict[str, CallerTasks] = {}  # executor side, per caller node
        self.gone_waiters: dict[str, list[asyncio.Future]] = {}  # node id -> set when it dies
        self.state = None  # latticaray.state StateService: members and named-actor claims (CRDT)
        self.exchange = None  # latticaray.objectstore ObjectExchange: store objects between nodes
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False
        self._last_member_publish = 0.0
        self._introducing: set[str] = set()
        self.placement = None  # runtime.placement DhtPlacement: candidates from DHT capacity ads
        self.sparse = False  # meet peers only when needed: no admission on connect/introduction
        # the node embedded in a driver process (init()): it ends with the driver, so a detached
        # actor is placed on another node when one can host it
        self.embedded = False

    # ------------------------------------------------------------------ lifecycle
    def register(self) -> None:
        mesh = self.mesh
        mesh.register_unary(ADMIT_PROTOCOL, self._serve_admit)
        mesh.register_unary(VIEW_PROTOCOL, self._serve_view)
        mesh.register_bidi(TASK_PROTOCOL, self._serve_session)
        mesh.register_server_stream(OBJECT_PROTOCOL, self._serve_object)
        mesh.register_unary(REF_PROTOCOL, self._serve_ref)
        mesh.register_unary(NAMES_PROTOCOL, self._serve_names)
        mesh.register_unary(STREAM_PROTOCOL, self._serve_stream_next)
        mesh.on_peer_connected(lambda peer: self.sparse or self.spawn(self._admit_with(peer)))
        mesh.on_peer_disconnected(lambda peer: self._peer_gone(str(peer), "disconnected"))
        mesh.connections.on_connection_added(self._on_connection_added)
        self.spawn(self._view_loop())

    def spawn(self, coro) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ admission
    async def join(self, addr: str) -> None:
        peer = await self.mesh.connect(addr, timeout=10.0)
        await self._admit_with(peer)

    async def _admit_with(self, peer) -> None:
        node_id = str(peer)
        if node_id in self.peers and self.peers[node_id].alive:
            return
        if not self.admission.is_member:
            return
        try:
            reply = await self.mesh.call(
                peer, ADMIT_PROTOCOL, _pack({"cred": self.admission.own_credential}), timeout=10.0
            )
            their = _unpack(reply).get("cred")
            self.admission.admit(node_id, their)
        except (MeshError, CredentialError, ValueError) as exc:
            log.info("peer %s was not admitted: %s", node_id, exc)
            return
        self._add_peer(node_id, peer)

    async def _serve_admit(self, ctx, payload: bytes) -> bytes:
        if len(payload) > 4096:
            raise RpcError(Status.INVALID_ARGUMENT, "admission request too large")
        if not self.admission.is_member:
            raise RpcError(Status.PERMISSION_DENIED, "this node is not a member of a mesh")
        try:
            credential = msgpack.unpackb(payload, raw=False, max_str_len=2048, max_map_len=4).get(
                "cred"
            )
            self.admission.admit(str(ctx.peer_id), credential)
        except (CredentialError, ValueError, AttributeError, TypeError) as exc:
            self.stats["admission_refused"] += 1
            raise RpcError(
                Status.PERMISSION_DENIED, f"membership credential refused: {exc}"
            ) from exc
        self._add_peer(str(ctx.peer_id), ctx.peer_id)
        return _pack({"cred": self.admission.own_credential})

    def _require_member(self, ctx) -> str:
        node_id = str(ctx.peer_id)
        if not self.admission.allowed(node_id):
            self.stats["refused_non_member"] += 1
            raise RpcError(
                Status.PERMISSION_DENIED,
                f"peer {node_id} is not a member of this mesh; request refused unread",
            )
        return node_id

    def _add_peer(self, node_id: str, peer_id) -> PeerState:
        state = self.peers.get(node_id)
        if state is None or not state.alive:
            state = PeerState(node_id, peer_id)
            self.peers[node_id] = state
            self.spawn(self._push_view(state))
        return state

    # ------------------------------------------------------------------ views and liveness
    def _local_view(self) -> NodeView:
        node = self.node
        running = sum(len(w.tasks) for w in node.task_workers)
        return NodeView(
            self.node_id,
            dict(node.total_resources),
            node.ledger.available,
            queued=len(node.ready_queue),
            running=running,
            ad_time=time.monotonic(),
        )

    def _view_payload(self) -> bytes:
        view = self._local_view()
        peers = {}
        for state in self.peers.values():
            if state.alive:
                peers[state.node_id] = [str(a) for a in self.mesh.addrs_of(state.peer_id)]
        return _pack(
            {
                "total": view.total,
                "avail": view.available,
                "queued": view.queued,
                "running": view.running,
                "peers": peers,
                # a pending claim stays with its arbiter: a copy could outlive its release
                "names": [
                    [ns, name, rec]
                    for (ns, name), rec in self.names.items()
                    if not rec.get("pending")
                ],
            }
        )

    def _publish_member(self, now: float) -> None:
        """Capacity into the CRDT `members` collection (load hints travel in views)."""
        if self.state is None or now - self._last_member_publish < 1.0:
            return
        self._last_member_publish = now
        try:
            self.state.members.upsert_self(
                addrs=[str(a) for a in self.mesh.advertised_addrs],
                resources_total=dict(self.node.total_resources),
                resources_available=self.node.ledger.available,
            )
        except Exception as exc:  # a rejected write must not stop the view loop
            log.debug("member entry not published: %s", exc)

    async def _view_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(VIEW_INTERVAL)
            now = time.monotonic()
            self._publish_member(now)
            payload = self._view_payload()
            for state in list(self.peers.values()):
                if not state.alive:
                    continue
                if now - state.last_seen > PEER_DEAD_AFTER:
                    self._peer_gone(state.node_id, "stopped answering")
                    continue
                self.spawn(self._push_view(state, payload))

    async def _push_view(self, state: PeerState, payload: bytes | None = None) -> None:
        try:
            await self.mesh.call(
                state.peer_id, VIEW_PROTOCOL, payload or self._view_payload(), timeout=2.0
            )
        except MeshError:
            pass

    async def _serve_view(self, ctx, payload: bytes) -> bytes:
        node_id = self._require_member(ctx)
        view = _unpack(payload)
        state = self.peers.get(node_id)
        if state is None or not state.alive:
            state = self._add_peer(node_id, ctx.peer_id)
        state.last_seen = time.monotonic()
        first_view = not state.view
        state.view = view
        self.snapshot.update_node(
            NodeView(
                node_id,
                dict(view.get("total", {})),
                dict(view.get("avail", {})),
                queued=int(view.get("queued", 0)),
                running=int(view.get("running", 0)),
                ad_time=time.monotonic(),
            )
        )
        if first_view and self.placement is not None:
            self.placement.peer_ready()
        for other, addrs in (view.get("peers") or {}).items():
            if other != self.node_id and other not in self.peers and addrs and not self.sparse:
                self.spawn(self._introduce(other, addrs))
        for ns, name, rec in view.get("names") or []:
            self.names.setdefault((ns, name), rec)
        return b""

    async def _introduce(self, node_id: str, addrs: list[str]) -> None:
        """Meet a peer another member told us about: its addresses (circuit ones included) go to
        the peer store and the connection manager picks the path (direct, relayed, or both raced)."""
        if node_id in self._introducing:
            return
        self._introducing.add(node_id)
        try:
            peer = PeerId.from_string(node_id)
            self.mesh.add_addrs(
                peer, [a for a in addrs[:MAX_INTRODUCED_ADDRS] if isinstance(a, str)]
            )
        except (MeshError, ValueError, TypeError) as exc:
            log.debug("introduction of %s ignored: %s", node_id, exc)
            self._introducing.discard(node_id)
            return
        try:
            await self._admit_with(peer)
        finally:
            self._introducing.discard(node_id)

    def alive_peers(self) -> list[str]:
        return [n for n, s in self.peers.items() if s.alive]

    def _peer_gone(self, node_id: str, why: str) -> None:
        state = self.peers.get(node_id)
        if state is None or not state.alive:
            return
        state.alive = False
        self.node.refs.node_gone(node_id)
        refcount.kill_orphaned_actors(self.node, node_id)
        self.stats["peers_lost"] += 1
        self.seen_tasks.pop(node_id, None)
        for waiter in self.gone_waiters.pop(node_id, ()):
            if not waiter.done():
                waiter.set_result(None)
        log.info("peer %s is gone (%s)", node_id, why)
        self.snapshot.remove_node(node_id)
        if self.placement is not None:
            self.placement.peer_gone(node_id)
        state.cancel_sessions()
        state.resent.clear()
        inflight = list(state.inflight.values())
        state.inflight.clear()
        for rec in inflight:
            rec.remote_peer = None
            if rec.done:
                continue
            if "aid" in rec.msg:
                self._actor_call_lost(rec, node_id)
            elif rec.cancelled:
                self.node._fail(rec, TaskCancelledError(f"task {rec.name} was cancelled"))
            elif self.node._stream_started(rec):
                self.node._fail(
                    rec,
                    NodeDiedError(
                        f"node {node_id} running streaming task {rec.name} died mid-stream"
                    ),
                )
            elif rec.retries_left != 0:
                rec.retries_left -= 1
                self.stats["retries"] += 1
                rec.excluded = (rec.excluded or set()) | {node_id}
                self.node._schedule(rec)
            else:
                self.node._fail(
                    rec,
                    NodeDiedError(
                        f"node {node_id} running task {rec.name} died and no retries are left"
                    ),
                )
        for owned in list(self.owned_actors.values()):
            if owned.host == node_id and owned.dead_cause is None:
                self._restart_owned_actor(owned, node_id)

    def nodes(self) -> list[dict]:
        out = [self.node.local_view()]
        for node_id, state in self.peers.items():
            view = state.view
            if not view:
                continue  # admitted, but its first view (its capacity) has not arrived yet
            out.append(
                {
                    "NodeID": node_id,
                    "Alive": state.alive,
                    "Resources": dict(view.get("total", {})),
                    "Available": dict(view.get("avail", {})) if state.alive else {},
                }
            )
        return out

    # ------------------------------------------------------------------ placement
    def place_task(self, rec: TaskRecord):
        """A peer's id, None (run here), DEFERRED (waits for DHT capacity ads) or the
        TaskUnschedulableError to fail the task with."""
        placement = self.placement
        if placement is not None:
            placement.note_demand(rec.demand)
        if not any(s.alive for s in self.peers.values()) and (
            placement is None or self.node.ledger.could_ever_fit(rec.demand)
        ):
            return None
        strategy = rec.msg["opts"].get("strategy")
        target = self._place(rec.tid.hex(), rec.demand, strategy, rec.excluded)
        hard_affinity = isinstance(strategy, dict) and not strategy.get("soft")
        if (
            isinstance(target, TaskUnschedulableError)
            and placement is not None
            and not hard_affinity
        ):
            return placement.defer(
                rec.tid.hex(),
                rec.demand,
                target.reason,
                retry=lambda: self.node._schedule(rec),
                fail=lambda exc: self.node._fail(rec, exc),
                settled=lambda: rec.done,
            )
        return target

    def _place(self, request_id: str, demand: dict, strategy, excluded=None):
        if isinstance(strategy, dict):
            target = strategy["affinity"]
            alive = target == self.node_id or (target in self.peers and self.peers[target].alive)
            if alive and not (excluded and target in excluded):
                return target
            if not strategy.get("soft"):
                return TaskUnschedulableError(
                    request_id,
                    f"node affinity to {target}, which is not an alive member of the mesh",
                )
            strategy = None
        self.snapshot.update_node(self._local_view())
        request = PlacementRequest(
            request_id,
            dict(demand),
            self.node_id,
            strategy="SPREAD" if strategy == "SPREAD" else "DEFAULT",
            excluded=frozenset(excluded or ()),
        )
        decision = self.policy.place(self.snapshot, request, time.monotonic())
        if decision.kind is DecisionKind.PLACE:
            return decision.node_id
        if decision.kind is DecisionKind.INFEASIBLE:
            return TaskUnschedulableError(request_id, decision.reason)
        return None

    # ------------------------------------------------------------------ sessions (caller side)
    def _send(self, node_id: str, message: dict) -> bool:
        state = self.peers.get(node_id)
        if state is None or not state.alive:
            return False
        session = state.session
        if session is None:
            session = state.session = TaskSession()
            session.task = self.spawn(self._session(state, session))
        key = _reply_key(message, True)
        if key is not None:
            session.pending.add(key)
        session.outbox.put_nowait(message)
        return True

    async def _session(self, state: PeerState, session: TaskSession) -> None:
        try:
            conn = await self.mesh.connections.get(state.peer_id, SESSION_TIMEOUT)
            call = conn.session.call_bidi(TASK_PROTOCOL, SESSION_TIMEOUT)
            session.conn = conn
            reader = self.spawn(self._session_replies(state, session, call))
            try:
                if session.gate is not None and not session.gate.is_set():
                    try:
                        await asyncio.wait_for(session.gate.wait(), FENCE_TIMEOUT)
                    except TimeoutError:
                        log.info(
                            "no fence from %s's previous task session within %.0f s",
                            state.node_id,
                            FENCE_TIMEOUT,
                        )
                self._move_session(state)  # the path may have changed while we opened
                while True:
                    message = await session.outbox.get()
                    if message.get("k") in ("task", "acall", "create"):
                        # in line: what this peer is sent after it waits for its hashing
                        await self._portable_args(message["m"]["args"])
                    await call.send(_pack(message))
            finally:
                reader.cancel()
                call.cancel()
        except asyncio.CancelledError:
            raise
        except MeshError as exc:
            self._session_lost(state, f"task session failed: {exc}", session)

    async def _session_replies(self, state: PeerState, session: TaskSession, call) -> None:
        try:
            async for raw in call:
                message = _unpack(raw)
                if message.get("k") == "fenced":
                    session.fenced = True
                    if session.next_gate is not None:
                        session.next_gate.set()
                else:
                    self._on_session_reply(state, message)
                    session.pending.discard(_reply_key(message, False))
                if session.retiring:
                    self._retire_if_drained(state, session)
        except asyncio.CancelledError:
            raise
        except (MeshError, ValueError) as exc:
            self._session_lost(state, f"task session broke: {exc}", session)
            return
        self._session_lost(state, "task session ended", session)

    # -- moving task sessions to a better path -------------------------------------------------
    def _on_connection_added(self, conn) -> None:
        state = self.peers.get(str(conn.peer_id))
        if state is not None and state.alive and not self._stopped:
            self._move_session(state)

    def _move_session(self, state: PeerState) -> None:
        """If the peer's primary connection is a better path than the one the task session runs
        on (a hole-punched direct path replaced the relay), open a new session on the primary
        for new work and let the old one finish the work it carries (see TaskSession)."""
        old = state.session
        if old is None or old.conn is None or old.retiring:
            return
        primary = self.mesh.connection_to(state.peer_id)
        if primary is None or path_rank(primary.transport) >= path_rank(old.conn.transport):
            return
        old.retiring = True
        old.next_gate = asyncio.Event()
        old.outbox.put_nowait({"k": "fence"})
        state.retiring.append(old)
        new = state.session = TaskSession(old.next_gate)
        new.task = self.spawn(self._session(state, new))
        self.stats["sessions_moved"] += 1
        log.info(
            "task session to %s moves from %s to %s (%d replies still due on the old one)",
            state.node_id,
            old.conn.transport,
            primary.transport,
            len(old.pending),
        )

    def _retire_if_drained(self, state: PeerState, session: TaskSession) -> None:
        session.pending = {
            k for k in session.pending if not isinstance(k, bytes) or k in state.inflight
        }
        if session.fenced and not session.pending:
            if session in state.retiring:
                state.retiring.remove(session)
            session.task.cancel()

    def _session_lost(self, state: PeerState, why: str, session: TaskSession | None = None) -> None:
        """A task session ended. If the peer is still connected (its connection was replaced, e.g.
        relayed -> direct, and the old one closed before its replies came back), open a new
        session and send the work in flight again; otherwise the peer is gone."""
        if session is not None and session.retiring:
            self._retired_session_lost(state, why, session)
            return
        if session is not None and session is not state.session:
            return
        now = time.monotonic()
        state.reopen_times = [t for t in state.reopen_times if now - t < SESSION_REOPEN_WINDOW]
        if (
            not state.alive
            or self._stopped
            or self.mesh.connection_to(state.peer_id) is None
            or len(state.reopen_times) >= MAX_SESSION_REOPENS
        ):
            self._peer_gone(state.node_id, why)
            return
        state.reopen_times.append(now)
        self.stats["sessions_reopened"] += 1
        log.info("task session to %s reopened (%s)", state.node_id, why)
        state.cancel_sessions()
        state.shipped.clear()
        state.parts.clear()
        inflight = list(state.inflight.values())
        state.inflight.clear()
        self._resend(state, inflight)

    def _retired_session_lost(self, state: PeerState, why: str, session: TaskSession) -> None:
        """A retired session closed before all its replies came back (the old path's drain
        deadline passed, or it broke): that work is sent again on the current session."""
        if session in state.retiring:
            state.retiring.remove(session)
        if session.next_gate is not None:
            session.next_gate.set()
        if session.task is not None and session.task is not asyncio.current_task():
            session.task.cancel()
        lost = [
            state.inflight.pop(k)
            for k in session.pending
            if isinstance(k, bytes) and k in state.inflight
        ]
        lost_tids = {rec.tid for rec in lost}
        for key in [key for key in state.parts if key[0] in lost_tids]:
            del state.parts[key]  # a value cut off with the old path comes whole again
        if not state.alive or self._stopped:
            return
        if lost:
            log.info(
                "task session to %s closed with %d tasks in flight on the old path (%s); "
                "sending them again",
                state.node_id,
                len(lost),
                why,
            )
            self.stats["tasks_resent"] += len(lost)
            state.shipped.clear()
        self._resend(state, lost)

    def _resend(self, state: PeerState, inflight: list) -> None:
        actors = set()
        for rec in inflight:
            rec.remote_peer = None
            if rec.done:
                continue
            if "aid" in rec.msg:
                state.resent.add(rec.tid)
                self._actor_call_lost(rec, state.node_id)
                actors.add(rec.msg["aid"])
            elif rec.cancelled:
                self.node._fail(rec, TaskCancelledError(f"task {rec.name} was cancelled"))
            else:  # a streaming one too: the executor re-delivers what the caller lacks
                state.resent.add(rec.tid)
                self.run_remote(rec, state.node_id)
        for aid in actors:
            self.pump_actor(aid)

    def _on_session_reply(self, state: PeerState, message: dict) -> None:
        kind = message["k"]
        tid = message.get("tid")
        if kind == "part":
            slot = message["slot"]
            key = (tid, tuple(slot) if isinstance(slot, list) else slot)
            state.parts.setdefault(key, []).append(message["d"])
            return
        if kind == "yield":
            stream = self.node.streams.get(tid)
            if stream is not None and message["i"] < stream.count:  # delivered before
                state.parts.pop((tid, ("y", message["i"])), None)
                return
            data = message["d"]
            if data is None:
                data = b"".join(state.parts.pop((tid, ("y", message["i"])), []))
            inner = message.get("inner")
            self.node._on_yield({"tid": tid, "i": message["i"], "d": data, "inner": inner})
            if inner:  # counted here now: the executor may let go of them
                self.ack_held(state.node_id, object_id(tid, message["i"]))
            return
        if kind == "done":
            rec = state.inflight.pop(tid, None)
            if rec is None or rec.done:
                return
            rec.remote_peer = None
            if message.get("inner"):  # refs inside the results: the executor holds them until
                message["held_by"] = state.node_id  # node._complete has counted them here
            if "vals" in message:
                message["vals"] = [
                    v if v is not None else b"".join(state.parts.pop((tid, i), []))
                    for i, v in enumerate(message["vals"])
                ]
            if (
                message.get("err") is not None
                and not rec.cancelled
                and self.node._should_retry_exception(rec, message.get("mro", []))
            ):
                rec.retries_left -= 1
                self.node._schedule(rec)
                return
            self._complete_remote(state, rec, message)
            return
        if kind == "created":
            owned = self.owned_actors.get(message["aid"])
            if owned is not None and message.get("error") is not None:
                owned.dead_cause = str(serialization.deserialize(message["error"]))
                self._fail_actor_calls(owned.aid, owned.dead_cause)

    def _complete_remote(self, state: PeerState, rec: TaskRecord, message: dict) -> None:
        """Seal a remote task's results. A store result this node lacks stays on the executor
        (its `holder`, which keeps it pinned until told `fetched`): it is fetched when it is
        needed here, and re-created from lineage if that node is gone by then."""
        node = self.node
        local = []
        for i, value in enumerate(message.get("vals") or []):
            if not serialization.is_store_ref(value):
                continue
            cid = serialization.store_cid(value)
            entry = node.objects.get(object_id(rec.tid, i))
            if (
                self.exchange is not None
                and entry is not None
                and entry.status == PENDING
                and not node.store.contains(cid)
            ):
                entry.holder = state.node_id
            else:
                local.append(cid)
        if local:
            self.unpin_at(state.node_id, local)
        node._complete(rec, message)

    def unpin_at(self, node_id: str, cids: list[str]) -> None:
        """Tell the node that ran a task it need not keep these store results for us any more."""
        self._send(node_id, {"k": "fetched", "cids": cids})

    def _wire_args(self, args: list) -> list:
        """Arguments as a peer is sent them. A store reference keeps its local name here: the
        task session names it by CID (``_portable_args``) when the message goes out."""
        if args[0] == "b":  # a copy: naming it by CID must not rename the caller's pin
            return ["b", args[1]] if serialization.is_store_ref(args[1]) else args

        def slim(item):
            # a resolved argument: [0, value, object id, owner]; a borrowed one is fetched
            # from its owner (which recovers it if lost), an owned one from us
            owner = item[3] if len(item) > 3 and item[3] else self.node_id
            if item[0] == 0 and len(item) > 2 and serialization.is_store_ref(item[1]):
                if self.exchange is None:
                    return [1, item[2], owner]
                # fetched by CID, else from its owner; named: the node holding the only copy
                entry = self.node.objects.get(item[2])
                if entry is not None and entry.holder is not None:
                    return [0, item[1], item[2], owner, entry.holder]
                return [0, item[1], item[2], owner]
            if item[0] == 0 and len(item) > 2 and len(item[1]) > BY_REF_ARG:
                return [1, item[2], owner]
            return item[:3] if item[0] == 1 else item[:2]  # a ref keeps its owner

        return ["l", [slim(i) for i in args[1]], {k: slim(v) for k, v in args[2].items()}]

    async def _portable_args(self, args: list) -> None:
        """Name the store references among wired arguments by CID; a local put is hashed off
        the event loop. One that cannot be resolved (deleted meanwhile) goes by reference."""
        if args[0] == "b":
            if serialization.is_store_ref(args[1]):  # all arguments, stored as one value
                # unnamed: the peer reports the arguments it cannot find
                args[1] = await self._named_by_cid(args[1], "arguments") or args[1]
            return
        for item in [*args[1], *args[2].values()]:
            if item[0] != 0 or not serialization.is_store_ref(item[1]):
                continue
            named = await self._named_by_cid(item[1], "argument")
            if named is not None:
                item[1] = named
            elif len(item) > 3:
                item[:] = [1, item[2], item[3]]

    async def _named_by_cid(self, data: bytes, what: str) -> bytes | None:
        """``data`` named by CID for a peer, or None (logged) when its object is gone."""
        try:
            return await self.node.portable_async(data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "%s %s could not be named by CID: %r", what, serialization.store_name(data), exc
            )
            return None

    def run_remote(self, rec: TaskRecord, target: str) -> None:
        state = self.peers[target]
        msg = rec.msg
        out = {
            "tid": rec.tid,
            "fn": msg["fn"],
            "name": rec.name,
            "nret": rec.nret,
            "args": self._wire_args(msg["args"]),
            "opts": dict(msg["opts"], placed=True),
        }
        if msg["fn"] not in state.shipped:
            out["blob"] = self.node.code[msg["fn"]]
            state.shipped.add(msg["fn"])
        stream = None
        if rec.tid in state.resent:
            state.resent.discard(rec.tid)
            out["again"] = True
            stream = self.node.streams.get(rec.tid) if rec.nret == STREAMING else None
            if stream is not None:
                out["got"] = stream.count
        rec.remote_peer = target
        state.inflight[rec.tid] = rec
        self.stats["remote_tasks"] += 1
        if not self._send(target, {"k": "task", "m": out}):
            state.inflight.pop(rec.tid, None)
            rec.remote_peer = None
            self.node.ready_queue.append(rec)
            self.node._dispatch()
        elif stream is not None and stream.consumed:  # an ack lost with the old session
            self._send(target, {"k": "ack", "tid": rec.tid, "n": stream.consumed})

    def cancel_remote(self, rec: TaskRecord, force: bool) -> None:
        self._send(rec.remote_peer, {"k": "cancel", "tid": rec.tid, "force": force})

    def ack_remote_stream(self, tid: bytes, consumed: int) -> None:
        rec = self.node.tasks.get(tid)
        if rec is not None and rec.remote_peer is not None:
            self._send(rec.remote_peer, {"k": "ack", "tid": tid, "n": consumed})

    # ------------------------------------------------------------------ sessions (executor side)
    async def _serve_session(self, ctx, requests):
        caller = self._require_member(ctx)
        outbox: asyncio.Queue = asyncio.Queue()
        client = RemoteClient(self, caller, outbox)
        reader = self.spawn(self._session_requests(client, requests))
        reader.add_done_callback(lambda _t: outbox.put_nowait(None))
        try:
            while True:
                frame = await outbox.get()
                if frame is None:
                    break
                if isinstance(frame, asyncio.Future):
                    frame = await frame
                elif not isinstance(frame, bytes):  # a value's parts (`_send_value`)
                    async for part in frame:
                        yield part
                        await asyncio.sleep(0)  # a window's worth of parts is no single step
                    continue
                yield frame
        finally:
            client.closed = True
            reader.cancel()

    async def _session_requests(self, client: RemoteClient, requests) -> None:
        node = self.node
        async for raw in requests:
            if not self.admission.allowed(client.node_id):
                return
            message = _unpack(raw)
            kind = message.get("k")
            if kind == "task":
                task = message["m"]
                if "blob" in task:
                    node.code[task["fn"]] = task.pop("blob")
                if task["fn"] not in node.code:
                    client.send(
                        {
                            "k": "done",
                            "tid": task["tid"],
                            "err": error_blob(RuntimeError("executor lacks the task's code")),
                        }
                    )
                    continue
                if self._seen_before(client, task):
                    continue
                task["opts"]["placed"] = True
                task["op"] = "submit"
                missing = self._missing_store_args(task["args"])
                if missing:
                    self.spawn(
                        self._fetch_then(
                            missing, client.node_id, lambda t=task: node._on_submit(t, client)
                        )
                    )
                else:
                    node._on_submit(task, client)
            elif kind == "acall":
                call = message["m"]
                if self._seen_before(client, call):
                    continue
                call["anode"] = self.node_id
                missing = self._missing_store_args(call["args"])
                if missing:  # in line: later calls of this caller must not overtake it
                    await self._fetch_then(missing, client.node_id, lambda: None)
                node._on_actor_call(call, client)
            elif kind == "create":
                create = message["m"]
                if "blob" in create:
                    node.code[create["cls"]] = create.pop("blob")
                missing = self._missing_store_args(create["args"])
                if missing:  # in line: the actor's calls come after its creation
                    await self._fetch_then(missing, client.node_id, lambda: None)
                reply = node.host_actor(create)
                client.send({"k": "created", "aid": create["aid"], "error": reply.get("error")})
            elif kind == "fence":  # the caller moves to a new session once this is answered
                client.send({"k": "fenced"})
            elif kind == "cancel":
                node.cancel_task(message["tid"], bool(message.get("force")), True)
            elif kind == "ack":
                seen = self.seen_tasks.get(client.node_id)
                if seen is not None:
                    seen.acked(message["tid"], message["n"])
                stream = node.streams.get(message["tid"])
                if stream is not None and message["n"] > stream.consumed:
                    stream.consumed = message["n"]
                    node._ack_stream(message["tid"], stream)
            elif kind == "kill":
                node._on_kill(
                    {"aid": message["aid"], "no_restart": message.get("no_restart")}, client
                )
            elif kind == "held":  # the caller counts the refs inside a task's results now
                node.refs.held(message["tid"], client.node_id)
            elif kind == "fetched":  # the caller has its own copies of these results now
                for cid in message.get("cids", [])[:1024]:
                    cid = node.name_fetched(cid)
                    if node.store_refs.get(cid, 0) > 0:
                        node._unpin(cid)

    def _seen_before(self, client: RemoteClient, message: dict) -> bool:
        """Whether this caller sent this task id before (see CallerTasks): if it did, the re-sent
        message is attached to that run, or answered with its kept reply; if not, it is noted.
        A re-sent streaming task carries `got`, the items its caller has already."""
        tid = message["tid"]
        streaming = message.get("nret") == STREAMING
        got = message.pop("got", 0) if streaming else 0
        seen = self.seen_tasks.setdefault(client.node_id, CallerTasks())
        seen.expire(time.monotonic())
        if not message.pop("again", False):
            seen.forget(tid)
            seen.running[tid] = client
            if streaming:
                seen.streams[tid] = StreamFrames()
            return False
        if tid in seen.running:
            seen.running[tid] = client
            self.stats["resent_tasks_attached"] += 1
            if streaming:
                self._replay_stream(client, seen, tid, got)
            return True
        finished = seen.finished.get(tid)
        if finished is not None and finished[1] is not None and got >= finished[3]:
            self.stats["resent_tasks_answered"] += 1
            self._replay(client, tid, finished[1], got)
            return True
        if streaming and got > 0:  # running it again would deliver the caller's items twice
            self._stream_items_gone(client, tid, got)
            return True
        if finished is not None:  # its reply is gone: it runs again
            seen.forget(tid)
        seen.running[tid] = client
        if streaming:
            seen.streams[tid] = StreamFrames()
        return False

    @staticmethod
    def _replay(client: RemoteClient, tid: bytes, frames: list, got: int = 0) -> None:
        """Send kept frames again (`part` pieces as (slot, pieces), messages as maps), less
        the streamed items below `got`, which the caller has."""
        for frame in frames:
            if isinstance(frame, dict):
                if frame.get("k") != "yield" or frame["i"] >= got:
                    client._send_settled(frame)
                continue
            slot, pieces = frame
            if isinstance(slot, tuple) and slot[1] < got:
                continue
            if not client.closed:
                client.outbox.put_nowait(client._parts(tid, slot, pieces))

    def _replay_stream(self, client: RemoteClient, seen: CallerTasks, tid: bytes, got: int) -> None:
        """A running streaming task was re-sent: its kept items from `got` on go to the new
        session, and so will its later ones (`on_task_yield` follows `seen.running`)."""
        stream = seen.streams.get(tid)
        if stream is None or got < stream.lost:
            seen.running.pop(tid, None)
            self._stream_items_gone(client, tid, got)
            self.node.cancel_task(tid, False, True)
            return
        self._replay(
            client,
            tid,
            [
                frame
                for index, (frames, _size) in stream.items.items()
                if index >= got
                for frame in frames
            ],
        )

    def _stream_items_gone(self, client: RemoteClient, tid: bytes, got: int) -> None:
        self.stats["resent_streams_lost"] += 1
        client.send(
            {
                "k": "done",
                "tid": tid,
                "err": error_blob(
                    ObjectLostError(
                        f"streaming task {tid.hex()} was sent again, but the executor no longer has its "
                        f"items from {got} on (more than {SEEN_RESULT_BYTES} bytes of this caller's "
                        f"replies were unacknowledged, or it never saw the task); the stream ends here"
                    )
                ),
            }
        )

    # ------------------------------------------------------------------ objects
    def _missing_store_args(self, args: list) -> list:
        if self.exchange is None:
            return []
        if args[0] == "b":
            ref = args[1]
            return (
                [serialization.store_cid(ref)]
                if serialization.is_store_ref(ref)
                and not self.node.store.contains(serialization.store_cid(ref))
                else []
            )
        items = list(args[1]) + list(args[2].values())
        return [
            i
            for i in items
            if i[0] == 0
            and serialization.is_store_ref(i[1])
            and not self.node.store.contains(serialization.store_cid(i[1]))
        ]

    async def _fetch_then(self, items: list, peer: str, then) -> None:
        """Bring store objects into this node's store (Bitswap) before going on. An argument
        the exchange cannot get is fetched from its owner instead (by object id, inline; the
        owner recovers it if it is lost), at once when the node named as holding its only
        copy is dead or dies meanwhile."""
        state = self.peers.get(peer)
        hint = [state.peer_id] if state is not None else []
        for item in items:
            cid = serialization.store_cid(item[1]) if isinstance(item, list) else item
            holder = item[4] if isinstance(item, list) and len(item) > 4 else None
            try:
                if holder is None:
                    await self.exchange.fetch(cid, timeout=30.0, peers=hint)
                    continue
                if await self.fetch_while_alive(cid, holder, 30.0, hint):
                    continue
                self.stats["args_from_owner_holder_dead"] += 1
            except Exception as exc:
                log.warning("could not fetch %s from %s by CID: %s", cid, peer, exc)
            if isinstance(item, list) and len(item) >= 4:
                entry = await self.fetch_object(item[2], item[3])
                item[1] = entry.data if entry.status == OK else item[1]
        then()

    async def fetch_while_alive(
        self, cid: str, holder: str, timeout: float, peers: list = ()
    ) -> bool:
        """Fetch `cid` by the exchange from `holder` (and `peers`) while `holder` is alive.
        False when it is (or becomes) dead first; raises what the exchange raises."""
        state = self.peers.get(holder)
        if state is None or not state.alive:
            return False
        gone = self.loop.create_future()
        waiters = self.gone_waiters.setdefault(holder, [])
        waiters.append(gone)
        fetch = self.loop.create_task(
            self.exchange.fetch(cid, timeout=timeout, peers=[state.peer_id, *peers])
        )
        try:
            await asyncio.wait([fetch, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if gone in waiters:
                waiters.remove(gone)
                if not waiters:
                    self.gone_waiters.pop(holder, None)
        if not fetch.done():
            # a run from the dead holder that got nothing ends now: one that went on would
            # be joined by later fetches of the CID and never ask the node a re-run puts it on
            if self.exchange.abandon(cid, f"its holder {holder} died"):
                await asyncio.wait([fetch], timeout=5.0)  # the run is gone: fetches start anew
            fetch.add_done_callback(lambda f: f.cancelled() or f.exception())
            return False
        fetch.result()
        return True

    async def fetch_object(self, oid: bytes, owner: str) -> ObjectEntry:
        entry = ObjectEntry()
        state = self.peers.get(owner)
        if state is None or not state.alive:
            why = f"its owner node {owner} is dead or not reachable (only the owner recovers it)"
            entry.seal(
                ERROR,
                error_blob(
                    ObjectLostError(
                        f"object {oid.hex()} is lost: {why}", object_id=oid.hex(), reason=why
                    )
                ),
            )
            return entry
        try:
            status, data, _cid = await self._fetch(state, {"oid": oid})
        except (MeshError, ValueError, LookupError) as exc:
            why = f"its owner node {owner} could not serve it: {exc}"
            entry.seal(
                ERROR,
                error_blob(
                    ObjectLostError(
                        f"object {oid.hex()} could not be fetched from its owner {owner}: {exc}",
                        object_id=oid.hex(),
                        reason=why,
                    )
                ),
            )
            return entry
        entry.seal(status, data)
        return entry

    async def fetch_by_cid(self, cid: str, timeout: float | None):
        if self.exchange is not None and cid.startswith("bafy"):
            try:
                await self.exchange.fetch(
                    cid,
                    timeout=timeout or 30.0,
                    peers=[s.peer_id for s in self.peers.values() if s.alive],
                )
                return (OK, serialization.STORE_MAGIC + cid.encode("ascii"))
            except Exception as exc:
                log.debug("exchange could not fetch %s: %s", cid, exc)
        for node_id in self.alive_peers():
            try:
                status, data, _ = await asyncio.wait_for(
                    self._fetch(self.peers[node_id], {"cid": cid}), timeout or 30.0
                )
            except (TimeoutError, MeshError, ValueError, LookupError):
                continue
            if serialization.cid_of(data) != cid and not cid.startswith("bafy"):
                log.warning("peer %s served data that does not hash to %s", node_id, cid)
                continue
            return (status, data)
        return None

    async def _fetch(self, state: PeerState, request: dict):
        """An object's status, bytes and CID from a peer over ``/latticaray/object/1``: a header
        giving the size, then chunks that must add up to exactly that size (a reply that runs
        past it is cut off at the first chunk over)."""
        header = None
        size = received = 0
        chunks = []
        async for raw in self.mesh.call_stream(
            state.peer_id, OBJECT_PROTOCOL, _pack(request), timeout=3600.0
        ):
            if header is None:
                header = _unpack(raw)
                if header.get("missing"):
                    raise LookupError(header.get("why", "not found"))
                size = header.get("size")
                if type(size) is not int or size < 0:
                    raise ValueError(f"object reply header has no valid size: {size!r}")
            else:
                received += len(raw)
                if received > size:
                    raise ValueError(f"object reply runs past the {size} bytes its header said")
                chunks.append(raw)
        if header is None:
            raise LookupError("empty object reply")
        if received != size:
            raise ValueError(f"object reply has {received} bytes, header said {size}")
        if len(chunks) == 1:
            data = bytes(chunks[0])
        elif size >= JOIN_OFF_LOOP:  # joining releases the GIL: the loop goes on serving
            data = await self.loop.run_in_executor(None, b"".join, chunks)
        else:
            data = b"".join(chunks)
        return header["s"], data, header.get("cid")

    async def _serve_object(self, ctx, payload: bytes):
        self._require_member(ctx)
        request = _unpack(payload)
        node = self.node
        if "oid" in request:
            oid = request["oid"]
            entry = node.objects.get(oid)
        else:
            cid = str(request.get("cid", ""))
            oid = node.cid_index.get(cid)
            entry = node.objects.get(oid) if oid is not None else None
            if entry is None and node.store is not None and cid.startswith("bafy"):
                try:
                    if node.store.contains(cid):
                        entry = ObjectEntry(OK, serialization.STORE_MAGIC + cid.encode("ascii"))
                        entry.cid = cid
                except Exception:
                    entry = None
        if entry is None:
            yield _pack(
                {
                    "missing": True,
                    "why": "its owner released it (no holder was left) or never made it"
                    if "oid" in request
                    else "this node does not hold the object",
                }
            )
            return
        await entry.sealed()
        if "oid" in request and node.recovery.is_missing(entry):
            entry = await node.recovery.ensure_local(oid, entry)
        if entry.cid is None:
            await node.resolve_off_loop(entry.data)  # a local put: hashed off the event loop
        cid = node.cid_for(oid, entry)
        # a store object goes out as slices of its mapping (the store keeps a mapped file's
        # bytes while a view of it lives); only pickle's own bytes are made, off the loop
        pieces = (
            [entry.data]
            if not serialization.is_store_ref(entry.data)
            else await self.loop.run_in_executor(None, serialization.materialize_pieces, entry.data)
        )
        yield _pack({"s": entry.status, "size": sum(len(p) for p in pieces), "cid": cid})
        for piece in pieces:
            view = memoryview(piece)
            for start in range(0, len(view), CHUNK):
                yield view[start : start + CHUNK]
                await asyncio.sleep(0)  # a window's worth of chunks is no single step

    # ------------------------------------------------------------------ reference counts
    def is_alive(self, node_id: str) -> bool:
        state = self.peers.get(node_id)
        return state is not None and state.alive

    def ack_held(self, node_id: str, tid: bytes) -> None:
        """Refs inside a task's results are counted here: the executor may let go of them once
        this node's own registrations are through."""

        async def ack():
            await self.node.refs.settled()
            self._send(node_id, {"k": "held", "tid": tid})

        self.spawn(ack())

    async def ref_call(self, owner: str, ops: list) -> None:
        state = self.peers.get(owner)
        if state is None or not state.alive:
            raise LookupError(f"owner {owner} is not an alive member")
        await self.mesh.call(state.peer_id, REF_PROTOCOL, _pack({"ops": ops}), timeout=10.0)

    async def _serve_ref(self, ctx, payload: bytes) -> bytes:
        caller = self._require_member(ctx)
        if len(payload) > MAX_CONTROL_MESSAGE:
            raise RpcError(Status.INVALID_ARGUMENT, "reference update too large")
        ops = _unpack(payload).get("ops")
        if (
            not isinstance(ops, list)
            or len(ops) > MAX_REF_OPS
            or not all(
                isinstance(o, list) and len(o) == 2 and o[0] in (0, 1) and isinstance(o[1], bytes)
                for o in ops
            )
        ):
            raise RpcError(Status.INVALID_ARGUMENT, "ops must be [[0|1, object id], ...]")
        self.node.refs.on_ops(caller, ops)
        return b""

    # ------------------------------------------------------------------ actors
    def place_actor(self, message: dict, defer: bool = False, wait=None):
        """Where to create an actor: a peer's id or None (here; with a strategy, or when this
        node could host it, actors stay here). With ``defer``, an actor no admitted node can
        host waits for DHT capacity ads (DEFERRED); its calls wait with it, or ``wait(message,
        reason)`` parks it instead."""
        strategy = message["opts"].get("strategy")
        demand = message["opts"].get("resources") or {}
        try:
            fits_here = self.node.ledger.could_ever_fit(demand)
        except ValueError:
            return None  # hosting it here reports the malformed request
        can_defer = defer and self.placement is not None
        aid = message["aid"]
        if (
            strategy is None
            and self.embedded
            and message["opts"].get("lifetime") == "detached"
            and self.alive_peers()
        ):
            target = self._place(aid.hex(), demand, None, {self.node_id})
            if isinstance(target, str):
                return target  # else no other node can host it now: placed as any actor
        if strategy is None and fits_here:
            return None
        if not self.alive_peers() and (fits_here or not can_defer):
            return None
        target = self._place(aid.hex(), demand, strategy)
        hard_affinity = isinstance(strategy, dict) and not strategy.get("soft")
        if isinstance(target, TaskUnschedulableError) and can_defer and not hard_affinity:
            return (wait or self._defer_actor)(message, target.reason)
        if isinstance(target, BaseException):
            return None
        return target

    async def claim_named_actor(self, namespace: str, name: str, message: dict):
        """Place a named actor's creation and claim its name: None when the creation may go
        ahead (``message["host"]`` then names its host), else the reply to give the creator.

        A creation some admitted node can take at once claims the name with that host. One that
        must wait for DHT capacity ads claims the name *pending* first (no host yet), as Ray
        registers a named actor before scheduling it, so a second creation of the name fails at
        once; the wait then fills in the host, or at its deadline raises the
        TaskUnschedulableError and gives the name back. Nothing is created while it waits."""
        done = asyncio.get_running_loop().create_future()
        request_id = message["aid"].hex()

        def settle(target) -> None:
            if done.done():
                return
            if isinstance(target, BaseException):
                done.set_exception(target)
            else:
                done.set_result(target)

        def park(message: dict, reason: str):
            return self.placement.defer(
                request_id,
                message["opts"].get("resources") or {},
                reason,
                retry=attempt,
                fail=settle,
                settled=done.done,
            )

        def attempt() -> None:
            target = self.place_actor(message, defer=True, wait=park)
            if target is not DEFERRED:
                settle(target)

        attempt()
        if done.done():
            message["host"] = done.result() or self.node_id
            return await self.claim_actor_name(namespace, name, message)
        key = f"{namespace}/{name}"
        arbiter = self._arbiter(namespace, name)  # the peers met meanwhile must not move it
        message["host"] = None
        self._pending_names.setdefault(key, (message["aid"], settle))
        try:
            reply = await self.claim_actor_name(namespace, name, message, arbiter)
            if reply is not None:
                return reply
            try:
                host = await done or self.node_id
            except ActorNameTakenError as exc:  # a merge showed an earlier claim on the name
                self.release_actor_name(namespace, name, message["aid"], arbiter)
                return {"error": error_blob(exc)}
            except BaseException:
                self.release_actor_name(namespace, name, message["aid"], arbiter)
                raise
            message["host"] = host
            self._name_hosted_at(namespace, name, message["aid"], host, arbiter=arbiter)
            return None
        finally:
            if self._pending_names.get(key, (None,))[0] == message["aid"]:
                del self._pending_names[key]
            if not done.done():
                done.cancel()
                self.placement.withdraw(request_id)
            elif not done.cancelled():
                done.exception()  # retrieved: a failure after the claim was refused is not raised

    def _defer_actor(self, message: dict, reason: str):
        aid = message["aid"]
        owned = self.owned_actors.get(aid)
        if owned is None:
            owned = self.owned_actors[aid] = OwnedActor(aid, message, self.node_id)
            self.actor_location[aid] = self.node_id  # calls wait in the outbox meanwhile

        def fail(exc: BaseException) -> None:
            owned.dead_cause = str(exc)
            self._fail_actor_calls(aid, owned.dead_cause)

        return self.placement.defer(
            aid.hex(),
            message["opts"].get("resources") or {},
            reason,
            retry=lambda: self._place_deferred_actor(message),
            fail=fail,
            settled=lambda: owned.dead_cause is not None,
        )

    def _place_deferred_actor(self, message: dict) -> None:
        target = self.place_actor(message, defer=True)
        if target is DEFERRED:
            return
        aid = message["aid"]
        if target is None or target == self.node_id:
            self.owned_actors.pop(aid, None)
            self.actor_location.pop(aid, None)
            self.node.host_actor(message)
        else:
            self.create_remote_actor(message, target)
        self.pump_actor(aid)

    def create_remote_actor(self, message: dict, target: str) -> dict:
        aid = message["aid"]
        owned = OwnedActor(aid, message, target)
        self.owned_actors[aid] = owned
        self.actor_location[aid] = target
        self._send_create(owned, target)
        return {"aid": aid, "node": target}

    def _send_create(self, owned: OwnedActor, target: str) -> None:
        message = dict(owned.message)
        state = self.peers[target]
        if message["cls"] not in state.shipped:
            message["blob"] = self.node.code[message["cls"]]
            state.shipped.add(message["cls"])
        message["opts"] = dict(
            message["opts"],
            strategy=None,
            max_restarts=max(0, owned.max_restarts - owned.restarts)
            if owned.max_restarts >= 0
            else -1,
        )
        message["args"] = self._wire_args(message["args"])  # named by CID as it goes out
        self._send(target, {"k": "create", "m": message})

    def _restart_owned_actor(self, owned: OwnedActor, dead_node: str) -> None:
        if owned.max_restarts >= 0 and owned.restarts >= owned.max_restarts:
            owned.dead_cause = (
                f"its node {dead_node} died and no restarts are left "
                f"(max_restarts={owned.max_restarts})"
            )
            self.node.refs.task_done(owned.aid)
            self._fail_actor_calls(owned.aid, owned.dead_cause)
            return
        owned.restarts += 1
        self.stats["actor_restarts"] += 1
        demand = owned.message["opts"].get("resources") or {}
        target = self._place(owned.aid.hex(), demand, None, {dead_node})
        if isinstance(target, BaseException) or target is None:
            target = self.node_id
        owned.host = target
        self.actor_location[owned.aid] = target
        if target == self.node_id:
            message = dict(owned.message)
            message["opts"] = dict(message["opts"], max_restarts=0)
            self.node.host_actor(message)
        else:
            self._send_create(owned, target)
        opts = owned.message["opts"]
        if opts.get("name"):
            self._name_hosted_at(
                opts.get("namespace") or "default", opts["name"], owned.aid, target, "moved"
            )
        self.pump_actor(owned.aid)

    def _fail_actor_calls(self, aid: bytes, cause: str) -> None:
        outbox = self.actor_outbox.pop(aid, collections.deque())
        for rec in outbox:
            self.node._fail(rec, ActorDiedError(f"actor {aid.hex()} is dead: {cause}"))
        for state in self.peers.values():
            for tid, rec in list(state.inflight.items()):
                if rec.msg.get("aid") == aid:
                    state.inflight.pop(tid, None)
                    self.node._fail(rec, ActorDiedError(f"actor {aid.hex()} is dead: {cause}"))

    def _actor_call_lost(self, rec: TaskRecord, node_id: str) -> None:
        aid = rec.msg["aid"]
        owned = self.owned_actors.get(aid)
        if owned is not None and owned.dead_cause is None and rec.retries_left != 0:
            rec.retries_left -= 1
            self.actor_outbox.setdefault(aid, collections.deque()).appendleft(rec)
            return
        self.node._fail(
            rec,
            ActorDiedError(
                f"actor {aid.hex()} was on node {node_id}, which died while running {rec.name}"
            ),
        )

    def enqueue_actor_call(self, rec: TaskRecord) -> None:
        self.actor_outbox.setdefault(rec.msg["aid"], collections.deque()).append(rec)

    def pump_actor(self, aid: bytes) -> None:
        outbox = self.actor_outbox.get(aid)
        owned = self.owned_actors.get(aid)
        if owned is not None and owned.dead_cause is not None:
            self._fail_actor_calls(aid, owned.dead_cause)
            return
        while outbox and outbox[0].deps_left == 0:
            rec = outbox[0]
            if rec.done:
                outbox.popleft()
                continue
            host = self.actor_location.get(aid) or rec.msg.get("anode")
            if host == self.node_id:
                local = self.node.actors.get(aid)
                if local is None:
                    return
                outbox.popleft()
                rec.actor = local
                local.outbox.append(rec)
                self.node._pump_actor(local)
                continue
            state = self.peers.get(host)
            if state is None or not state.alive:
                if owned is None:
                    outbox.popleft()
                    self.node._fail(
                        rec,
                        ActorDiedError(
                            f"actor {aid.hex()} lives on node {host}, which is not reachable"
                        ),
                    )
                    continue
                return  # the owner restarts it; calls wait here
            outbox.popleft()
            msg = rec.msg
            out = {
                "tid": rec.tid,
                "aid": aid,
                "m": msg["m"],
                "nret": rec.nret,
                "name": rec.name,
                "args": self._wire_args(msg["args"]),
            }
            if rec.tid in state.resent:
                state.resent.discard(rec.tid)
                out["again"] = True
            rec.remote_peer = host
            state.inflight[rec.tid] = rec
            self._send(host, {"k": "acall", "m": out})

    def kill_remote_actor(self, message: dict) -> None:
        aid = message["aid"]
        if message.get("no_restart", True):
            self.node.refs.task_done(aid)  # its creation arguments are not needed again
        owned = self.owned_actors.get(aid)
        host = self.actor_location.get(aid) or message.get("anode")
        if owned is not None and message.get("no_restart", True):
            owned.dead_cause = "it was killed with kill()"
            if host == self.node_id:  # never created: it was waiting for DHT capacity ads
                self._fail_actor_calls(aid, owned.dead_cause)
                return
        self._send(host, {"k": "kill", "aid": aid, "no_restart": message.get("no_restart", True)})

    # ------------------------------------------------------------------ named actors
    def _arbiter(self, namespace: str, name: str) -> str:
        candidates = [self.node_id] + self.alive_peers()
        return min(
            candidates, key=lambda n: hashlib.sha256(f"{namespace}/{name}/{n}".encode()).digest()
        )

    def _placement_wait(self) -> float:
        return self.placement.core.wait_timeout if self.placement is not None else 0.0

    async def claim_actor_name(
        self, namespace: str, name: str, message: dict, arbiter: str | None = None
    ):
        """None when this creation may go ahead, else the reply to give the creator. Without
        ``message["host"]`` the claim is pending: the creation still waits for a host."""
        host = message.get("host")
        request = {
            "op": "claim",
            "ns": namespace,
            "name": name,
            "aid": message["aid"],
            "owner": self.node_id,
            "host": host,
            "meta": message["opts"].get("meta"),
            "get_if_exists": bool(message["opts"].get("get_if_exists")),
            "detached": message["opts"].get("lifetime") == "detached",
        }
        if host is None:
            request.update(pending=True, wait_s=self._placement_wait())
        reply = await self._names_call(arbiter or self._arbiter(namespace, name), request)
        if reply.get("ok"):
            found = self._claim_in_crdt(namespace, name, message)
        elif reply.get("existing") and request["get_if_exists"]:
            found = _found(reply["existing"])
            found["existing"] = True
        else:
            return {
                "error": error_blob(
                    ActorNameTakenError(
                        f"an actor named {name!r} already exists in namespace {namespace!r} "
                        f"(claimed by node {reply.get('holder', '?')})"
                    )
                )
            }
        found = await self._when_placed(namespace, name, found)
        if found is not None and "error" not in found:
            found["existing"] = True
        return found

    def _claim_in_crdt(self, namespace: str, name: str, message: dict):
        """Register the name in the CRDT `actors` collection (pending while it has no host);
        None if this node holds it."""
        if self.state is None:
            return None
        host = message.get("host")
        try:
            result = self.state.actors.claim(
                f"{namespace}/{name}",
                message["aid"].hex(),
                host=PeerId.from_string(host or self.node_id),
                state=ActorState.PENDING if host is None else ActorState.ALIVE,
            )
        except Exception as exc:  # the CRDT refused the write: the arbiter's answer stands
            log.debug("named actor %s/%s not written to the CRDT: %s", namespace, name, exc)
            return None
        if result.won:
            return None
        self.spawn(
            self._names_call(
                self._arbiter(namespace, name),
                {"op": "release", "ns": namespace, "name": name, "aid": message["aid"]},
            )
        )
        if message["opts"].get("get_if_exists"):
            pending = result.record.state is ActorState.PENDING
            return {
                "aid": bytes.fromhex(result.record.actor_id),
                "node": None if pending else str(result.record.host),
                "meta": None,
                "existing": True,
                "pending": pending,
            }
        return {
            "error": error_blob(
                ActorNameTakenError(
                    f"an actor named {name!r} already exists in namespace {namespace!r} "
                    f"(claimed by node {result.record.owner} in the cluster state)"
                )
            )
        }

    def _name_hosted_at(
        self,
        namespace: str,
        name: str,
        aid: bytes,
        host: str,
        op: str = "placed",
        arbiter: str | None = None,
    ) -> None:
        """The named actor's host is known now: a pending claim's creation found it
        (``placed``), or the owner restarted the actor there after its host died (``moved``).
        Its name's records here, in the CRDT and at the arbiter name it from now on."""
        record = self.names.get((namespace, name))
        if op == "moved" and record is not None and record.get("aid") == aid:
            record["node"] = host
        if self.state is not None:
            try:
                self.state.actors.update(
                    f"{namespace}/{name}", ActorState.ALIVE, host=PeerId.from_string(host)
                )
            except Exception as exc:  # no claim of ours there (the CRDT refused it)
                log.debug(
                    "named actor %s/%s: host not written to the CRDT: %s", namespace, name, exc
                )
        self.spawn(
            self._names_call(
                arbiter or self._arbiter(namespace, name),
                {"op": op, "ns": namespace, "name": name, "aid": aid, "node": host},
            )
        )

    async def _wait_placed(self, namespace: str, name: str, found: dict) -> dict:
        """A pending named actor as its lookup answers it: once its creator has placed it, or an
        error when its creation gave the name back or it is still pending after the creator's
        placement wait (``wait_s``, else this node's) and NAME_SETTLE_S more."""
        loop = asyncio.get_running_loop()
        bound = (found.get("wait_s") or self._placement_wait()) + NAME_SETTLE_S
        deadline = loop.time() + bound
        while loop.time() < deadline:
            await asyncio.sleep(min(NAME_POLL_S, max(0.0, deadline - loop.time())))
            now = await self._lookup_name(namespace, name)
            if now is None:
                return {
                    "error": error_blob(
                        ValueError(
                            f"no actor named {name!r} in namespace {namespace!r}: the one being created "
                            f"under that name found no node to host it and gave the name back"
                        )
                    )
                }
            if not now.pop("pending"):
                now.pop("wait_s", None)
                return now
        return {
            "error": error_blob(
                GetTimeoutError(
                    f"the actor named {name!r} in namespace {namespace!r} is still waiting for a node "
                    f"to host it (DHT capacity) after {bound:.1f} s"
                )
            )
        }

    def _on_claim_lost(self, key: str, ours, winner) -> None:
        """A CRDT merge shows another node's claim on a name wins: our actor gives it up (a
        creation still waiting for placement fails with ActorNameTakenError)."""
        aid = bytes.fromhex(ours.actor_id)
        self.stats["names_lost"] += 1
        pending = self._pending_names.get(key)
        if pending is not None and pending[0] == aid:
            log.info("pending actor name %s lost to node %s", key, winner.owner)
            pending[1](
                ActorNameTakenError(
                    f"the actor name {key!r} (namespace/name) was claimed earlier by node "
                    f"{winner.owner}"
                )
            )
            return
        log.warning(
            "actor name %s lost to node %s; stopping actor %s", key, winner.owner, ours.actor_id
        )
        self.node._on_kill({"aid": aid, "no_restart": True, "anode": str(ours.host)}, None)

    async def _lookup_name(self, namespace: str, name: str):
        """The claim on a name, from its arbiter, else the CRDT: ``{aid, node, meta, pending,
        wait_s}`` (``node`` None while pending) or None."""
        reply = await self._names_call(
            self._arbiter(namespace, name), {"op": "lookup", "ns": namespace, "name": name}
        )
        record = reply.get("existing")
        claim = self.state.actors.get(f"{namespace}/{name}") if self.state is not None else None
        if record:
            found = _found(record)
            if (
                found["pending"]
                and claim is not None
                and claim.actor_id == found["aid"].hex()
                and claim.state is ActorState.ALIVE
            ):  # placed; the arbiter has not heard yet
                found.update(node=str(claim.host), pending=False)
            return found
        if claim is None or claim.state is ActorState.DEAD:
            return None
        pending = claim.state is ActorState.PENDING
        found = {
            "aid": bytes.fromhex(claim.actor_id),
            "node": None if pending else str(claim.host),
            "meta": None,
            "pending": pending,
            "wait_s": None,
        }
        if not pending:  # the CRDT claim carries no method table: its host has it
            found["meta"] = await self._hosted_actor_meta(
                found["node"], namespace, name, found["aid"]
            )
        return found

    async def _hosted_actor_meta(self, host: str, namespace: str, name: str, aid: bytes):
        """The method table of a named actor, asked of the node hosting it (None if unknown)."""
        state = self.peers.get(host)
        if host != self.node_id and (state is None or not state.alive):
            return None
        # a host that does not answer leaves it unknown (the call falls back to this node,
        # which does not host the actor)
        reply = await self._names_call(
            host, {"op": "hosted", "ns": namespace, "name": name, "aid": aid}
        )
        meta = reply.get("meta")
        return meta if isinstance(meta, dict) and isinstance(meta.get("methods"), dict) else None

    async def lookup_actor_name(self, namespace: str, name: str):
        """The named actor's ``{aid, node, meta}``, waiting while it is pending placement (an
        ``{"error": ...}`` reply when that wait ends without a host); None if no claim."""
        return await self._when_placed(namespace, name, await self._lookup_name(namespace, name))

    async def _when_placed(self, namespace: str, name: str, found: dict | None):
        """A found claim ``{aid, node, meta, pending, wait_s}`` as ``{aid, node, meta}`` once
        placed (waiting while it is pending), or the error that wait ended with."""
        if found is not None and found.pop("pending", False):
            return await self._wait_placed(namespace, name, found)
        if found is not None:
            found.pop("wait_s", None)
        return found

    def release_actor_name(
        self, namespace: str, name: str, aid: bytes, arbiter: str | None = None
    ) -> None:
        if self.state is not None:
            try:
                self.state.actors.release(f"{namespace}/{name}")
            except Exception:
                pass  # this node holds no claim on it (another node created the actor)
        self.spawn(
            self._names_call(
                arbiter or self._arbiter(namespace, name),
                {"op": "release", "ns": namespace, "name": name, "aid": aid},
            )
        )

    async def remote_stream_next(self, owner: str, message: dict) -> dict:
        """The next item of a stream another node owns (its generator was passed here): asks the
        owner, re-asking every STREAM_POLL seconds while the caller waits without a deadline. The
        item's ref comes back as a borrow (the owner's generator keeps its own hold)."""
        loop = asyncio.get_running_loop()
        timeout = message.get("timeout")
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            state = self.peers.get(owner)
            if state is None:
                return {
                    "error": error_blob(
                        NodeDiedError(f"node {owner}, which owns this stream, is not a live peer")
                    )
                }
            wait = (
                STREAM_POLL
                if deadline is None
                else max(0.0, min(STREAM_POLL, deadline - loop.time()))
            )
            request = {"tid": message["tid"], "i": message["i"], "timeout": wait}
            try:
                reply = _unpack(
                    await self.mesh.call(
                        state.peer_id, STREAM_PROTOCOL, _pack(request), timeout=wait + 10.0
                    )
                )
            except MeshError as exc:
                return {
                    "error": error_blob(
                        NodeDiedError(
                            f"could not reach node {owner}, which owns this stream: {exc}"
                        )
                    )
                }
            if reply.get("timeout") and (deadline is None or loop.time() < deadline):
                continue
            reply.pop("held", None)
            return reply

    async def _serve_stream_next(self, ctx, payload: bytes) -> bytes:
        self._require_member(ctx)
        if len(payload) > MAX_CONTROL_MESSAGE:
            raise RpcError(Status.INVALID_ARGUMENT, "stream request too large")
        request = _unpack(payload)
        tid, index, timeout = request.get("tid"), request.get("i"), request.get("timeout")
        if not (
            isinstance(tid, bytes)
            and type(index) is int
            and index >= 0
            and (timeout is None or isinstance(timeout, (int, float)))
        ):
            raise RpcError(Status.INVALID_ARGUMENT, "malformed stream request")
        timeout = STREAM_POLL if timeout is None else min(float(timeout), STREAM_POLL)
        reply = await self.node._req_stream_next(
            {"tid": tid, "i": index, "timeout": max(0.0, timeout), "borrow": True}
        )
        return _pack(reply)

    async def _names_call(self, arbiter: str, request: dict) -> dict:
        if arbiter == self.node_id:
            return self._names_op(request, self.node_id)
        try:
            reply = await self.mesh.call(
                self.peers[arbiter].peer_id, NAMES_PROTOCOL, _pack(request), timeout=10.0
            )
        except (MeshError, KeyError):
            return self._names_op(request, self.node_id)
        return _unpack(reply)

    async def _serve_names(self, ctx, payload: bytes) -> bytes:
        caller = self._require_member(ctx)
        if len(payload) > MAX_CONTROL_MESSAGE:
            raise RpcError(Status.INVALID_ARGUMENT, "names request too large")
        return _pack(self._names_op(_unpack(payload), caller))

    def _names_op(self, request: dict, caller: str) -> dict:
        key = (request["ns"], request["name"])
        record = self.names.get(key)
        if record is not None and not self._name_holder_alive(record):
            del self.names[key]
            record = None
        op = request["op"]
        if op == "claim":
            if record is not None and record["aid"] != request["aid"]:
                return {"ok": False, "existing": record, "holder": record["owner"]}
            pending = bool(request.get("pending"))
            self.names[key] = {
                "aid": request["aid"],
                "node": None if pending else request.get("host") or request["owner"],
                "owner": request["owner"],
                "meta": request.get("meta"),
                "detached": bool(request.get("detached")),
            }
            if pending:
                self.names[key].update(pending=True, wait_s=request.get("wait_s"))
            return {"ok": True}
        if op == "lookup":
            return {"existing": record}
        if op == "release":
            if record is not None and record["aid"] == request["aid"]:
                del self.names[key]
            return {"ok": True}
        if op == "placed":
            if record is not None and record["aid"] == request["aid"]:
                record["node"] = request["node"]
                record.pop("pending", None)
            return {"ok": True}
        if op == "hosted":  # asked of the actor's host: its method table
            actor = self.node.actors.get(self.node.named_actors.get(key))
            if actor is None or actor.aid != request.get("aid") or actor.state == "DEAD":
                return {"meta": None}
            return {"meta": actor.opts.get("meta")}
        if op == "moved":
            if record is not None and record["aid"] == request["aid"]:
                record["node"] = request["node"]
            return {"ok": True}
        return {"error": f"unknown names op {op!r}"}

    def _name_holder_alive(self, record: dict) -> bool:
        # a detached actor outlives its owner: its name lives as long as its host, judged by its
        # owner while this arbiter has not met the host (sparse peering)
        holders = (
            [record.get("node"), record.get("owner")]
            if record.get("detached")
            else [record.get("owner")]
        )
        for holder in holders:
            if holder == self.node_id:
                return True
            state = self.peers.get(holder)
            if state is not None:
                return state.alive
        return False

    def note_actor_host(self, aid: bytes, host: str) -> None:
        for rec in self.names.values():
            if rec["aid"] == aid:
                rec["node"] = host


def _found(record: dict) -> dict:
    """A name's arbiter record as a lookup answers it."""
    return {
        "aid": record["aid"],
        "node": record.get("node"),
        "meta": record.get("meta"),
        "pending": bool(record.get("pending")),
        "wait_s": record.get("wait_s"),
    }


@dataclasses.dataclass
class NatSettings:
    """How a runtime node takes part in NAT traversal (see docs/protocol/nat.md).

    A node behind a NAT gives `observers` (QUIC endpoints of public nodes, for NAT type and
    AutoNAT) and `relays` (`/ip4/../tcp/../p2p/<relay>`); at start it reserves a relay slot when it
    is not public and advertises its circuit address. A public node may `serve_relay` on
    `relay_port` and `serve_autonat`. `lab=True` treats the netlab's 198.18.0.0/15 as public and
    turns off the same-host Unix-socket path (lab namespaces share one machine).
    """

    observers: tuple = ()
    relays: tuple = ()
    serve_relay: bool = False
    relay_port: int = 0
    serve_autonat: bool = False
    hole_punching: bool = True
    lab: bool = False
    auto_configure: bool = True

    @classmethod
    def coerce(cls, value) -> NatSettings | None:
        if value is None or value is False or isinstance(value, cls):
            return value or None
        if value is True:
            return cls()
        if isinstance(value, dict):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = set(value) - fields
            if unknown:
                raise ValueError(f"unknown NAT settings {sorted(unknown)}; known: {sorted(fields)}")
            value = dict(value)
            value["observers"] = tuple(_endpoint(e) for e in value.get("observers", ()))
            value["relays"] = tuple(value.get("relays", ()))
            return cls(**value)
        raise TypeError(f"nat= takes a NatSettings, a dict of its fields or True, not {value!r}")

    def config(self):
        from latticaray.mesh.nat.addresses import LAB_PUBLIC_RANGES, AddressPolicy
        from latticaray.mesh.nat.autonat import AutoNatClientConfig
        from latticaray.mesh.nat.host import NatNodeConfig

        policy = AddressPolicy(treat_as_public=LAB_PUBLIC_RANGES) if self.lab else AddressPolicy()
        confirmations = max(1, min(2, len(self.observers)))
        return NatNodeConfig(
            observers=tuple(self.observers),
            relays=tuple(self.relays),
            policy=policy,
            serve_relay=self.serve_relay,
            relay_port=self.relay_port,
            serve_autonat=self.serve_autonat,
            hole_punching=self.hole_punching,
            autonat_client=AutoNatClientConfig(
                min_confirmations=confirmations, dial_back_timeout=1.5
            ),
        )


def _endpoint(value) -> tuple[str, int]:
    """("198.18.0.11", 4001), [host, port] or "host:port" -> (host, port)."""
    if isinstance(value, str):
        host, _, port = value.rpartition(":")
        return host, int(port)
    host, port = value
    return str(host), int(port)


class _ProvidingRefs(collections.Counter):
    """The node's store-object pin counts; a CID counted for the first time is announced."""

    def __init__(self, counts, on_new):
        super().__init__(counts)
        self._on_new = on_new

    def __setitem__(self, cid, count):
        is_new = cid not in self
        super().__setitem__(cid, count)
        if is_new and count > 0:
            self._on_new(cid)


class _RuntimeLoad:
    """What the scheduler's CapacityAdvertiser reads of a RuntimeNode: its view, and a version
    that changes whenever capacity or load does (checked when read)."""

    def __init__(self, cluster: MeshCluster):
        self.cluster = cluster
        self._signature = None
        self._version = 0

    def view(self, now: float) -> NodeView:
        view = self.cluster._local_view()
        view.ad_time = now
        return view

    @property
    def version(self) -> int:
        view = self.cluster._local_view()
        signature = (tuple(sorted(view.available.items())), view.queued, view.running)
        if signature != self._signature:
            self._signature = signature
            self._version += 1
        return self._version


class MeshRuntime:
    """A MeshNode plus the MeshCluster that carries a RuntimeNode's work across the mesh.

    Beside the runtime's own protocols it runs a DhtService (server mode; bootstrapped from the
    bootstrap peers) that the ObjectExchange announces store objects into and resolves CIDs
    through and that the scheduler's CapacityAdvertiser publishes `capacity/<resource>` ads
    into, and, when `nat` is given, MeshNat (relay reservation, circuit address, hole punching).
    Placement also reads those ads (runtime.placement): work no admitted peer can take waits up
    to `capacity_wait` s for an advertiser of the demanded resources to be found and admitted.
    `peering="sparse"` admits peers only through bootstrap, on demand (placement) or when they
    ask, instead of every peer connected or introduced ("full").
    """

    def __init__(
        self,
        key: KeyPair,
        bootstrap: list[str],
        admission: Admission,
        listen: list[str] | None,
        nat: NatSettings | None = None,
        peering: str = "full",
        capacity_wait: float = CAPACITY_WAIT,
    ):
        if peering not in ("full", "sparse"):
            raise ValueError(f"peering is 'full' or 'sparse', not {peering!r}")
        self.peering = peering
        self.capacity_wait = capacity_wait
        self.embedded = False  # set by init(): this node lives in a driver process
        self.key = key
        self.node_id = str(key.peer_id)
        self.bootstrap = list(bootstrap)
        self.admission = admission
        self.listen = listen or ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"]
        self.nat_settings = nat
        self.mesh: MeshNode | None = None
        self.cluster: MeshCluster | None = None
        self.state = None
        self.dht = None
        self.nat = None
        self.exchange = None
        self.timings: dict[str, float] = {}
        self.advertiser = None
        self._dht_bootstrap: asyncio.Task | None = None
        self._provide_tasks: set[asyncio.Task] = set()

    @classmethod
    def prepare(
        cls,
        *,
        bootstrap: list[str],
        credential: str | None,
        listen: list[str] | None = None,
        key_path: str | None = None,
        mesh_key_path: str | None = None,
        nat: NatSettings | None = None,
        peering: str = "full",
        capacity_wait: float = CAPACITY_WAIT,
    ) -> MeshRuntime:
        key = KeyPair.load_or_create(key_path) if key_path else KeyPair.generate()
        if bootstrap:
            admission = Admission.join(credential)
        else:
            mesh_key = MeshKey.load_or_create(mesh_key_path) if mesh_key_path else None
            admission = Admission.create_mesh(str(key.peer_id), mesh_key)
        return cls(key, bootstrap, admission, listen, nat, peering, capacity_wait)

    async def start(self, runtime_node) -> MeshRuntime:
        from latticaray.mesh.dht.service import DhtService
        from latticaray.mesh.transport.quic import QuicConfig

        started = time.monotonic()
        # netlab hosts share this machine's filesystem but stand for separate machines: no
        # same-host Unix-socket shortcut around their NATs
        in_lab = self.nat_settings is not None and self.nat_settings.lab
        config = MeshConfig(
            listen=self.listen,
            key=self.key,
            same_host_fast_path=not in_lab,
            quic=QuicConfig(keepalive_interval=1.0, unresponsive_timeout=4.0),
        )
        self.mesh = MeshNode(config)
        await self.mesh.start()
        self.dht = DhtService(self.mesh)
        if self.nat_settings is not None:
            await self._start_nat()
        self.cluster = MeshCluster(runtime_node, self.mesh, self.admission)
        self.cluster.sparse = self.peering == "sparse"
        self.cluster.embedded = self.embedded
        self.cluster.register()
        from latticaray.runtime.placement import CapacityDirectoryCore, DhtPlacement

        self.cluster.placement = DhtPlacement(
            self.cluster, self.dht, CapacityDirectoryCore(wait_timeout=self.capacity_wait)
        )
        self.cluster.placement.start()
        runtime_node.cluster = self.cluster
        from latticaray.state.service import StateService

        self.state = StateService(
            self.mesh, self.key, is_member=lambda peer: self.admission.allowed(str(peer))
        )
        await self.state.start()
        self.state.actors.on_claim_lost(self.cluster._on_claim_lost)
        self.cluster.state = self.state
        if runtime_node.store_ready is not None:
            await runtime_node.store_ready
        if runtime_node.store is not None:
            from latticaray.objectstore.exchange import ObjectExchange

            self.exchange = ObjectExchange(self.mesh, self.dht, runtime_node.store)
            await self.exchange.start()
            self.cluster.exchange = self.exchange
            runtime_node.store_refs = _ProvidingRefs(runtime_node.store_refs, self._provide)
            runtime_node.on_cid_known = self._provide  # local puts: once their CID is known
        for addr in self.bootstrap:
            try:
                await self.cluster.join(addr)
            except (MeshError, ValueError) as exc:
                log.warning("bootstrap peer %s unreachable: %s", addr, exc)
        self.timings["join_s"] = time.monotonic() - started
        if self.bootstrap:
            # in the background: lookups that meet departed peers wait out their timeouts, and
            # init() must not (the exchange also asks connected peers meanwhile)
            self._dht_bootstrap = asyncio.get_running_loop().create_task(
                self._bootstrap_dht(started)
            )
        else:
            self.dht.start()
        self._start_advertiser()
        return self

    async def _bootstrap_dht(self, started: float) -> None:
        try:
            size = await asyncio.wait_for(self.dht.bootstrap([]), DHT_BOOTSTRAP_TIMEOUT)
            self.timings["dht_bootstrap_s"] = time.monotonic() - started
            log.info("DHT joined: %d peers in the routing table", size)
        except (TimeoutError, MeshError) as exc:
            log.warning("DHT bootstrap did not complete: %r", exc)
        self.dht.start()

    def _start_advertiser(self) -> None:
        """Capacity ads into the DHT (`capacity/<resource>`, this node's subkey); the CRDT
        `members` entry is written by the cluster's view loop (with the advertised addresses)."""
        from latticaray.scheduler.advertiser import AdvertiserCore, CapacityAdvertiser

        store = getattr(self.cluster.node, "store", None)

        def store_free() -> int:
            try:
                if store is None:
                    return 0
                stats = store.stats()
                return max(0, int(stats["capacity"] - stats["used"] - stats["reserved"]))
            except Exception:
                return 0

        self.advertiser = CapacityAdvertiser(
            _RuntimeLoad(self.cluster),
            self.node_id,
            self.key.peer_id.to_bytes(),
            self.dht,
            core=AdvertiserCore(
                self.node_id,
                ttl=CAPACITY_TTL,
                refresh_interval=CAPACITY_REFRESH,
                min_interval=CAPACITY_MIN_INTERVAL,
            ),
            store_free=store_free,
        )
        self.advertiser.start()

    async def _start_nat(self) -> None:
        from latticaray.mesh.nat.mesh_nat import MeshNat

        settings = self.nat_settings
        self.nat = MeshNat(self.mesh, settings.config())
        await self.nat.start()
        if settings.auto_configure:
            report, reach = await asyncio.wait_for(self.nat.auto_configure(), 60.0)
            self.timings["nat_type"] = str(getattr(report, "nat_type", report))
            self.timings["reachability"] = str(reach)
            log.info(
                "NAT: %s, reachability %s, circuit %s", report, reach, self.nat.circuit_addresses()
            )

    def _provide(self, cid: str) -> None:
        """Announce a store object this node holds as provided in the DHT (in the background)."""
        if self.exchange is None or not cid.startswith("baf"):
            return
        task = asyncio.get_running_loop().create_task(self._provide_quietly(cid))
        self._provide_tasks.add(task)
        task.add_done_callback(self._provide_tasks.discard)

    async def _provide_quietly(self, cid: str) -> None:
        try:
            await self.exchange.provide(cid)
        except Exception as exc:  # an announcement that fails is retried by the reprovider
            log.debug("providing %s failed: %r", cid, exc)

    async def wait_for_peers(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.cluster.alive_peers()) >= count:
                return True
            await asyncio.sleep(0.05)
        return False

    @property
    def listen_addrs(self) -> list[str]:
        return [str(a) for a in self.mesh.listen_addrs] if self.mesh else []

    @property
    def advertised_addrs(self) -> list[str]:
        return [str(a) for a in self.mesh.advertised_addrs] if self.mesh else []

    def invite(self, peer_id: str | None = None, ttl: float | None = None) -> str:
        if ttl is None:
            return self.admission.invite(peer_id)
        return self.admission.invite(peer_id, ttl)

    async def stop(self) -> None:
        pending = [t for t in [*self._provide_tasks, self._dht_bootstrap] if t is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self.advertiser is not None:
            await self.advertiser.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        if self.exchange is not None:
            await self.exchange.stop()
        if self.state is not None:
            try:
                await self.state.stop()
            except Exception as exc:
                log.debug("cluster state did not stop cleanly: %s", exc)
        if self.dht is not None:
            await self.dht.close()
        if self.nat is not None:
            try:
                await self.nat.stop()
            except Exception as exc:
                log.debug("NAT traversal did not stop cleanly: %s", exc)
        if self.mesh is not None:
            await self.mesh.stop()
