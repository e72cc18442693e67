"""Executor side of `/latticaray/task/1`: running what a caller node sends, answering it.

A caller's session is served as a `RemoteClient` of the RuntimeNode: its tasks are admitted by
the node's LocalScheduler as they arrive (one the caller may place elsewhere is `rejected` with
this node's fresh view when the node is busy and its fair queue has no room for that caller),
then submitted (placed here, never re-placed), its actor creations and calls go to the ActorHost, in the order
they came. Store arguments this node lacks are fetched first (objects.py). Results go back as
`done` (store results by CID, large values as `part`s first), streamed items as `yield`, each
reply held back until the borrow registrations made before it reached their owners; what went
out is kept to answer a re-sent task (dedup.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from latticaray.runtime import serialization
from latticaray.runtime.admission import Permission
from latticaray.runtime.errors import ObjectLostError
from latticaray.runtime.ids import object_id
from latticaray.runtime.local.records import STREAMING, TaskRecord
from latticaray.runtime.remote import wire
from latticaray.runtime.remote.objects import release_off_loop
from latticaray.runtime.remote.wire import (
    CHUNK,
    AckItems,
    ActorCreated,
    CallActor,
    CancelTask,
    CreateActor,
    Fence,
    Fenced,
    KillActor,
    RefsHeld,
    ResultsFetched,
    SubmitTask,
    TaskDone,
    TaskRejected,
    TaskReply,
    ValuePart,
    YieldItem,
)
from latticaray.runtime.serialization import error_blob

if TYPE_CHECKING:
    from latticaray.runtime.remote.runtime import RemoteRuntime


class RemoteClient:
    """A peer that opened a task session to this node, as a client of the RuntimeNode."""

    kind = "remote"
    current_task = None
    ref_holds = None  # its caller node counts the refs

    def __init__(self, remote: RemoteRuntime, node_id: str, outbox: asyncio.Queue):
        self.remote = remote
        self.node_id = node_id
        self.outbox = outbox
        self.closed = False
        self.held_back: list | None = None  # replies waiting for this node's registrations

    def send(self, message: TaskReply) -> None:
        if self.closed:
            return
        if (
            isinstance(message, TaskDone)
            and message.vals
            and any(
                serialization.is_store_ref(v) and v[len(serialization.STORE_MAGIC) :][:1] != b"b"
                for v in message.vals
            )
        ):
            # results under local names: hashed off the event loop, sent in their turn
            self.outbox.put_nowait(self.remote.spawn(self._packed_portable(message)))
        else:
            self.outbox.put_nowait(message.encode())

    def send_parts(self, tid: bytes, slot: Any, pieces: list) -> None:
        """Queue a value's pieces, sent as `part` frames as the session's flow control takes
        them."""
        if not self.closed:
            self.outbox.put_nowait(parts(tid, slot, pieces))

    async def _packed_portable(self, message: TaskDone) -> bytes:
        objects = self.remote.node.objects
        vals, named = message.vals or [], []
        try:
            out: list[bytes | None] = []
            for v in vals:
                if serialization.is_store_ref(v):
                    assert v is not None
                    portable = await objects.portable_async(v, awaiting_fetch=True)
                    if portable is not v:
                        named.append(serialization.store_name(portable))
                    v = portable
                out.append(v)
            message = dataclasses.replace(message, vals=out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # the caller gets an error, not the results, so it never answers "fetched": the
            # results kept for it (`on_task_complete`) are let go of here
            for cid in named:
                objects.name_fetched(cid)
            for v in vals:
                name = serialization.store_name(v) if serialization.is_store_ref(v) else None
                if name is not None and objects.store_refs.get(name, 0) > 0:
                    objects.unpin(name)
            message = TaskDone(
                message.tid,
                err=error_blob(
                    ObjectLostError(f"a result could not be named by CID to send it: {exc!r}")
                ),
            )
        return message.encode()

    def _send_value(self, tid: bytes, slot: Any, data: bytes, sent: list | None = None) -> Any:
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
        self.send_parts(tid, slot, pieces)
        return None

    def on_task_complete(self, rec: TaskRecord, message: dict, answering: bool = False) -> None:
        """The task this caller sent finished here: its `done` goes back (see the module)."""
        remote = self.remote
        seen = remote.dedup.of(self.node_id)
        answerer = seen.running.pop(rec.tid, None) if seen is not None else None
        if answerer is not None and answerer is not self:
            # the task was sent again on a later session
            answerer.on_task_complete(rec, message, answering=True)
            return
        if answering:
            answerer = self
        node = remote.node
        tid = rec.tid
        sent: list = []
        err = message.get("err")
        vals = None
        if "vals" in message:
            # store results keep their local names until `send` names them by CID
            vals = [
                v
                if remote.exchange is not None and serialization.is_store_ref(v)
                else self._send_value(tid, i, v, sent)
                for i, v in enumerate(message["vals"])
            ]
        inner = None
        if rec.nret == STREAMING:
            node.streams.states.pop(tid, None)
        else:
            if message.get("inner"):  # held here until the caller holds them (`held`)
                node.refs.forward(tid, self.node_id, [object_id(tid, i) for i in range(rec.nret)])
                inner = message["inner"]
            sent_by_ref = {i for i, v in enumerate(vals or []) if serialization.is_store_ref(v)}
            entries = node.objects.entries
            for i in range(rec.nret):
                entry = entries.pop(object_id(tid, i), None)
                # a store object sent by reference stays until the caller says it has its copy
                if entry is not None and i not in sent_by_ref:
                    node.objects.forget(entry)
        out = TaskDone(tid, vals, err, message.get("mro", []) if err is not None else None, inner)
        if seen is not None and answerer is not None:  # kept to answer a re-sent task id
            size = (
                _parts_size(sent)
                + len(err or b"")
                + sum(len(v) for v in vals or [] if v is not None)
            )
            if rec.nret == STREAMING:
                seen.stream_finished(tid, [*sent, out], size, time.monotonic())
            else:
                seen.record(tid, [*sent, out], size, time.monotonic())
        elif seen is not None and rec.nret == STREAMING:
            seen.forget(tid)  # detached (a stream re-sent and lost): nothing is kept for it
        # refs the task borrowed are registered with their owners before the caller, which
        # lets go of the task's arguments on `done`, hears of it
        self.send_settled(out)

    def send_settled(self, out: TaskReply) -> None:
        """Send once every borrow registration made so far has reached its owner, in order."""
        if self.held_back is not None:
            self.held_back.append(out)
        elif self.remote.node.refs.unsettled():
            self.held_back = [out]
            self.remote.spawn(self._send_when_settled())
        else:
            self.send(out)

    async def _send_when_settled(self) -> None:
        await self.remote.node.refs.settled()
        held, self.held_back = self.held_back, None
        for out in held or ():
            self.send(out)

    def on_task_yield(self, rec: TaskRecord, message: dict) -> None:
        """An item the caller's streaming task yielded here: a `yield` goes back."""
        tid, index = rec.tid, message["i"]
        seen = self.remote.dedup.of(self.node_id)
        streamer = seen.running.get(tid, self) if seen is not None else self
        if streamer is not self:  # the task was sent again on a later session
            streamer.on_task_yield(rec, message)
            return
        oid = object_id(tid, index)
        node = self.remote.node
        sent: list = []
        data = self._send_value(tid, ("y", index), message["d"], sent)
        inner = message.get("inner") or None
        if inner:  # held here until the caller holds them (`held` with oid)
            node.refs.forward(oid, self.node_id, [oid])
        out = YieldItem(tid, index, data, inner)
        if seen is not None:  # kept until acknowledged, to deliver again if the task is re-sent
            seen.keep_item(tid, index, [*sent, out], _parts_size(sent) + len(data or b""))
        self.send_settled(out)
        entry = node.objects.entries.pop(oid, None)
        if entry is not None:
            node.objects.forget(entry)


