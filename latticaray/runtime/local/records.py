"""The records a node keeps: objects it owns or holds, tasks it owns, streams, hosted actors.

Plain state with no behaviour beyond waking waiters; the parts of `RuntimeNode` (local/) and
its remote side (remote/) read and change them. `PENDING` is the status of an object whose
producer has not sealed it yet (`OK` and `ERROR`, the statuses of a sealed one, are the
worker channel's, protocol.py).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from latticaray.runtime.protocol import ERROR, OK, STREAMING
from latticaray.runtime.states import (
    TASK_TERMINAL,
    ActorEvent,
    ActorState,
    TaskEvent,
    TaskState,
    actor_transition,
    task_transition,
)
from latticaray.scheduler.resources import normalize

if TYPE_CHECKING:
    from latticaray.runtime.local.clients import WorkerHandle

__all__ = [
    "DEFAULT_STREAM_WINDOW",
    "ERROR",
    "OK",
    "PENDING",
    "STREAMING",
    "HostedActor",
    "ObjectEntry",
    "StreamState",
    "TaskRecord",
]

PENDING = -1
DEFAULT_STREAM_WINDOW = 16


class ObjectEntry:
    """One object the node owns or holds: pending until its producer seals it."""

    __slots__ = ("cid", "data", "holder", "released", "status", "waiters")

    def __init__(self, status: int = PENDING, data: bytes | None = None):
        self.status = status
        self.data = data
        self.cid: str | None = None
        self.waiters: list[Callable[[], Any]] | None = None
        self.released = False
        self.holder: str | None = None  # the node holding the only copy (a remote result)

    def seal(self, status: int, data: bytes | None) -> None:
        self.status = status
        self.data = data
        waiters, self.waiters = self.waiters, None
        if waiters:
            for callback in waiters:
                callback()

    def on_ready(self, callback: Callable[[], Any]) -> None:
        if self.status != PENDING:
            callback()
        elif self.waiters is None:
            self.waiters = [callback]
        else:
            self.waiters.append(callback)

    async def sealed(self) -> None:
        """Wait (on the running loop) until the producer has sealed the entry."""
        if self.status == PENDING:
            ready = asyncio.get_running_loop().create_future()

            def wake() -> None:
                if not ready.done():
                    ready.set_result(None)

            self.on_ready(wake)
            await ready


class TaskRecord:
    """A task or actor call owned by this node, from submission to its last result. Its
    lifecycle is ``state`` (a TaskState), moved by TaskEvents through states.py's table."""

    __slots__ = (
        "actor",
        "children",
        "client",
        "demand",
        "dep_error",
        "deps_left",
        "excluded",
        "msg",
        "name",
        "nret",
        "pins",
        "remote_peer",
        "retries_left",
        "retry_exc",
        "spills",
        "state",
        "tid",
        "worker",
    )

    def __init__(
        self,
        tid: bytes,
        msg: dict,
        nret: int,
        retries_left: int,
        retry_exc: Any,
        demand: dict,
        name: str,
        actor: HostedActor | None = None,
    ):
        self.tid = tid
        self.msg = msg
        self.nret = nret
        self.retries_left = retries_left
        self.retry_exc = retry_exc
        self.demand = demand
        self.deps_left = 0
        self.worker: Any = None  # the WorkerHandle running it here
        self.state = TaskState.RESOLVING
        self.children: list[bytes] | None = None
        self.actor = actor
        self.name = name
        self.remote_peer: str | None = None  # the node running it for us
        self.client: Any = None  # who submitted it (a client of the node)
        self.dep_error: bytes | None = None
        self.excluded: set[str] | None = None
        self.spills = 0  # times a peer rejected it (busy, queue full) and it was placed again
        self.pins: list[str] | None = None  # store objects its arguments need until it is done

    @classmethod
    def for_task(cls, message: dict) -> TaskRecord:
        """The record of a task submission (`submit`, or a lineage re-execution of one)."""
        opts = message["opts"]
        return cls(
            message["tid"],
            message,
            message["nret"],
            opts.get("max_retries", 3),
            opts.get("retry_exc"),
            opts.get("res", {"CPU": 1.0}),  # {}: num_cpus=0, takes nothing
            message.get("name", "task"),
        )

    @property
    def is_actor_call(self) -> bool:
        return "aid" in self.msg

    @property
    def done(self) -> bool:
        """Its results (or its error) are sealed."""
        return self.state in TASK_TERMINAL

    @property
    def cancelled(self) -> bool:
        """Cancelled while it runs (here or on a peer): it ends, without a retry."""
        return self.state is TaskState.CANCELLING

    def move(self, event: TaskEvent) -> None:
        """Apply a lifecycle event (states.py's table; IllegalTransition if it has no move)."""
        self.state = task_transition(self.state, event)


class StreamState:
    """Items a streaming task has produced, what the consumer took, and who waits for more."""

    __slots__ = ("consumed", "count", "finished", "waiters", "window", "worker")

    def __init__(self, window: int):
        self.count = 0
        self.finished = False
        self.consumed = 0
        self.waiters: list[Callable[[], Any]] = []
        self.worker: WorkerHandle | None = None
        self.window = window

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for callback in waiters:
            callback()


class HostedActor:
    """An actor hosted on this node (its worker process, its queued and running calls)."""

    def __init__(self, aid: bytes, msg: dict, opts: dict):
        self.aid = aid
        self.msg = msg
        self.opts = opts
        self.name = opts.get("name")
        self.namespace = opts.get("namespace") or "default"
        self.max_restarts = int(opts.get("max_restarts", 0))
        self.restarts = 0
        self.state = ActorState.PENDING
        # argument resolution, as a TaskRecord's; its store values stay pinned until the
        # constructor ran, or while the actor may restart
        self.deps_left = 0
        self.dep_error: bytes | None = None
        self.pins: list[str] | None = []
        self.worker: WorkerHandle | None = None
        self.outbox: collections.deque[TaskRecord] = collections.deque()
        self.inflight: dict[bytes, TaskRecord] = {}
        self.no_restart = False
        self.death_cause = ""
        self.demand = normalize(opts.get("resources") or {})

    @property
    def dead(self) -> bool:
        return self.state is ActorState.DEAD

    def move(self, event: ActorEvent) -> None:
        """Apply a lifecycle event (states.py's table; IllegalTransition if it has no move)."""
        self.state = actor_transition(self.state, event)

    def die(self) -> None:
        """The actor is dead for good (from any state; once)."""
        if self.state is not ActorState.DEAD:
            self.move(ActorEvent.DIED)
