"""Streaming tasks on their owner node: items as they are yielded, consumers, backpressure.

A streaming task (`num_returns="streaming"`, nret -1) yields items that are sealed as objects
`object_id(task, i)`. The owner counts what its consumer took (`consumed`) and acknowledges it
to the producer (`gen_ack` to a local worker, an `ack` over the task session to a remote
executor), which runs at most `window` items ahead. A consumer on another node asks the owner
over `/latticaray/stream/1` (remote/streams.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from latticaray.runtime.ids import object_id
from latticaray.runtime.local.records import ERROR, OK, StreamState, TaskRecord
from latticaray.runtime.states import TaskEvent

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode


class StreamTable:
    """The streams of tasks this node owns or runs, by task id."""

    def __init__(self, node: RuntimeNode):
        self.node = node
        self.states: dict[bytes, StreamState] = {}

    def open(self, tid: bytes, window: int, client: Any) -> None:
        self.states[tid] = StreamState(window)
        self.node.refs.open_stream(tid, client)

    def started(self, rec: TaskRecord) -> bool:
        """Whether the task has yielded items already (it cannot simply run again)."""
        stream = self.states.get(rec.tid)
        return stream is not None and stream.count > 0

    def item(self, message: dict) -> None:
        """The producer yielded item ``i`` (a local worker's `yield`, or a remote executor's)."""
        tid = message["tid"]
        stream = self.states.get(tid)
        if stream is None:
            return
        node = self.node
        index = message["i"]
        oid = object_id(tid, index)
        if message.get("inner"):  # refs inside the item live as long as it does
            node.refs.contain(oid, message["inner"])
        node.objects.seal(oid, OK, message["d"])
        stream.count = max(stream.count, index + 1)
        if not node.refs.stream_item(tid, oid):  # nobody will take it: the producer goes on
            stream.consumed = max(stream.consumed, index + 1)
            self.ack(tid, stream)
        stream.wake()
        rec = node.tasks.records.get(tid)
        if rec is None:
            return
        rec.move(TaskEvent.YIELD)
        notify = getattr(rec.client, "on_task_yield", None)
        if notify is not None:
            notify(rec, message)

    def finish(self, tid: bytes, err: bytes | None) -> None:
        """The streaming task ended (an error is its last item)."""
        node = self.node
        stream = self.states.get(tid)
        if stream is not None:
            if err is not None:
                node.objects.seal(object_id(tid, stream.count), ERROR, err)
                node.refs.stream_item(tid, object_id(tid, stream.count))
                stream.count += 1
            stream.finished = True
            stream.wake()
        if node.refs.stream_end(tid):
            self.states.pop(tid, None)

    async def next(self, message: dict, client: Any = None) -> dict:
        """The ref of item ``i`` once it exists, ``end``, or ``timeout``."""
        node = self.node
        tid, index = message["tid"], message["i"]
        stream = self.states.get(tid)
        if stream is None:
            owner = message.get("owner")
            if node.remote is not None and owner and owner != node.node_id:
                return await node.remote.streams.next_from(owner, message)
            return {"end": True}
        if index >= stream.count and not stream.finished:
            loop = asyncio.get_running_loop()
            timeout = message.get("timeout")
            deadline = None if timeout is None else loop.time() + timeout
            while index >= stream.count and not stream.finished:
                future: asyncio.Future[None] = loop.create_future()

                def wake(f: asyncio.Future[None] = future) -> None:
                    if not f.done():
                        f.set_result(None)

                stream.waiters.append(wake)
                left = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    await asyncio.wait_for(future, left)
                except TimeoutError:
                    return {"timeout": True}
        if index < stream.count:
            if index + 1 > stream.consumed:
                stream.consumed = index + 1
                self.ack(tid, stream)
            oid = object_id(tid, index)
            reply: dict = {"oid": oid, "owner": node.node_id}
            if not message.get("borrow") and node.refs.take_item(tid, oid, client):
                reply["held"] = True  # the generator's hold is the taker's now
            return reply
        self.states.pop(tid, None)
        return {"end": True}

    def drop(self, message: dict, client: Any) -> None:
        """The process that submitted a streaming task dropped its generator (or died): the
        items nobody took are released, and so are the ones the task still yields."""
        tid = message["tid"]
        stream = self.states.get(tid)
        running = stream is not None and not stream.finished
        self.node.refs.drop_stream(tid, running)
        if stream is None or not running:
            self.states.pop(tid, None)
        elif stream.count > stream.consumed:
            stream.consumed = stream.count
            self.ack(tid, stream)

    def consumed(self, tid: bytes, count: int) -> None:
        """The remote caller's consumer took ``count`` items (its `ack`)."""
        stream = self.states.get(tid)
        if stream is not None and count > stream.consumed:
            stream.consumed = count
            self.ack(tid, stream)

    def ack(self, tid: bytes, stream: StreamState) -> None:
        """Tell the producer how far the consumer is (its backpressure credit)."""
        if stream.worker is not None:
            stream.worker.send({"op": "gen_ack", "tid": tid, "n": stream.consumed})
        elif self.node.remote is not None:
            self.node.remote.caller.ack_stream(tid, stream.consumed)