async def parts(tid: bytes, slot: Any, pieces: list) -> AsyncIterator[bytes]:
    """The `part` frames of a value's pieces, one CHUNK at a time. A piece sent is given up
    off the event loop: its views may be the last of a store object's mapping."""
    todo = list(pieces)  # this generator's own references, given up one piece at a time
    del pieces
    try:
        while todo:
            view = memoryview(todo[0])
            for start in range(0, len(view), CHUNK):
                yield ValuePart(tid, slot, view[start : start + CHUNK]).encode()
            del view
            release_off_loop([todo.pop(0)])
    finally:
        release_off_loop(todo)


def _parts_size(sent: list) -> int:
    return sum(len(piece) for _, pieces in sent for piece in pieces)


class Executor:
    """Serves the task sessions callers open to this node."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote
        self.node = remote.node

    async def serve_session(self, ctx: Any, requests: Any) -> AsyncIterator[bytes]:
        caller = self.remote.membership.require_member(ctx, Permission.SUBMIT)
        outbox: asyncio.Queue = asyncio.Queue()
        client = RemoteClient(self.remote, caller, outbox)
        reader = self.remote.spawn(self._requests(client, requests))
        reader.add_done_callback(lambda _t: outbox.put_nowait(None))
        try:
            while True:
                frame = await outbox.get()
                if frame is None:
                    break
                if isinstance(frame, asyncio.Future):
                    frame = await frame
                elif not isinstance(frame, bytes):  # a value's parts (`send_parts`)
                    async for part in frame:
                        yield part
                        await asyncio.sleep(0)  # a window's worth of parts is no single step
                    continue
                yield frame
        finally:
            client.closed = True
            reader.cancel()

    async def _requests(self, client: RemoteClient, requests: Any) -> None:
        membership = self.remote.membership
        admission = membership.admission
        async for raw in requests:
            membership.heard(client.node_id)
            if not admission.allowed(client.node_id):
                return
            try:
                message = wire.decode_task_request(raw)
            except wire.UnknownKind:
                continue  # a newer caller's: skipped
            if isinstance(message, SubmitTask):
                self._task(client, message)
            elif isinstance(message, CallActor):
                await self._actor_call(client, message)
            elif isinstance(message, CreateActor):
                await self._create_actor(client, message)
            else:
                self._control(client, message)

    def _task(self, client: RemoteClient, message: SubmitTask) -> None:
        node = self.node
        remote = self.remote
        task = message.body()
        if "blob" in task:
            node.code[message.fn] = task.pop("blob")
        if message.fn not in node.code:
            client.send(
                TaskDone(
                    message.tid, err=error_blob(RuntimeError("executor lacks the task's code"))
                )
            )
            return
        if message.spill and not message.again:
            # admission: a node that is busy and whose queue has no room for this caller
            # says so with its fresh view, and the caller places the task elsewhere
            hint = node.tasks.refusal(client, message.tid, message.opts)
            if hint is not None:
                remote.stats["tasks_rejected"] += 1
                client.send(
                    TaskRejected(
                        message.tid,
                        f"node {remote.node_id} is busy and its task queue is full "
                        f"({hint.queued} waiting)",
                        dict(hint.total),
                        dict(hint.available),
                        hint.queued,
                        hint.running,
                        hint.queue_limit,
                    )
                )
                return
        if remote.dedup.seen_before(client, message):
            return
        task.pop("again", None)
        task.pop("got", None)
        task.pop("spill", None)
        task["opts"]["placed"] = True
        task["op"] = "submit"
        missing = remote.objects.missing_store_args(task["args"])
        if missing:
            remote.spawn(
                remote.objects.fetch_then(
                    missing, client.node_id, lambda: node.tasks.submit(task, client)
                )
            )
        else:
            node.tasks.submit(task, client)

    async def _actor_call(self, client: RemoteClient, message: CallActor) -> None:
        remote = self.remote
        if remote.dedup.seen_before(client, message):
            return
        call = message.body()
        call.pop("again", None)
        call["anode"] = remote.node_id
        missing = remote.objects.missing_store_args(call["args"])
        if missing:  # in line: later calls of this caller must not overtake it
            await remote.objects.fetch_then(missing, client.node_id, lambda: None)
        self.node.actors.call(call, client)

    async def _create_actor(self, client: RemoteClient, message: CreateActor) -> None:
        node = self.node
        hosted = node.actors.hosted.get(message.aid)
        if hosted is not None and not hosted.dead:
            # sent again (its caller's session broke before `created` came back): one actor
            client.send(ActorCreated(message.aid, None))
            return
        create = message.body()
        if "blob" in create:
            node.code[message.cls] = create.pop("blob")
        missing = self.remote.objects.missing_store_args(create["args"])
        if missing:  # in line: the actor's calls come after its creation
            await self.remote.objects.fetch_then(missing, client.node_id, lambda: None)
        reply = node.actors.host(create)
        client.send(ActorCreated(message.aid, reply.get("error")))

    def _control(self, client: RemoteClient, message: Any) -> None:
        node = self.node
        if isinstance(message, Fence):  # the caller moves to a new session once answered
            client.send(Fenced())
        elif isinstance(message, CancelTask):
            node.tasks.cancel_task(message.tid, message.force, True)
        elif isinstance(message, AckItems):
            seen = self.remote.dedup.of(client.node_id)
            if seen is not None:
                seen.acked(message.tid, message.n)
            node.streams.consumed(message.tid, message.n)
        elif isinstance(message, KillActor):
            node.actors.kill(
                {"aid": message.aid, "no_restart": message.no_restart}, client, message.cause
            )
        elif isinstance(message, RefsHeld):  # the caller counts the refs inside results now
            node.refs.held(message.tid, client.node_id)
        elif isinstance(message, ResultsFetched):  # the caller has its own copies now
            node.objects.unpin_fetched(message.cids[:1024])
