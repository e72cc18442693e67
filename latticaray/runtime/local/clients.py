"""The clients of a node: its driver thread, its worker processes, attached drivers.

A client is whoever posts operations to the node and holds refs through it. The remote side's
`RemoteClient` (remote/executor.py) is the fourth kind: a caller node's task session.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import TYPE_CHECKING, Any

from latticaray.runtime import refcount
from latticaray.runtime.protocol import pack

if TYPE_CHECKING:
    from latticaray.runtime.local.records import HostedActor, TaskRecord


class LocalClient:
    """The driver thread of this process, as a client of the node."""

    kind = "driver"
    current_task = None
    ref_holds = None  # its holds end with the node: not tracked per process

    def __init__(self, node_id: str):
        self.node_id = node_id


class WorkerHandle:
    """A worker process as seen by its node."""

    kind = "worker"

    def __init__(self, worker_id: str, proc: subprocess.Popen, writer: Any, is_actor: bool):
        self.worker_id = worker_id
        self.proc = proc
        self.writer = writer
        self.is_actor = is_actor
        self.ready = False
        self.alive = True
        self.tasks: dict[bytes, TaskRecord] = {}
        self.loaded: set[bytes] = set()
        self.blocked = 0
        self.actor: HostedActor | None = None
        self.ref_holds: dict[bytes, int] | None = None
        self._early: list[bytes] = []
        refcount.track_holds(self)

    def send(self, message: dict) -> None:
        if not self.alive:
            return
        if self.writer is None:
            self._early.append(pack(message))
        else:
            self.writer.write(pack(message))

    def attach(self, writer: Any) -> None:
        self.writer = writer
        for frame in self._early:
            writer.write(frame)
        self._early.clear()

    @property
    def current_task(self) -> bytes | None:
        return next(iter(self.tasks), None)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def interrupt(self) -> None:
        """SIGUSR1: the worker's main thread runs user code, a signal makes it read its
        channel (where a cancel waits)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass


class AttachedDriver:
    """A driver process attached over the node's Unix socket (`init(address=...)`)."""

    kind = "driver"
    is_actor = False
    current_task = None

    def __init__(self, writer: Any):
        self.writer = writer
        self.alive = True
        self.tasks: dict = {}
        self.blocked = 0
        self.owned_actors: list[bytes] = []  # non-detached actors it created: they end with it
        self.owned_groups: list[str] = []  # its placement groups (not detached): they too
        self.ref_holds: dict[bytes, int] | None = None
        refcount.track_holds(self)

    def send(self, message: dict) -> None:
        if self.alive:
            self.writer.write(pack(message))
