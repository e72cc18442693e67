"""Caller side of `/latticaray/task/1`: the task sessions this node opens to its peers.

One session per (this node -> executor peer) carries tasks, actor creations and calls, cancels
and stream acks out, in order, and brings results, stream items and large values in parts back.
When the peer's primary connection gets better (relayed -> hole-punched direct) the session
*moves*: the old one is fenced and drained while a new one on the new path waits for the fence
(`TaskSession`). A session that breaks while the peer is still connected is reopened and the
work in flight sent again (marked `again`, see dedup.py; actor creations whose answer had not
come are sent again too); one that breaks with the peer's connection is *suspended*: the work
in flight, and what is sent to the peer meanwhile, waits until membership's liveness shell has
the peer back (a redial on any path) and then goes out the same way (`peer_back`). Only a peer
liveness judges gone has its work retried elsewhere (`peer_gone`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from latticaray.mesh.connmgr import path_rank
from latticaray.mesh.errors import MeshError
from latticaray.runtime import serialization
from latticaray.runtime.errors import NodeDiedError, TaskCancelledError
from latticaray.runtime.ids import object_id
from latticaray.runtime.local.records import PENDING, STREAMING, TaskRecord
from latticaray.runtime.remote import wire
from latticaray.runtime.remote.wire import (
    TASK_PROTOCOL,
    AckItems,
    ActorCreated,
    CallActor,
    CancelTask,
    CreateActor,
    Fence,
    Fenced,
    ResultsFetched,
    SubmitTask,
    TaskDone,
    TaskRejected,
    TaskReply,
    TaskRequest,
    ValuePart,
    WorkerOutput,
    YieldItem,
)
from latticaray.runtime.states import TaskEvent, TaskState

if TYPE_CHECKING:
    from latticaray.runtime.remote.membership import Peer
    from latticaray.runtime.remote.runtime import RemoteRuntime

log = logging.getLogger(__name__)

SESSION_TIMEOUT = 20 * 3600.0
SESSION_DIAL_TIMEOUT = 10.0  # a session to a peer without a connection dials it this long
MAX_SESSION_REOPENS = 5  # task sessions reopened per peer within SESSION_REOPEN_WINDOW
SESSION_REOPEN_WINDOW = 60.0
FENCE_TIMEOUT = 5.0  # a moved task session waits this long for the old one's fence


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
        self.conn: Any = None
        self.pending: set = set()
        self.gate = gate
        self.next_gate: asyncio.Event | None = None
        self.retiring = False
        self.fenced = False


class PeerSessions:
    """This node's task sessions to one peer and the work they carry."""

    def __init__(self) -> None:
        self.session: TaskSession | None = None
        self.retiring: list[TaskSession] = []
        self.inflight: dict[bytes, TaskRecord] = {}
        self.shipped: set[bytes] = set()  # code hashes the peer has
        self.parts: dict[tuple, list[bytes]] = {}  # parts of values still arriving
        self.reopen_times: list[float] = []
        self.resent: set[bytes] = set()  # work to mark `again` when it is sent (see dedup.py)
        #: actor creations sent (or due) whose `created` has not come back, in order
        self.creating: dict[bytes, None] = {}
        #: the sessions broke with the peer's connection: work waits for the peer to be back
        self.suspended = False
        #: control messages (cancel, ack, kill, ...) to send when the sessions resume
        self.held: list[TaskRequest] = []

    def unsent(self) -> list[TaskRequest]:
        """Control messages queued on the sessions and not sent yet (work is tracked apart)."""
        out: list[TaskRequest] = []
        for session in [self.session, *self.retiring]:
            while session is not None and not session.outbox.empty():
                message = session.outbox.get_nowait()
                if reply_key(message) is None and not isinstance(message, Fence):
                    out.append(message)
        return out

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


def reply_key(message: TaskRequest | TaskReply) -> Any:
    """What a session message is owed (sent) or settles (a reply): a task id, or
    ("create", actor id); None for anything else."""
    if isinstance(message, (SubmitTask, CallActor, TaskDone)):
        return message.tid
    if isinstance(message, (CreateActor, ActorCreated)):
        return ("create", message.aid)
    return None


