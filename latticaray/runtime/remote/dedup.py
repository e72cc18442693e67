"""Executor side de-duplication of work a caller sends again (`again` in `task`/`acall`).

A caller re-sends the work in flight on a task session that broke or moved (caller.py). The
executor remembers, per caller node, the task ids it accepted: a re-sent one still running is
attached to that run (its reply goes to the session that sent it last); a finished one is
answered with its kept reply frames and not run twice; a streaming one gets the items its
caller lacks. See docs/protocol/runtime.md, "Deduplication".
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any

from latticaray.runtime.errors import ObjectLostError
from latticaray.runtime.local.records import STREAMING
from latticaray.runtime.remote.wire import CallActor, SubmitTask, TaskDone, YieldItem
from latticaray.runtime.serialization import error_blob

if TYPE_CHECKING:
    from latticaray.runtime.remote.executor import RemoteClient
    from latticaray.runtime.remote.runtime import RemoteRuntime

SEEN_TASKS = 10_000  # finished task ids an executor remembers per caller, and how long
SEEN_TASKS_TTL = 600.0
SEEN_RESULT_BYTES = 64 << 20  # reply bytes it keeps per caller to answer a re-sent task again


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

    def __init__(self) -> None:
        self.running: dict[bytes, Any] = {}  # tid -> the RemoteClient that answers it
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

    def __init__(self) -> None:
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


class TaskDedup:
    """The executor's CallerTasks by caller node, and what a re-sent message gets."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote
        self.stats = remote.stats
        self.callers: dict[str, CallerTasks] = {}

    def of(self, caller: str) -> CallerTasks | None:
        return self.callers.get(caller)

    def caller_gone(self, caller: str) -> None:
        self.callers.pop(caller, None)

    def seen_before(self, client: RemoteClient, message: SubmitTask | CallActor) -> bool:
        """Whether this caller sent this task id before (see CallerTasks): if it did, the re-sent
        message is attached to that run, or answered with its kept reply; if not, it is noted.
        A re-sent streaming task carries `got`, the items its caller has already."""
        tid = message.tid
        streaming = message.nret == STREAMING
        got = (message.got or 0) if streaming and isinstance(message, SubmitTask) else 0
        seen = self.callers.setdefault(client.node_id, CallerTasks())
        seen.expire(time.monotonic())
        if not message.again:
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
            replay(client, tid, finished[1], got)
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

    def _replay_stream(self, client: RemoteClient, seen: CallerTasks, tid: bytes, got: int) -> None:
        """A running streaming task was re-sent: its kept items from `got` on go to the new
        session, and so will its later ones (`on_task_yield` follows `seen.running`)."""
        stream = seen.streams.get(tid)
        if stream is None or got < stream.lost:
            seen.running.pop(tid, None)
            self._stream_items_gone(client, tid, got)
            self.remote.node.tasks.cancel_task(tid, False, True)
            return
        replay(
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
            TaskDone(
                tid,
                err=error_blob(
                    ObjectLostError(
                        f"streaming task {tid.hex()} was sent again, but the executor no longer "
                        f"has its items from {got} on (more than {SEEN_RESULT_BYTES} bytes of "
                        f"this caller's replies were unacknowledged, or it never saw the task); "
                        f"the stream ends here"
                    )
                ),
            )
        )


def replay(client: RemoteClient, tid: bytes, frames: list, got: int = 0) -> None:
    """Send kept frames again (`part` pieces as (slot, pieces), messages as they went), less
    the streamed items below `got`, which the caller has."""
    for frame in frames:
        if not isinstance(frame, tuple):
            if not isinstance(frame, YieldItem) or frame.i >= got:
                client.send_settled(frame)
            continue
        slot, pieces = frame
        if isinstance(slot, tuple) and slot[1] < got:
            continue
        client.send_parts(tid, slot, pieces)
