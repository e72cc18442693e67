"""Worker output on its way to the driver that owns the task (Ray's ``log_to_driver``).

A worker sends `log` posts, each an encoded LogBatch of the lines one task printed
(latticaray.observe.capture). `LogRouter.from_worker` names the batch after the task (the
record's name: ``f``, ``Counter.incr``) and sets its owner: the node whose client submitted the
task (an actor's constructor output goes to the actor's creator). A batch owned here goes to
the node's ``sink`` (set by an embedded driver that wants the lines, `init(log_to_driver=True)`)
or, on a node without a driver, to this process's stderr with its prefix. A batch of a task
another node sent here goes back on that task session, before the task's reply
(`WorkerOutput`, so the caller shows a task's output before its result); other batches owned by
another node (an actor constructor's) go over the members-only ``/latticaray/logs/1``
(remote/observe.py). ``deliver`` takes them at the owner.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from latticaray.observe import metrics
from latticaray.observe.logs import LogBatch, LogDecodeError, format_prefix
from latticaray.runtime.remote.wire import WorkerOutput

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode

__all__ = ["LogRouter"]


class LogRouter:
    """Routes worker output batches to the owning node's driver."""

    def __init__(self, node: RuntimeNode) -> None:
        self.node = node
        self.sink: Callable[[LogBatch], Any] | None = None  # the embedded driver's printer
        self._dropped = metrics.LOG_LINES.labels("dropped")

    def from_worker(self, message: dict, client: Any) -> None:
        if getattr(client, "kind", "") != "worker":
            return
        try:
            batch = LogBatch.decode(message["b"])
        except (LogDecodeError, KeyError, TypeError):
            return
        node = self.node
        owner, name = node.node_id, batch.name
        rec = None
        if batch.task_id:
            try:
                tid = bytes.fromhex(batch.task_id)
            except ValueError:
                tid = b""
            rec = client.tasks.get(tid) or node.tasks.records.get(tid)
        actor = client.actor
        if actor is not None:  # Ray's prefix for an actor's output is its class
            name = str(actor.msg.get("cname", name))
        if rec is not None:
            if actor is None:
                name = rec.name
            if getattr(rec.client, "kind", "") == "remote":
                owner = rec.client.node_id
        elif actor is not None:  # outside a call (the constructor): the actor's creator
            creator = actor.msg.get("owner")
            if isinstance(creator, str) and creator:
                owner = creator
        elif batch.task_id:  # read from a pipe after its task ended here: still its lines
            ended = node.activity.recently_ended(batch.task_id)
            if ended is not None:
                name = ended.name
                owner = ended.owner_node_id or owner
        batch = dataclasses.replace(batch, owner=owner, name=name[:256])
        caller: Any = rec.client if rec is not None else None
        if caller is not None and caller.kind == "remote" and not caller.closed:
            caller.send(WorkerOutput(batch.encode()))  # ordered before the task's reply
            return
        self.route(batch)

    def from_session(self, data: bytes) -> None:
        """A `WorkerOutput` that came back on one of this node's task sessions."""
        try:
            batch = LogBatch.decode(data)
        except LogDecodeError:
            self._dropped.add()
            return
        self.deliver(batch)

    def route(self, batch: LogBatch) -> None:
        if batch.owner == self.node.node_id:
            self.deliver(batch)
            return
        remote = self.node.remote
        if remote is None or not remote.observe.send_logs(batch):
            self.deliver(batch)  # the owner cannot be reached: at least it is seen here

    def deliver(self, batch: LogBatch) -> None:
        """A batch for this node's driver (or this node's stderr when it has none)."""
        sink = self.sink
        if sink is not None:
            sink(batch)
            return
        prefix = format_prefix(batch.name, batch.pid, batch.node)
        try:
            sys.stderr.write("".join(f"{prefix} {text}\n" for _, text in batch.lines))
            sys.stderr.flush()
        except (OSError, ValueError):
            self._dropped.add(len(batch.lines))