class Caller:
    """The task sessions of one node to its peers, and the work in flight on them."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote
        self.node = remote.node
        self.stats = remote.stats

    def link(self, peer: Peer) -> PeerSessions:
        if peer.link is None:
            peer.link = PeerSessions()
        return peer.link

    def link_to(self, node_id: str) -> PeerSessions | None:
        """The sessions to an admitted peer (alive or not), None for a node never admitted."""
        peer = self.remote.membership.peers.get(node_id)
        return self.link(peer) if peer is not None else None

    # ------------------------------------------------------------------ sending
    def send(self, node_id: str | None, message: TaskRequest) -> bool:
        """Queue a message on the session to a live peer (opened if needed)."""
        peer = self.remote.membership.alive_peer(node_id)
        if peer is None:
            return False
        link = self.link(peer)
        if isinstance(message, CreateActor):
            link.creating[message.aid] = None
        if link.suspended:
            # work is kept in `inflight` / `creating` and sent again when the peer is back
            if reply_key(message) is None:
                link.held.append(message)
            return True
        session = link.session
        if session is None:
            session = link.session = TaskSession()
            session.task = self.remote.spawn(self._session(peer, session))
        key = reply_key(message)
        if key is not None:
            session.pending.add(key)
        session.outbox.put_nowait(message)
        return True

    def run_remote(self, rec: TaskRecord, target: str) -> None:
        """Send a task to the peer placement chose; back to this node's queue if it is gone."""
        peer = self.remote.membership.peers[target]
        link = self.link(peer)
        node = self.node
        msg = rec.msg
        blob = None
        if msg["fn"] not in link.shipped:
            blob = node.code[msg["fn"]]
            link.shipped.add(msg["fn"])
        again, stream = rec.tid in link.resent, None
        if again:
            link.resent.discard(rec.tid)
            stream = node.streams.states.get(rec.tid) if rec.nret == STREAMING else None
        task = SubmitTask(
            rec.tid,
            msg["fn"],
            rec.name,
            rec.nret,
            self.remote.objects.wire_args(msg["args"]),
            dict(msg["opts"], placed=True),
            blob,
            again,
            None if stream is None else stream.count,
            self.remote.placer.may_spill(rec),
        )
        rec.move(TaskEvent.SEND if rec.state is TaskState.SCHEDULING else TaskEvent.RESEND)
        rec.remote_peer = target
        link.inflight[rec.tid] = rec
        self.stats["remote_tasks"] += 1
        if not self.send(target, task):
            link.inflight.pop(rec.tid, None)
            rec.remote_peer = None
            if node.streams.started(rec):  # its items went out: it does not run again
                node.tasks.fail(
                    rec, NodeDiedError(f"node {target} running streaming task {rec.name} is gone")
                )
            else:
                node.tasks.run_here(rec)
        elif stream is not None and stream.consumed:  # an ack lost with the old session
            self.send(target, AckItems(rec.tid, stream.consumed))

    def cancel_remote(self, rec: TaskRecord, force: bool) -> None:
        self.send(rec.remote_peer, CancelTask(rec.tid, force))

    def ack_stream(self, tid: bytes, consumed: int) -> None:
        """The consumer of a stream a peer produces took ``consumed`` items."""
        rec = self.node.tasks.records.get(tid)
        if rec is not None and rec.remote_peer is not None:
            self.send(rec.remote_peer, AckItems(tid, consumed))

    def unpin_at(self, node_id: str, cids: list[str]) -> None:
        """Tell the node that ran a task it need not keep these store results for us any more."""
        self.send(node_id, ResultsFetched(cids))

    # ------------------------------------------------------------------ the session
    async def _session(self, peer: Peer, session: TaskSession) -> None:
        try:
            conn = await self.remote.mesh.connections.get(peer.peer_id, SESSION_DIAL_TIMEOUT)
            call = conn.session.call_bidi(TASK_PROTOCOL, SESSION_TIMEOUT)
            session.conn = conn
            reader = self.remote.spawn(self._session_replies(peer, session, call))
            try:
                if session.gate is not None and not session.gate.is_set():
                    try:
                        await asyncio.wait_for(session.gate.wait(), FENCE_TIMEOUT)
                    except TimeoutError:
                        log.info(
                            "no fence from %s's previous task session within %.0f s",
                            peer.node_id,
                            FENCE_TIMEOUT,
                        )
                self.move_session(peer)  # the path may have changed while we opened
                while True:
                    message = await session.outbox.get()
                    if isinstance(message, (SubmitTask, CallActor, CreateActor)):
                        # in line: what this peer is sent after it waits for its hashing
                        await self.remote.objects.portable_args(message.args)
                    await call.send(message.encode())
            finally:
                reader.cancel()
                call.cancel()
        except asyncio.CancelledError:
            raise
        except MeshError as exc:
            self._session_lost(peer, f"task session failed: {exc}", session)

    async def _session_replies(self, peer: Peer, session: TaskSession, call: Any) -> None:
        heard = self.remote.membership.heard
        try:
            async for raw in call:
                heard(peer.node_id)
                try:
                    message = wire.decode_task_reply(raw)
                except wire.UnknownKind:
                    continue  # a newer executor's: skipped
                if isinstance(message, Fenced):
                    session.fenced = True
                    if session.next_gate is not None:
                        session.next_gate.set()
                elif isinstance(message, WorkerOutput):
                    self.remote.node.logs.from_session(message.b)
                else:
                    self._on_reply(peer, message)
                    session.pending.discard(reply_key(message))
                if session.retiring:
                    self._retire_if_drained(peer, session)
        except asyncio.CancelledError:
            raise
        except (MeshError, ValueError) as exc:
            self._session_lost(peer, f"task session broke: {exc}", session)
            return
        self._session_lost(peer, "task session ended", session)

    # ------------------------------------------------------------------ moving to a better path
    def on_connection_added(self, conn: Any) -> None:
        peer = self.remote.membership.alive_peer(str(conn.peer_id))
        if peer is not None and not self.remote.stopped:
            self.move_session(peer)

    def move_session(self, peer: Peer) -> None:
        """If the peer's primary connection is a better path than the one the task session runs
        on (a hole-punched direct path replaced the relay), open a new session on the primary
        for new work and let the old one finish the work it carries (see TaskSession)."""
        link = self.link(peer)
        old = link.session
        if old is None or old.conn is None or old.retiring:
            return
        primary = self.remote.mesh.connection_to(peer.peer_id)
        if primary is None or path_rank(primary.transport) >= path_rank(old.conn.transport):
            return
        old.retiring = True
        old.next_gate = asyncio.Event()
        old.outbox.put_nowait(Fence())
        link.retiring.append(old)
        new = link.session = TaskSession(old.next_gate)
        new.task = self.remote.spawn(self._session(peer, new))
        self.stats["sessions_moved"] += 1
        log.info(
            "task session to %s moves from %s to %s (%d replies still due on the old one)",
            peer.node_id,
            old.conn.transport,
            primary.transport,
            len(old.pending),
        )

    def _retire_if_drained(self, peer: Peer, session: TaskSession) -> None:
        link = self.link(peer)
        session.pending = {
            k for k in session.pending if not isinstance(k, bytes) or k in link.inflight
        }
        if session.fenced and not session.pending:
            if session in link.retiring:
                link.retiring.remove(session)
            assert session.task is not None
            session.task.cancel()

    def _session_lost(self, peer: Peer, why: str, session: TaskSession | None = None) -> None:
        """A task session ended. If the peer is still connected (its connection was replaced, e.g.
        relayed -> direct, and the old one closed before its replies came back), open a new
        session and send the work in flight again; if it is not, the sessions are suspended
        until liveness has the peer back (`peer_back`) or judges it gone (`peer_gone`)."""
        link = self.link(peer)
        if session is not None and session.retiring:
            self._retired_session_lost(peer, why, session)
            return
        if session is not None and session is not link.session:
            return
        if not peer.alive or self.remote.stopped:
            return
        connected = self.remote.mesh.connection_to(peer.peer_id) is not None
        if connected:
            now = time.monotonic()
            link.reopen_times = [t for t in link.reopen_times if now - t < SESSION_REOPEN_WINDOW]
            if len(link.reopen_times) >= MAX_SESSION_REOPENS:
                self.remote.membership.peer_gone(
                    peer.node_id, f"{why}; its task sessions keep breaking"
                )
                return
            link.reopen_times.append(now)
        link.held = link.unsent() + link.held
        link.cancel_sessions()
        link.shipped.clear()
        link.parts.clear()
        if not connected:
            link.suspended = True
            self.stats["sessions_suspended"] += 1
            log.info(
                "task session to %s broke with its connection (%s); %d tasks wait for it to be "
                "reachable again",
                peer.node_id,
                why,
                len(link.inflight),
            )
            return
        log.info("task session to %s reopened (%s)", peer.node_id, why)
        self._resume(peer)

    def peer_back(self, peer: Peer) -> None:
        """Liveness has the peer back (reconnected, answering): suspended sessions resume."""
        link = peer.link
        if (
            link is not None
            and link.suspended
            and peer.alive
            and not self.remote.stopped
            and self.remote.mesh.connection_to(peer.peer_id) is not None
        ):
            log.info(
                "task session to %s resumes: %d tasks and %d actor creations sent again",
                peer.node_id,
                len(link.inflight),
                len(link.creating),
            )
            self._resume(peer)

    def _resume(self, peer: Peer) -> None:
        """Open a new session and send it, in their order, the actor creations not answered,
        the work in flight (marked `again`), then the control messages held back."""
        link = self.link(peer)
        link.suspended = False
        self.stats["sessions_reopened"] += 1
        held, link.held = link.held, []
        creating = list(link.creating)
        link.creating.clear()
        for aid in creating:
            self.remote.actors.resend_create(aid, peer)
        inflight = list(link.inflight.values())
        link.inflight.clear()
        self._resend(peer, inflight)
        for message in held:
            self.send(peer.node_id, message)

    def _retired_session_lost(self, peer: Peer, why: str, session: TaskSession) -> None:
        """A retired session closed before all its replies came back (the old path's drain
        deadline passed, or it broke): that work is sent again on the current session."""
        link = self.link(peer)
        if session in link.retiring:
            link.retiring.remove(session)
        if session.next_gate is not None:
            session.next_gate.set()
        if session.task is not None and session.task is not asyncio.current_task():
            session.task.cancel()
        lost = [
            link.inflight.pop(k)
            for k in session.pending
            if isinstance(k, bytes) and k in link.inflight
        ]
        lost_tids = {rec.tid for rec in lost}
        for key in [key for key in link.parts if key[0] in lost_tids]:
            del link.parts[key]  # a value cut off with the old path comes whole again
        if not peer.alive or self.remote.stopped:
            return
        if lost:
            log.info(
                "task session to %s closed with %d tasks in flight on the old path (%s); "
                "sending them again",
                peer.node_id,
                len(lost),
                why,
            )
            self.stats["tasks_resent"] += len(lost)
            link.shipped.clear()
        self._resend(peer, lost)

    def _resend(self, peer: Peer, inflight: list[TaskRecord]) -> None:
        """Work whose session broke while its peer lives goes out again, in the order it was
        sent, marked `again` (the executor runs it once: dedup.py); it spends no retry."""
        link = self.link(peer)
        for rec in inflight:
            rec.remote_peer = None
            if rec.done:
                continue
            if rec.cancelled:
                self.node.tasks.fail(rec, TaskCancelledError(f"task {rec.name} was cancelled"))
            elif rec.is_actor_call:
                self.remote.actors.resend(rec, peer)
            else:  # a streaming one too: the executor re-delivers what the caller lacks
                link.resent.add(rec.tid)
                self.run_remote(rec, peer.node_id)

    # ------------------------------------------------------------------ replies
    def _on_reply(self, peer: Peer, message: TaskReply) -> None:
        link = self.link(peer)
        if isinstance(message, ValuePart):
            link.parts.setdefault((message.tid, message.slot), []).append(bytes(message.d))
        elif isinstance(message, YieldItem):
            self._on_item(peer, link, message)
        elif isinstance(message, TaskDone):
            self._on_done(peer, link, message)
        elif isinstance(message, TaskRejected):
            rec = link.inflight.pop(message.tid, None)
            if rec is not None and not rec.done:
                rec.remote_peer = None
                self.remote.placer.rejected(rec, peer.node_id, message)
        elif isinstance(message, ActorCreated):
            link.creating.pop(message.aid, None)
            self.remote.actors.created(message.aid, message.error)

    def _on_item(self, peer: Peer, link: PeerSessions, message: YieldItem) -> None:
        tid, index = message.tid, message.i
        node = self.node
        stream = node.streams.states.get(tid)
        if stream is not None and index < stream.count:  # delivered before
            link.parts.pop((tid, ("y", index)), None)
            return
        data = message.d
        if data is None:
            data = b"".join(link.parts.pop((tid, ("y", index)), []))
        inner = message.inner
        node.streams.item({"tid": tid, "i": index, "d": data, "inner": inner})
        if inner:  # counted here now: the executor may let go of them
            self.remote.refs.ack_held(peer.node_id, object_id(tid, index))

    def _on_done(self, peer: Peer, link: PeerSessions, message: TaskDone) -> None:
        tid = message.tid
        rec = link.inflight.pop(tid, None)
        if rec is None or rec.done:
            return
        rec.remote_peer = None
        self.remote.placer.task_ended(rec, peer.node_id)
        # as a local worker's `done` (local/tasks.py `complete`)
        done: dict[str, Any] = {"tid": tid}
        if message.err is not None:
            done["err"] = message.err
            done["mro"] = message.mro or []
        if message.vals is not None:
            done["vals"] = [
                v if v is not None else b"".join(link.parts.pop((tid, i), []))
                for i, v in enumerate(message.vals)
            ]
        if message.inner:  # refs inside the results: the executor holds them until
            done["inner"] = message.inner
            done["held_by"] = peer.node_id  # tasks.complete has counted them here
        tasks = self.node.tasks
        if message.err is not None and not rec.cancelled and tasks.should_retry(rec, done["mro"]):
            rec.retries_left -= 1
            rec.move(TaskEvent.RETRY)
            tasks.schedule(rec)
            return
        self._complete_remote(peer, rec, done)

    def _complete_remote(self, peer: Peer, rec: TaskRecord, message: dict) -> None:
        """Seal a remote task's results. A store result this node lacks stays on the executor
        (its `holder`, which keeps it pinned until told `fetched`): it is fetched when it is
        needed here, and re-created from lineage if that node is gone by then."""
        node = self.node
        local = []
        for i, value in enumerate(message.get("vals") or []):
            if not serialization.is_store_ref(value):
                continue
            cid = serialization.store_cid(value)
            entry = node.objects.entries.get(object_id(rec.tid, i))
            if (
                self.remote.exchange is not None
                and entry is not None
                and entry.status == PENDING
                and not node.store.contains(cid)
            ):
                entry.holder = peer.node_id
            else:
                local.append(cid)
        if local:
            self.unpin_at(peer.node_id, local)
        node.tasks.complete(rec, message)

    # ------------------------------------------------------------------ departures
    def peer_gone(self, peer: Peer) -> None:
        """The peer died: its sessions end and the work it ran for us is retried or failed."""
        link = peer.link
        if link is None:
            return
        link.cancel_sessions()
        link.resent.clear()
        link.creating.clear()  # the owner restarts its actors elsewhere (actors.peer_gone)
        link.held.clear()
        link.suspended = False
        inflight = list(link.inflight.values())
        link.inflight.clear()
        tasks = self.node.tasks
        calls = []
        for rec in inflight:
            rec.remote_peer = None
            if rec.done:
                continue
            if rec.is_actor_call:
                calls.append(rec)
                continue
            may_retry = tasks.runner_lost(
                rec,
                NodeDiedError(
                    f"node {peer.node_id} running streaming task {rec.name} died mid-stream"
                ),
                NodeDiedError(
                    f"node {peer.node_id} running task {rec.name} died and no retries are left"
                ),
                self.stats,
            )
            if may_retry:
                rec.excluded = (rec.excluded or set()) | {peer.node_id}
                tasks.schedule(rec)
        self.remote.actors.calls_lost(calls, peer.node_id)
