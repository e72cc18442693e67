"""Tasks a node owns or runs: submission, argument resolution, placement, dispatch, results.

A task's path through its owner: `submit` makes its record and pending returns, `resolve_args`
waits for its top-level ref arguments to be values (fetched, located or recovered), `schedule`
asks the remote side where it runs (placement over the mesh) and queues it here otherwise,
`dispatch` hands queued tasks to idle task workers as the resource ledger allows, and `complete`
seals its returns (a local worker's `done`, a remote executor's, or `fail`). Retries after an
exception (`retry_exceptions`) or a lost runner spend `max_retries`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from latticaray.runtime import refcount, serialization
from latticaray.runtime.errors import (
    NotPermittedError,
    ObjectLostError,
    TaskCancelledError,
    TaskUnschedulableError,
)
from latticaray.runtime.ids import object_id, task_of
from latticaray.runtime.local.clients import WorkerHandle
from latticaray.runtime.local.records import (
    DEFAULT_STREAM_WINDOW,
    ERROR,
    OK,
    PENDING,
    STREAMING,
    HostedActor,
    ObjectEntry,
    TaskRecord,
)
from latticaray.runtime.local.resources import WAIT
from latticaray.runtime.remote.capacity import DEFERRED
from latticaray.runtime.serialization import error_blob
from latticaray.runtime.states import TaskEvent, TaskState
from latticaray.scheduler.local import AdmissionKind, FairQueue, LocalScheduler, QueueAdmission
from latticaray.scheduler.policy import NodeView, PlacementRequest
from latticaray.scheduler.resources import Allocation, Normalized, normalize

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode

#: States a task may be retried from after a retryable exception: running here or on a peer,
#: not yet streamed (its consumer has the items) nor cancelled (states.py)
RETRYABLE = (TaskState.RUNNING, TaskState.REMOTE)


def submitter_of(client: Any) -> str:
    """Whom a task's place in the fair queue is kept for: the peer node that sent it, or the
    client of this node (a driver, a worker submitting nested tasks) that submitted it."""
    if client is None:
        return "node"
    if client.kind == "remote":
        return "node:" + client.node_id
    worker_id = getattr(client, "worker_id", None)
    if worker_id:
        return "worker:" + worker_id
    return f"{client.kind}:{id(client):x}"


class TaskTable:
    """The node's task records (by task id) and its queue of tasks ready to run here."""

    def __init__(self, node: RuntimeNode):
        self.node = node
        self.records: dict[bytes, TaskRecord] = {}
        #: tasks the node's LocalScheduler queued (waiting for resources), by task id (hex)
        self.queued: dict[str, TaskRecord] = {}
        #: tasks the LocalScheduler started (their resources are held), waiting for a worker
        self.started: collections.deque[TaskRecord] = collections.deque()
        #: what each started or running task holds (GPU ids), by task id (hex)
        self.allocations: dict[str, Allocation] = {}

    @property
    def scheduler(self) -> LocalScheduler:
        """The node's admission control and fair queue (scheduler/local.py), over the node's
        one ResourceLedger (the placement-group core's, so bundles and tasks share it)."""
        return self.node.resources.core.local

    @property
    def ready_queue(self) -> FairQueue:
        """Tasks waiting here for resources: per-submitter FIFOs served round-robin."""
        return self.node.resources.core.local.queue

    # ------------------------------------------------------------------ submission
    def submit(self, message: dict, client: Any) -> None:
        """A task submitted by a client of this node, or placed here by a remote owner."""
        node = self.node
        tid = message["tid"]
        if "blob" in message:
            node.code[message["fn"]] = message.pop("blob")
        rec = TaskRecord.for_task(message)
        rec.client = client
        self.records[tid] = rec
        node.activity.submitted(rec, client.kind != "remote")
        node.recovery.on_submit(rec, client)
        self.open_returns(rec, client, message["opts"].get("window"))
        refusal = node.submit_refusal() if client.kind != "remote" else None
        if refusal is not None:  # an observer's node: its clients submit nothing
            self.fail(rec, NotPermittedError(refusal))
            return
        parent = message.get("parent") or getattr(client, "current_task", None)
        if parent is not None:
            parent_rec = self.records.get(parent)
            if parent_rec is not None:
                if parent_rec.children is None:
                    parent_rec.children = []
                parent_rec.children.append(tid)
        self.resolve_args(rec, self.args_ready)

    def open_returns(self, rec: TaskRecord, client: Any, window: int | None = None) -> None:
        """Pending entries for a task's returns (or its stream), held by ``client``; the refs
        its arguments carry are held until it is done."""
        node = self.node
        tid = rec.tid
        refs = node.refs
        if rec.nret == STREAMING:
            node.streams.open(tid, window or DEFAULT_STREAM_WINDOW, client)
        else:
            entries = node.objects.entries
            for i in range(rec.nret):
                oid = object_id(tid, i)
                entries[oid] = ObjectEntry()
                refs.create(oid, client)
        message = rec.msg
        if client.kind != "remote" and ("inner" in message or message["args"][0] == "l"):
            refs.pin_task(tid, refcount.task_arg_refs(message))

    def resolve_args(self, rec: TaskRecord, then: Callable[[TaskRecord], Any]) -> None:
        """Resolve a task's top-level ref arguments, then ``then(rec)``; a failed one fails it."""
        self.resolve_ref_args(
            rec, lambda: rec.done or then(rec), lambda blob: self.fail_with_blob(rec, blob)
        )

    def resolve_ref_args(
        self,
        rec: TaskRecord | HostedActor,
        then: Callable[[], Any],
        fail: Callable[[bytes], Any],
    ) -> None:
        """Replace each top-level ref argument in ``rec.msg["args"]`` by its value (fetched,
        located or recovered from lineage as needed), pin the store values among them in
        ``rec.pins``, and call ``then()``, or ``fail(error blob)`` if an argument is an error."""
        args = rec.msg["args"]
        if args[0] == "b":
            then()
            return
        slots = [item for item in args[1] if item[0] == 1]
        slots += [item for item in args[2].values() if item[0] == 1]
        if not slots:
            then()
            return
        node = self.node
        objects = node.objects
        recovery = node.recovery
        rec.deps_left = len(slots)

        def resolve(item: list, entry: ObjectEntry) -> None:
            def on_ready() -> None:
                if entry.status == ERROR and rec.dep_error is None:
                    rec.dep_error = entry.data
                data = entry.data
                if (
                    data is not None
                    and data[:1] == b"\x00"
                    and serialization.is_store_ref(data)
                    and entry.holder is None
                ):
                    cid = serialization.store_name(data)
                    objects.pin(cid)  # the driver may drop its ref before we run
                    if rec.pins is None:
                        rec.pins = []
                    rec.pins.append(cid)
                item[:] = [0, data, item[1], item[2]]  # the owner: a borrowed value's source
                rec.deps_left -= 1
                if rec.deps_left == 0:
                    if rec.dep_error is not None:
                        fail(rec.dep_error)
                    else:
                        then()

            entry.on_ready(on_ready)

        def recover(item: list, oid: bytes, entry: ObjectEntry) -> None:
            async def ensure_local() -> None:
                try:
                    found = await recovery.ensure_local(oid, entry)
                except Exception as exc:  # a bug must not leave the task waiting forever
                    found = ObjectEntry(
                        ERROR,
                        error_blob(
                            ObjectLostError(f"recovering argument {oid.hex()} failed: {exc!r}")
                        ),
                    )
                resolve(item, found)

            node.spawn(ensure_local())

        for item in slots:
            oid, owner = item[1], item[2]
            entry = objects.entries.get(oid)
            if entry is not None:
                if entry.status == PENDING:  # its value may be elsewhere once sealed

                    def sealed(
                        item: list = item, oid: bytes = oid, entry: ObjectEntry = entry
                    ) -> None:
                        if recovery.is_lost(entry):
                            recover(item, oid, entry)
                        else:
                            resolve(item, entry)

                    entry.on_ready(sealed)
                elif recovery.is_lost(entry):
                    recover(item, oid, entry)
                else:
                    resolve(item, entry)
            else:

                async def locate(item: list = item, oid: bytes = oid, owner: str = owner) -> None:
                    resolve(item, await objects.locate(oid, owner))

                node.spawn(locate())

    # ------------------------------------------------------------------ placement and dispatch
    def args_ready(self, rec: TaskRecord) -> None:
        """Every top-level ref argument of a task is a value here: it is placed."""
        rec.move(TaskEvent.ARGS_READY)
        self.schedule(rec)

    def place_again(self, rec: TaskRecord) -> None:
        """Capacity appeared (a DHT ad, a new peer) for a task waiting for it."""
        rec.move(TaskEvent.CAPACITY)
        self.schedule(rec)

    def resume(self, rec: TaskRecord) -> None:
        """What a deferred task waited for (its placement group, its runtime_env's packages)
        is there: it is placed again, unless it ended meanwhile."""
        if not rec.done:
            self.place_again(rec)

    def fail_unless_done(self, rec: TaskRecord, exc: BaseException) -> None:
        if not rec.done:
            self.fail(rec, exc)

    def schedule(self, rec: TaskRecord) -> None:
        """Place a task (SCHEDULING): on a peer, or in this node's ready queue."""
        if rec.done:
            return
        node = self.node
        demand = rec.demand
        if not isinstance(demand, Normalized):  # once: the admission path reads it as is
            demand = rec.demand = normalize(demand)
        remote = node.remote
        opts = rec.msg["opts"]
        if opts.get("pg") and not opts.get("placed"):
            # a placement group's bundle decides where it runs
            target = node.resources.target(opts["pg"], lambda: self.resume(rec))
            if target is WAIT:
                rec.move(TaskEvent.DEFER)
                return
            if isinstance(target, BaseException):
                self.fail(rec, TaskUnschedulableError(rec.tid.hex(), str(target)))
                return
            if target != node.node_id and remote is not None:
                node.activity.placed(rec, target)
                remote.caller.run_remote(rec, target)
                return
        elif remote is not None and not opts.get("placed"):
            target = remote.placer.place_task(rec)
            if target is DEFERRED:
                rec.move(TaskEvent.DEFER)
                return
            if isinstance(target, BaseException):
                self.fail(rec, target)
                return
            if target is not None and target != node.node_id:
                node.activity.placed(rec, target)
                remote.caller.run_remote(rec, target)
                return
        if not node.ledger.could_ever_fit(demand):
            self.fail(
                rec,
                TaskUnschedulableError(
                    rec.tid.hex(),
                    f"no node can ever provide {dict(demand)} "
                    f"(this node has {node.total_resources})",
                ),
            )
            return
        if not node.envs.ready(
            opts.get("renv"), lambda: self.resume(rec), lambda exc: self.fail_unless_done(rec, exc)
        ):
            rec.move(TaskEvent.DEFER)  # its runtime_env's packages come here first
            return
        if node.recovery.fetch_args_first(rec):
            rec.move(TaskEvent.FETCH_ARGS)
            return  # an argument's only copy is on another node: it comes here first
        self.run_here(rec)

    def run_here(self, rec: TaskRecord) -> None:
        """Queue a task to run on this node (its placement is done)."""
        self.node.activity.placed(rec, None)
        rec.move(TaskEvent.QUEUE)
        self.admit(rec)
        self.dispatch()

    def admit(self, rec: TaskRecord) -> None:
        """Offer a task placed here to the node's LocalScheduler: it starts (its resources are
        taken; it waits for a worker), or queues fairly behind its submitter's earlier tasks.
        It was placed here for good (a peer's was admitted on arrival, executor.py), so a full
        queue does not reject it; a node that can never run it (its bundle is not here) fails
        it."""
        opts = rec.msg["opts"]
        pg = opts.get("pg")
        request = PlacementRequest(
            rec.tid.hex(),
            rec.demand,
            submitter_of(rec.client),
            bundle=(str(pg[0]), int(pg[1])) if pg else None,
        )
        admission = self.scheduler.offer(request, time.monotonic(), bounded=False)
        if admission.kind is AdmissionKind.STARTED:
            assert admission.allocation is not None
            self.allocations[admission.task_id] = admission.allocation
            self.started.append(rec)
        elif admission.kind is AdmissionKind.QUEUED:
            self.queued[admission.task_id] = rec
        else:
            self.fail(rec, TaskUnschedulableError(rec.tid.hex(), admission.reason))

    def refusal(self, client: Any, tid: bytes, opts: dict) -> NodeView | None:
        """Admission of a peer's task as it arrives: None when it may come in (resources are
        free for it, or its submitter's share of the bounded queue has room), else this node's
        fresh view, sent back with the rejection so the caller spills it elsewhere."""
        scheduler = self.scheduler
        request = PlacementRequest(tid.hex(), opts.get("res", {"CPU": 1.0}), submitter_of(client))
        if scheduler.has_room(request):
            return None
        return scheduler.view(time.monotonic())

    def started_by_scheduler(self, admissions: list[QueueAdmission]) -> None:
        """Queued tasks the LocalScheduler started (resources freed): they wait for a worker."""
        queued = self.queued
        for admission in admissions:
            rec = queued.pop(admission.task_id, None)
            if admission.allocation is not None:
                self.allocations[admission.task_id] = admission.allocation
            if rec is not None:
                self.started.append(rec)
            else:  # not a task of this table (it ended meanwhile): give it back
                self.release(admission.task_id)

    def dropped_by_scheduler(self, task_ids: tuple[str, ...], reason: str) -> None:
        """Queued tasks the LocalScheduler dropped (their placement group's bundle went away)."""
        for task_id in task_ids:
            rec = self.queued.pop(task_id, None)
            if rec is not None:
                self.fail(rec, TaskUnschedulableError(task_id, reason))

    def release(self, task_id: str) -> None:
        """A task here ended (or its worker died): its resources go back to the ledger and
        queued tasks that now fit start. Idempotent."""
        self.allocations.pop(task_id, None)
        started = self.scheduler.finish(task_id, time.monotonic())
        if started:
            self.started_by_scheduler(started)

    def lend(self, task_id: str) -> None:
        """The task's worker blocks in a `get`: its resources go to other work meanwhile."""
        started = self.scheduler.lend(task_id)
        if started:
            self.started_by_scheduler(started)

    def resources_freed(self) -> None:
        """Resources went back to the ledger outside the LocalScheduler (an actor's): queued
        tasks that now fit start, and go to workers."""
        started_now = self.scheduler.dispatch()
        if started_now:
            self.started_by_scheduler(started_now)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand the tasks the LocalScheduler started (their resources taken) to idle workers.
        (Queued tasks start as the scheduler's `finish`/`lend` free resources: `release`,
        `lend`; `resources_freed` after an actor's.)"""
        started = self.started
        node = self.node
        workers = node.workers
        idle = workers.idle
        while started:
            rec = started[0]
            if rec.done:  # cancelled or failed before a worker took it
                started.popleft()
                self.release(rec.tid.hex())
                continue
            if not idle:
                workers.grow(len(started))
                break
            started.popleft()
            worker = idle.pop()  # the most recently idle: warm caches
            self.run_on(worker, rec)
        remote = node.remote
        if remote is not None and remote.placer.waiting:
            remote.placer.capacity_changed()

    def run_on(self, worker: WorkerHandle, rec: TaskRecord) -> None:
        fn = rec.msg["fn"]
        out = {"op": "task", "fn": fn}
        if self.node.ledger.total.get("GPU"):
            allocation = self.allocations.get(rec.tid.hex())
            out["gpus"] = [] if allocation is None else allocation.gpu_ids
        opts = rec.msg["opts"]
        if opts.get("pg"):
            out["pg"] = opts["pg"]
        if opts.get("renv"):
            out["renv"] = self.node.envs.frame(opts["renv"])
        if fn not in worker.loaded:
            out["blob"] = self.node.code[fn]
            worker.loaded.add(fn)
        self.hand_to(worker, rec, out)

    def hand_to(self, worker: WorkerHandle, rec: TaskRecord, out: dict) -> None:
        """Send a task or actor call (``out``: its `task` or `actor_call` frame so far) to the
        worker that runs it."""
        rec.move(TaskEvent.DISPATCH)
        rec.worker = worker
        worker.tasks[rec.tid] = rec
        self.node.activity.started(rec)
        out["tid"] = rec.tid
        out["args"] = rec.msg["args"]
        out["nret"] = rec.nret
        out["name"] = rec.name
        if rec.nret == STREAMING:
            stream = self.node.streams.states[rec.tid]
            stream.worker = worker
            out["window"] = stream.window
        worker.send(out)

    # ------------------------------------------------------------------ results
    def on_done(self, worker: WorkerHandle, message: dict) -> None:
        """A worker's `done` for a task or actor call it ran."""
        tid = message["tid"]
        rec = worker.tasks.pop(tid, None)
        if rec is None:
            return
        node = self.node
        if worker.is_actor:
            actor = worker.actor
            if actor is not None:
                actor.inflight.pop(tid, None)
        else:
            self.release(tid.hex())
            if worker.alive:
                node.workers.idle.append(worker)
        err = message.get("err")
        if (
            err is not None
            and not message.get("cancelled")
            and not rec.cancelled
            and self.should_retry(rec, message.get("mro", []))
        ):
            rec.retries_left -= 1
            rec.move(TaskEvent.RETRY)
            node.stats["retries"] += 1
            node.activity.retried(rec)
            if rec.actor is None:
                self.admit(rec)
            else:
                node.actors.send_call(rec.actor, rec)
            self.dispatch()
            return
        self.complete(rec, message)
        if not worker.is_actor:
            self.dispatch()

    def complete(self, rec: TaskRecord, message: dict) -> None:
        """Seal a task's results (local worker reply or remote node reply)."""
        node = self.node
        objects = node.objects
        err = message.get("err")
        tid = rec.tid
        if rec.nret == STREAMING:
            node.streams.finish(tid, err)
        elif err is not None:
            for i in range(rec.nret):
                objects.seal(object_id(tid, i), ERROR, err)
        else:
            inner = message.get("inner")
            for i, data in enumerate(message["vals"]):
                if inner and inner[i]:  # counted before the seal, which may free the result
                    node.refs.contain(object_id(tid, i), inner[i])
                objects.seal(object_id(tid, i), OK, data)
        if rec.actor is None and "aid" not in rec.msg:
            node.recovery.on_complete(rec, err is not None)
        rec.move(TaskEvent.COMPLETE if err is None else TaskEvent.FAIL)
        self.records.pop(tid, None)
        if rec.worker is None and rec.actor is None and (self.queued or self.allocations):
            key = tid.hex()
            if self.queued.pop(key, None) is not None:  # it ended while queued here
                self.scheduler.cancel(key, time.monotonic())
            elif key in self.allocations:  # started, no worker took it yet: resources back
                self.release(key)
                self.dispatch()
        client = rec.client
        node.activity.ended(
            rec,
            err is not None,
            (message.get("mro") or [None])[0] if err is not None else None,
            client.node_id if client is not None and client.kind == "remote" else node.node_id,
        )
        if tid in node.refs.task_pins:
            node.refs.task_done(tid)
        if "held_by" in message:  # refs inside remote results are counted here now
            assert node.remote is not None
            node.remote.refs.ack_held(message["held_by"], tid)
        if rec.pins:
            pins, rec.pins = rec.pins, None
            for cid in pins:
                objects.unpin(cid)
        notify = getattr(rec.client, "on_task_complete", None)
        if notify is not None:
            notify(rec, message)

    def should_retry(self, rec: TaskRecord, mro: list[str]) -> bool:
        """Whether an exception (its class's MRO names) is one the task retries on. A stream
        that yielded is not run again (its consumer has its items), nor a cancelled task."""
        retry = rec.retry_exc
        if not retry or rec.retries_left == 0 or rec.state not in RETRYABLE:
            return False
        if retry is True:
            return True
        return any(name in retry for name in mro)

    def fail(self, rec: TaskRecord, exc: BaseException) -> None:
        self.fail_with_blob(rec, error_blob(exc))

    def fail_with_blob(self, rec: TaskRecord, blob: bytes | None) -> None:
        if rec.done:
            return
        self.complete(rec, {"err": blob})

    def runner_lost(
        self,
        rec: TaskRecord,
        mid_stream: BaseException,
        no_retries: BaseException,
        stats: collections.Counter | None = None,
    ) -> bool:
        """The worker or node running a task died: True if it may run again (a retry is
        spent, counted in ``stats``), else it failed (cancelled; a stream that yielded; no
        retries left)."""
        if rec.cancelled:
            self.fail(rec, TaskCancelledError(f"task {rec.name} was cancelled"))
        elif self.node.streams.started(rec):
            self.fail(rec, mid_stream)
        elif rec.retries_left != 0:
            rec.retries_left -= 1
            rec.move(TaskEvent.RETRY)
            (self.node.stats if stats is None else stats)["retries"] += 1
            self.node.activity.retried(rec)
            return True
        else:
            self.fail(rec, no_retries)
        return False

    # ------------------------------------------------------------------ cancel
    def cancel(self, message: dict, client: Any) -> None:
        self.cancel_task(
            task_of(message["oid"]), message.get("force", False), message.get("recursive", True)
        )

    def cancel_task(self, tid: bytes, force: bool, recursive: bool) -> None:
        rec = self.records.get(tid)
        if rec is None or rec.done:
            return
        if recursive and rec.children:
            for child in rec.children:
                self.cancel_task(child, force, recursive)
        worker = rec.worker
        remote = self.node.remote
        if rec.remote_peer is not None and remote is not None:
            rec.move(TaskEvent.CANCEL)
            remote.caller.cancel_remote(rec, force)
            return
        if worker is None:
            if rec.actor is not None:
                try:
                    rec.actor.outbox.remove(rec)
                except ValueError:
                    pass
            self.fail(rec, TaskCancelledError(f"task {rec.name} was cancelled before it ran"))
            return
        rec.move(TaskEvent.CANCEL)
        if force and not worker.is_actor:
            worker.kill()
        else:
            worker.send({"op": "cancel", "tid": tid})
            if not worker.is_actor:
                worker.interrupt()
