"""RuntimeNode: one node's side of tasks and actors (asyncio; owns the worker processes).

A node accepts client operations (from its driver thread and from its workers, see core.py),
keeps the table of objects it owns, resolves task arguments, accounts resources with the
scheduler's ResourceLedger, runs tasks on a pool of worker processes, hosts actors on dedicated
worker processes, retries tasks whose worker died, restarts actors, and streams generator items
with backpressure. Placement on other peers of the mesh goes through `self.cluster` (cluster.py)
when the node is part of a mesh.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from latticaray.runtime import refcount, serialization
from latticaray.runtime.errors import (
    ActorDiedError,
    ActorNameTakenError,
    ObjectLostError,
    ObjectNotFoundError,
    TaskCancelledError,
    TaskUnschedulableError,
    WorkerCrashedError,
)
from latticaray.runtime.ids import object_id, task_of
from latticaray.runtime.lineage import Recovery
from latticaray.runtime.placement import DEFERRED
from latticaray.runtime.protocol import ERROR, OK, STREAMING, ChannelClosed, pack, read_frame
from latticaray.scheduler.errors import InsufficientResources
from latticaray.scheduler.resources import ResourceLedger, normalize

PENDING = -1
DEFAULT_STREAM_WINDOW = 16


def error_blob(exc: BaseException) -> bytes:
    return serialization.dumps_code(exc)


class ObjectEntry:
    """One object the node owns or holds: pending until its producer seals it."""

    __slots__ = ("cid", "data", "holder", "released", "status", "waiters")

    def __init__(self, status: int = PENDING, data: bytes | None = None):
        self.status = status
        self.data = data
        self.cid: str | None = None
        self.waiters: list | None = None
        self.released = False
        self.holder: str | None = None

    def seal(self, status: int, data: bytes) -> None:
        self.status = status
        self.data = data
        waiters, self.waiters = self.waiters, None
        if waiters:
            for callback in waiters:
                callback()

    def on_ready(self, callback) -> None:
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
            self.on_ready(lambda: ready.done() or ready.set_result(None))
            await ready


class TaskRecord:
    """A task or actor call owned by this node, from submission to its last result."""

    __slots__ = (
        "actor",
        "cancelled",
        "children",
        "client",
        "demand",
        "dep_error",
        "deps_left",
        "done",
        "excluded",
        "msg",
        "name",
        "nret",
        "pins",
        "remote_peer",
        "retries_left",
        "retry_exc",
        "tid",
        "worker",
    )

    def __init__(
        self,
        tid: bytes,
        msg: dict,
        nret: int,
        retries_left: int,
        retry_exc,
        demand: dict,
        name: str,
        actor=None,
    ):
        self.tid = tid
        self.msg = msg
        self.nret = nret
        self.retries_left = retries_left
        self.retry_exc = retry_exc
        self.demand = demand
        self.deps_left = 0
        self.worker = None
        self.cancelled = False
        self.children: list[bytes] | None = None
        self.actor = actor
        self.name = name
        self.done = False
        self.remote_peer: str | None = None
        self.client = None
        self.dep_error: bytes | None = None
        self.excluded: set[str] | None = None
        self.pins: list[str] | None = None  # store objects its arguments need until it is done


class StreamState:
    """Items a streaming task has produced, what the consumer took, and who waits for more."""

    __slots__ = ("consumed", "count", "finished", "waiters", "window", "worker")

    def __init__(self, window: int):
        self.count = 0
        self.finished = False
        self.consumed = 0
        self.waiters: list = []
        self.worker = None
        self.window = window

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for callback in waiters:
            callback()


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

    def __init__(self, worker_id: str, proc: subprocess.Popen, writer, is_actor: bool):
        self.worker_id = worker_id
        self.proc = proc
        self.writer = writer
        self.is_actor = is_actor
        self.ready = False
        self.alive = True
        self.tasks: dict[bytes, TaskRecord] = {}
        self.loaded: set[bytes] = set()
        self.blocked = 0
        self.actor = None
        self._early: list[bytes] = []
        refcount.track_holds(self)

    def send(self, message: dict) -> None:
        if not self.alive:
            return
        if self.writer is None:
            self._early.append(pack(message))
        else:
            self.writer.write(pack(message))

    def attach(self, writer) -> None:
        self.writer = writer
        for frame in self._early:
            writer.write(frame)
        self._early.clear()

    @property
    def current_task(self):
        return next(iter(self.tasks), None)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class AttachedDriver:
    """A driver process attached over the node's Unix socket (`init(address=...)`)."""

    kind = "driver"
    is_actor = False
    current_task = None

    def __init__(self, writer):
        self.writer = writer
        self.alive = True
        self.tasks: dict = {}
        self.blocked = 0
        refcount.track_holds(self)

    def send(self, message: dict) -> None:
        if self.alive:
            self.writer.write(pack(message))


class ActorRecord:
    """An actor hosted on this node."""

    def __init__(self, aid: bytes, msg: dict, opts: dict):
        self.aid = aid
        self.msg = msg
        self.opts = opts
        self.name = opts.get("name")
        self.namespace = opts.get("namespace") or "default"
        self.max_restarts = int(opts.get("max_restarts", 0))
        self.restarts = 0
        self.state = "PENDING"
        # argument resolution, as a TaskRecord's; its store values stay pinned until the
        # constructor ran, or while the actor may restart
        self.deps_left = 0
        self.dep_error: bytes | None = None
        self.pins: list[str] = []
        self.worker: WorkerHandle | None = None
        self.outbox: collections.deque[TaskRecord] = collections.deque()
        self.inflight: dict[bytes, TaskRecord] = {}
        self.no_restart = False
        self.death_cause = ""
        self.demand = normalize(opts.get("resources") or {})


class RuntimeNode:
    """The runtime half of a node: objects, tasks, actors and the worker pool."""

    def __init__(
        self,
        node_id: str,
        resources: dict[str, float],
        *,
        max_workers: int | None = None,
        worker_env: dict[str, str] | None = None,
        prestart: int | None = None,
        store=None,
        store_capacity: int | None = None,
    ):
        self.node_id = node_id
        self.ledger = ResourceLedger(resources)
        self.total_resources = self.ledger.total
        cpus = self.total_resources.get("CPU", 0.0)
        self.max_active_workers = max_workers or max(1, int(cpus) or 1)
        self.prestart = self.max_active_workers if prestart is None else prestart
        self.worker_env = dict(worker_env or {})
        self.store = store
        self.store_capacity = store_capacity
        self._own_store = False
        self.store_ready = None
        self.store_refs: collections.Counter = collections.Counter()  # by store name
        self.on_cid_known = None  # called with a store object's CID once it is exposed (DHT)
        self.sent_by_cid: dict[str, list[str]] = {}  # CID -> local names awaiting "fetched"
        self._hashing: dict[str, asyncio.Future] = {}  # local name -> its resolution under way
        self.objects: dict[bytes, ObjectEntry] = {}
        self.cid_index: dict[str, bytes] = {}
        self.code: dict[bytes, bytes] = {}
        self.tasks: dict[bytes, TaskRecord] = {}
        self.ready_queue: collections.deque[TaskRecord] = collections.deque()
        self.task_workers: list[WorkerHandle] = []
        self.idle_workers: collections.deque[WorkerHandle] = collections.deque()
        self.starting_workers = 0
        self.actors: dict[bytes, ActorRecord] = {}
        self.named_actors: dict[tuple[str, str], bytes] = {}
        self.streams: dict[bytes, StreamState] = {}
        self.cluster = None  # cluster.MeshCluster when this node is part of a mesh
        self.recovery = Recovery(self)  # lineage of owned returns; lost-object recovery
        self.loop: asyncio.AbstractEventLoop | None = None
        self._worker_seq = 0
        self._local_client = LocalClient(node_id)
        self._stopping = False
        self._reader_tasks: set[asyncio.Task] = set()
        self.stats = collections.Counter()
        self.seal_count = 0  # the driver's wait() sleeps on seal_cond until this moves
        self.seal_waiters = 0
        self.seal_cond = threading.Condition()
        self.refs = refcount.RefTable(self)
        self._post_handlers = {
            "submit": self._on_submit,
            "actor_call": self._on_actor_call,
            "put": self._on_put_counted,
            "contain": self._on_contain,
            "release": self._on_release_counted,
            "create_actor": self._on_create_actor_post,
            "kill": self._on_kill,
            "cancel": self._on_cancel,
            "borrow": self._on_borrow,
            "stream_drop": self._on_stream_drop,
        }

    # ------------------------------------------------------------------ lifecycle
    def local_client(self) -> LocalClient:
        return self._local_client

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.store is None:
            # created off the loop (it imports pyarrow): init() returns before it is ready, and
            # until then large values simply travel inline
            root = os.path.join(
                "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp",
                f"latticaray-{os.getuid()}",
                f"store-{os.getpid()}-{os.urandom(3).hex()}",
            )
            self.worker_env[serialization.STORE_ROOT_ENV] = root
            self._own_store = True
            self.store_ready = self.loop.run_in_executor(None, self._create_store, root)
        else:
            serialization.set_store(self.store)
            self.worker_env[serialization.STORE_ROOT_ENV] = self.store.root
        for _ in range(self.prestart):
            self._spawn_task_worker()

    async def stop(self) -> None:
        self._stopping = True
        workers = list(self.task_workers) + [a.worker for a in self.actors.values() if a.worker]
        for worker in workers:
            worker.alive = False
            worker.kill()
        deadline = time.monotonic() + 5.0
        for worker in workers:
            # a child's exit is not an asyncio event here (Popen): poll, bounded by the deadline
            while worker.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            try:
                if worker.writer is not None:
                    worker.writer.close()
            except Exception:
                pass
        server = getattr(self, "_driver_server", None)
        if server is not None:
            server.close()
        for task in list(self._reader_tasks):
            task.cancel()
        if self._reader_tasks:
            await asyncio.gather(*self._reader_tasks, return_exceptions=True)
        if self._own_store:
            try:
                await asyncio.wait_for(asyncio.shield(self.store_ready), 30)
            except Exception:
                pass  # the store never came up: nothing of it to remove beyond its directory
            import shutil

            shutil.rmtree(self.worker_env[serialization.STORE_ROOT_ENV], ignore_errors=True)
            if self.store is not None:
                shutil.rmtree(self.store.spill_dir, ignore_errors=True)
            serialization.set_store(None)

    async def listen_for_drivers(self, path: str) -> str:
        """Accept drivers on a Unix socket (owner-only permissions); returns its path."""
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)

        async def on_driver(reader, writer):
            driver = AttachedDriver(writer)
            driver.send(
                {
                    "op": "welcome",
                    "node_id": self.node_id,
                    "store": self.worker_env.get(serialization.STORE_ROOT_ENV),
                }
            )
            try:
                while True:
                    message = await read_frame(reader)
                    if "rid" in message:
                        self.loop.create_task(self._serve_worker_request(driver, message))
                    else:
                        self.handle_post(message, driver)
            except (ChannelClosed, ConnectionError, asyncio.CancelledError):
                pass
            driver.alive = False
            writer.close()
            if not self._stopping:
                self._client_gone(driver)

        self._driver_server = await asyncio.start_unix_server(on_driver, path=path, limit=1 << 20)
        os.chmod(path, 0o600)
        return path

    def _create_store(self, root: str) -> None:
        from latticaray.objectstore.cid import BLAKE3, SHA2_256, blake3_available
        from latticaray.objectstore.store import LocalStore

        # BLAKE3 hashes large objects on several cores: puts run about twice as fast as SHA-256
        store = LocalStore(
            root=root,
            capacity_bytes=self.store_capacity,
            hash_code=BLAKE3 if blake3_available() else SHA2_256,
        )
        self.store = store
        serialization.set_store(store)

    def worker_pids(self) -> list[int]:
        workers = list(self.task_workers) + [a.worker for a in self.actors.values() if a.worker]
        return [w.proc.pid for w in workers if w.alive]

    # ------------------------------------------------------------------ worker processes
    def _spawn_worker(self, is_actor: bool) -> WorkerHandle:
        self._worker_seq += 1
        worker_id = f"{self.node_id[-8:]}-w{self._worker_seq}"
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env.update(self.worker_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "latticaray.runtime.worker",
                str(child_sock.fileno()),
                self.node_id,
                worker_id,
            ],
            pass_fds=(child_sock.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        child_sock.close()
        parent_sock.setblocking(False)
        worker = WorkerHandle(worker_id, proc, None, is_actor)
        task = self.loop.create_task(self._connect_worker(worker, parent_sock))
        self._reader_tasks.add(task)
        task.add_done_callback(self._reader_tasks.discard)
        return worker

    async def _connect_worker(self, worker: WorkerHandle, sock: socket.socket) -> None:
        reader = asyncio.StreamReader(limit=1 << 20, loop=self.loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self.loop)
        transport, _ = await self.loop.connect_accepted_socket(lambda: protocol, sock=sock)
        worker.attach(asyncio.StreamWriter(transport, protocol, reader, self.loop))
        await self._read_worker(worker, reader)

    def _spawn_task_worker(self) -> None:
        worker = self._spawn_worker(is_actor=False)
        self.task_workers.append(worker)
        self.starting_workers += 1

    async def _read_worker(self, worker: WorkerHandle, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await read_frame(reader)
                self._on_worker_message(worker, message)
        except (ChannelClosed, ConnectionError):
            pass
        except asyncio.CancelledError:
            return
        self._on_worker_died(worker)

    def _on_worker_message(self, worker: WorkerHandle, message: dict) -> None:
        op = message["op"]
        if op == "done":
            self._on_done(worker, message)
        elif op == "yield":
            self._on_yield(message)
        elif op == "hello":
            worker.ready = True
            if not worker.is_actor:
                self.starting_workers -= 1
                self.idle_workers.append(worker)
                self._dispatch()
        elif op == "actor_ready":
            self._on_actor_ready(worker, message)
        elif "rid" in message:
            self.loop.create_task(self._serve_worker_request(worker, message))
        else:
            self.handle_post(message, worker)

    async def _serve_worker_request(self, worker: WorkerHandle, message: dict) -> None:
        blocking = message["op"] in ("get", "wait", "stream_next")
        released = None
        if blocking and not worker.is_actor and not self._request_ready(message):
            released = self._block_worker(worker)
        try:
            reply = await self.handle_request(message, worker)
        except Exception as exc:  # a bug must not kill the node: report it to the worker
            reply = {"error": error_blob(RuntimeError(f"node failed to serve request: {exc!r}"))}
        finally:
            if released:
                worker.blocked -= 1
        reply["op"] = "reply"
        reply["rid"] = message["rid"]
        worker.send(reply)

    def _request_ready(self, message: dict) -> bool:
        if message["op"] != "get":
            return False
        objects = self.objects
        for oid, _owner in message["oids"]:
            entry = objects.get(oid)
            if entry is None or entry.status == PENDING:
                return False
        return True

    def _block_worker(self, worker: WorkerHandle) -> bool:
        """A task worker waits on objects: lend its CPU to other tasks meanwhile (as Ray does)."""
        worker.blocked += 1
        for tid in worker.tasks:
            self.ledger.release(tid.hex())
        self._dispatch()
        return True

    def _on_worker_died(self, worker: WorkerHandle) -> None:
        if not worker.alive and self._stopping:
            return
        worker.alive = False
        worker.kill()
        try:
            worker.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if self._stopping:
            return
        self.stats["worker_deaths"] += 1
        self.refs.client_gone(worker)
        if worker.is_actor:
            actor = worker.actor
            if actor is not None and actor.worker is worker:
                self._on_actor_worker_died(actor)
            return
        if worker in self.task_workers:
            self.task_workers.remove(worker)
        if not worker.ready:
            self.starting_workers -= 1
        try:
            self.idle_workers.remove(worker)
        except ValueError:
            pass
        for tid, rec in list(worker.tasks.items()):
            self.ledger.release(tid.hex())
            rec.worker = None
            if rec.cancelled:
                self._fail(rec, TaskCancelledError(f"task {rec.name} was cancelled"))
            elif self._stream_started(rec):
                self._fail(
                    rec,
                    WorkerCrashedError(
                        f"worker running streaming task {rec.name} died after it produced items"
                    ),
                )
            elif rec.retries_left != 0:
                rec.retries_left -= 1
                self.stats["retries"] += 1
                self.ready_queue.appendleft(rec)
            else:
                self._fail(
                    rec,
                    WorkerCrashedError(
                        f"worker {worker.worker_id} running task {rec.name} died "
                        f"(exit code {worker.proc.returncode}) and no retries are left"
                    ),
                )
        worker.tasks.clear()
        self._dispatch()

    def _stream_started(self, rec: TaskRecord) -> bool:
        stream = self.streams.get(rec.tid)
        return stream is not None and stream.count > 0

    # ------------------------------------------------------------------ client ops
    def handle_post(self, message: dict, client) -> None:
        handler = self._post_handlers.get(message["op"])
        if handler is None:
            return
        handler(message, client)

    async def handle_request(self, message: dict, client) -> dict:
        op = message["op"]
        if op == "get":
            return await self._req_get(message)
        if op == "wait":
            return await self._req_wait(message)
        if op == "stream_next":
            return await self._req_stream_next(message, client)
        if op == "cid":
            return await self._req_cid(message)
        if op == "get_cid":
            return await self._req_get_cid(message)
        if op == "create_actor":
            return await self._create_actor_request(message, client)
        if op == "get_actor":
            return await self._req_get_actor(message)
        if op == "nodes":
            return {"nodes": self.nodes()}
        return {"error": error_blob(ValueError(f"unknown runtime request {op!r}"))}

    def ready_entries(self, oids: list[bytes]):
        """Called from the driver thread: (status, data) of each if all are sealed, else None."""
        objects = self.objects
        out = []
        for oid in oids:
            entry = objects.get(oid)
            if entry is None or entry.status == PENDING or entry.holder is not None:
                return None
            out.append((entry.status, entry.data))
        return out

    # ---- objects
    def _on_put(self, message: dict, client) -> None:
        data = message["d"]
        entry = ObjectEntry(OK, data)
        self.objects[message["oid"]] = entry
        if data[:1] == b"\x00" and serialization.is_store_ref(data):
            self.store_refs[serialization.store_name(data)] += 1

    def _on_put_counted(self, message: dict, client) -> None:
        self._on_put(message, client)
        self.refs.create(message["oid"], client)

    def _on_contain(self, message: dict, client) -> None:
        """Refs pickled inside a put object: they live as long as it does."""
        self.refs.contain(message["oid"], message["inner"])

    def _on_release(self, message: dict, client) -> None:
        objects = self.objects
        for oid in message["oids"]:
            self.recovery.on_release(oid)
            entry = objects.get(oid)
            if entry is None:
                continue
            if entry.status == PENDING or entry.waiters:
                entry.released = True
                continue
            del objects[oid]
            self._forget(entry)

    def _on_release_counted(self, message: dict, client) -> None:
        """A process dropped its last ref to these: objects nothing else holds are freed (by
        `_on_release`, which drops them once sealed)."""
        self.refs.release(message["oids"], client)

    def _on_borrow(self, message: dict, client) -> None:
        hold = self.refs.hold
        for oid, owner in message["refs"]:
            hold(oid, owner or self.node_id, client)

    def _client_gone(self, client) -> None:
        """An attached driver disconnected: its refs are released, its actors end with it."""
        self.refs.client_gone(client)
        for aid in getattr(client, "owned_actors", ()):
            self._on_kill({"aid": aid, "no_restart": True}, None)

    def _forget(self, entry: ObjectEntry) -> None:
        if entry.cid is not None:
            self.cid_index.pop(entry.cid, None)
        data = entry.data
        if data is not None and data[:1] == b"\x00" and serialization.is_store_ref(data):
            if entry.holder is not None:  # the only copy is on the node that made it
                if self.cluster is not None:
                    self.cluster.unpin_at(entry.holder, [serialization.store_name(data)])
                return
            self._unpin(serialization.store_name(data))

    def _unpin(self, cid: str) -> None:
        self.store_refs[cid] -= 1
        if self.store_refs[cid] <= 0:
            del self.store_refs[cid]
            try:
                self.store.delete(cid)
            except Exception:
                pass  # already evicted or deleted: nothing to free

    def _seal(self, oid: bytes, status: int, data: bytes) -> None:
        entry = self.objects.get(oid)
        if entry is None:
            entry = self.objects[oid] = ObjectEntry()
        if entry.status != PENDING:
            return
        entry.seal(status, data)
        self.seal_count += 1
        if self.seal_waiters:
            with self.seal_cond:
                self.seal_cond.notify_all()
        if (
            data is not None
            and data[:1] == b"\x00"
            and serialization.is_store_ref(data)
            and entry.holder is None
        ):
            self.store_refs[serialization.store_name(data)] += 1
        if entry.released:
            self.objects.pop(oid, None)
            self._forget(entry)
            self.refs.drop_contents(oid)

    async def _entries_for(self, oids: list, timeout: float | None, k: int | None = None):
        """Wait until k (default all) of the objects are sealed; returns their entries."""
        entries = []
        for oid, owner in oids:
            entry = self.objects.get(oid)
            if entry is None:
                entry = await self._locate(oid, owner)
            entries.append(entry)
        need = len(entries) if k is None else min(k, len(entries))
        pending = [e for e in entries if e.status == PENDING]
        if len(entries) - len(pending) >= need:
            return entries
        future = self.loop.create_future()
        remaining = [need - (len(entries) - len(pending))]

        def one_ready():
            remaining[0] -= 1
            if remaining[0] <= 0 and not future.done():
                future.set_result(None)

        for entry in pending:
            entry.on_ready(one_ready)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        return entries

    async def _locate(self, oid: bytes, owner: str) -> ObjectEntry:
        if self.cluster is not None and owner and owner != self.node_id:
            return await self.cluster.fetch_object(oid, owner)
        entry = ObjectEntry()
        entry.seal(
            ERROR,
            error_blob(
                ObjectLostError(
                    f"object {oid.hex()} is not known to its owner node {owner[:16] or self.node_id[:16]} "
                    f"(released or never created)"
                )
            ),
        )
        return entry

    async def _req_get(self, message: dict) -> dict:
        timeout = message.get("timeout")
        deadline = None if timeout is None else self.loop.time() + timeout
        entries = await self._entries_for(message["oids"], timeout)
        if entries is None:
            return {"timeout": True}
        recovery = self.recovery
        for i, (oid, _owner) in enumerate(message["oids"]):
            entry = entries[i]
            if self.objects.get(oid) is entry and recovery.is_missing(entry):
                left = None if deadline is None else max(0.0, deadline - self.loop.time())
                try:
                    entries[i] = await asyncio.wait_for(recovery.ensure_local(oid, entry), left)
                except TimeoutError:  # a re-execution it started goes on
                    return {"timeout": True}
        return {"vals": [(e.status, e.data) for e in entries]}

    async def _req_wait(self, message: dict) -> dict:
        oids = message["oids"]
        entries = await self._entries_for(oids, message.get("timeout"), message["k"])
        if entries is None:
            entries = [self.objects.get(oid) for oid, _ in oids]
        ready = [i for i, e in enumerate(entries) if e is not None and e.status != PENDING]
        return {"ready": ready[: message["k"]]}

    def cid_for(self, oid: bytes, entry: ObjectEntry) -> str:
        if entry.cid is None:
            entry.cid = serialization.cid_of(entry.data)  # hashes a local put, once
            self.cid_index[entry.cid] = oid
            if self.on_cid_known is not None and serialization.is_store_ref(entry.data):
                self.on_cid_known(entry.cid)
        return entry.cid

    def portable(self, data: bytes, awaiting_fetch: bool = False) -> bytes:
        """A store reference about to leave this node, named by CID (hashing a local put now;
        the CID is announced). ``awaiting_fetch``: the receiver answers "fetched" with the CID,
        which ``name_fetched`` maps back to the name our pin count uses."""
        out = serialization.portable(data)
        if out is not data:
            cid = serialization.store_name(out)
            if awaiting_fetch:
                self.sent_by_cid.setdefault(cid, []).append(serialization.store_name(data))
            if self.on_cid_known is not None:
                self.on_cid_known(cid)
        return out

    def cid_pending(self, data) -> bool:
        """Whether naming ``data`` by CID would hash: a store reference under a local name
        whose object is not linked to its CID yet."""
        if (
            not serialization.is_store_ref(data)
            or serialization.store_name(data)[:1] == "b"
            or self.store is None
        ):
            return False
        try:
            return self.store.cid_if_resolved(serialization.store_name(data)) is None
        except Exception:
            return False  # not a name the store knows: ``portable`` reports it as before

    async def resolve_off_loop(self, data) -> None:
        """Hash the local put ``data`` refers to (if it is not linked yet) on an executor
        thread; one resolution per object, shared by every caller waiting for it. Raises what
        the store raises (ObjectNotFound: the object was deleted meanwhile)."""
        if not self.cid_pending(data):
            return
        name = serialization.store_name(data)
        future = self._hashing.get(name)
        if future is None:
            future = self.loop.run_in_executor(None, serialization.store_cid, data)
            self._hashing[name] = future
            future.add_done_callback(  # its error is read by the callers; mark it seen
                lambda f: (self._hashing.pop(name, None), f.cancelled() or f.exception())
            )
        await asyncio.shield(future)

    async def portable_async(self, data: bytes, awaiting_fetch: bool = False) -> bytes:
        """``portable`` with the hashing (if any) done off the event loop."""
        await self.resolve_off_loop(data)
        return self.portable(data, awaiting_fetch)

    def name_fetched(self, cid: str) -> str:
        names = self.sent_by_cid.get(cid)
        if not names:
            return cid
        name = names.pop()
        if not names:
            del self.sent_by_cid[cid]
        return name

    async def _req_cid(self, message: dict) -> dict:
        oid = message["oid"]
        entries = await self._entries_for([(oid, message.get("owner", ""))], None)
        entry = entries[0]
        if entry.status == ERROR and entry.cid is None and entry.data is not None:
            # an object that failed still has a CID: its error is what it holds
            pass
        if entry.cid is None:
            await self.resolve_off_loop(entry.data)  # cid_for then finds it linked
        return {"cid": self.cid_for(oid, entry)}

    async def _req_get_cid(self, message: dict) -> dict:
        cid = message["cid"]
        oid = self.cid_index.get(cid)
        entry = self.objects.get(oid) if oid is not None else None
        if entry is not None and entry.status != PENDING:
            if self.recovery.is_missing(entry):
                entry = await self.recovery.ensure_local(oid, entry)
            return {"val": (entry.status, entry.data)}
        if self.store is not None and cid.startswith("bafy"):
            try:
                if self.store.contains(cid):
                    return {"val": (OK, serialization.STORE_MAGIC + cid.encode("ascii"))}
            except Exception:
                pass  # not a CID the store understands: ask the mesh
        if self.cluster is not None:
            found = await self.cluster.fetch_by_cid(cid, message.get("timeout"))
            if found is not None:
                return {"val": found}
        return {"error": error_blob(ObjectNotFoundError(f"no peer of the mesh holds {cid}"))}

    # ---- tasks
    def _on_submit(self, message: dict, client) -> None:
        tid = message["tid"]
        opts = message["opts"]
        if "blob" in message:
            self.code[message["fn"]] = message.pop("blob")
        nret = message["nret"]
        rec = TaskRecord(
            tid,
            message,
            nret,
            opts.get("max_retries", 3),
            opts.get("retry_exc"),
            opts.get("res") or {"CPU": 1.0},
            message.get("name", "task"),
        )
        rec.client = client
        self.tasks[tid] = rec
        self.recovery.on_submit(rec, client)
        objects = self.objects
        refs = self.refs
        if nret == STREAMING:
            self.streams[tid] = StreamState(opts.get("window") or DEFAULT_STREAM_WINDOW)
            refs.open_stream(tid, client)
        else:
            for i in range(nret):
                oid = object_id(tid, i)
                objects[oid] = ObjectEntry()
                refs.create(oid, client)
        if client.kind != "remote" and ("inner" in message or message["args"][0] == "l"):
            refs.pin_task(tid, refcount.task_arg_refs(message))
        parent = message.get("parent") or getattr(client, "current_task", None)
        if parent is not None:
            parent_rec = self.tasks.get(parent)
            if parent_rec is not None:
                if parent_rec.children is None:
                    parent_rec.children = []
                parent_rec.children.append(tid)
        self._resolve_args(rec, self._schedule)

    def _resolve_args(self, rec: TaskRecord, then) -> None:
        """Resolve a task's top-level ref arguments, then ``then(rec)``; a failed one fails it."""
        self._resolve_ref_args(
            rec, lambda: rec.done or then(rec), lambda blob: self._fail_with_blob(rec, blob)
        )

    def _resolve_ref_args(self, rec: TaskRecord | ActorRecord, then, fail) -> None:
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
        rec.deps_left = len(slots)

        def resolve(item, entry):
            def on_ready():
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
                    self.store_refs[cid] += 1  # the driver may drop its ref before we run
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

        def recover(item, oid, entry):
            async def ensure_local():
                try:
                    found = await self.recovery.ensure_local(oid, entry)
                except Exception as exc:  # a bug must not leave the task waiting forever
                    found = ObjectEntry(
                        ERROR,
                        error_blob(
                            ObjectLostError(f"recovering argument {oid.hex()} failed: {exc!r}")
                        ),
                    )
                resolve(item, found)

            self.loop.create_task(ensure_local())

        for item in slots:
            oid, owner = item[1], item[2]
            entry = self.objects.get(oid)
            if entry is not None:
                if entry.status == PENDING:  # its value may be elsewhere once sealed
                    entry.on_ready(
                        lambda item=item, oid=oid, entry=entry: (
                            recover(item, oid, entry)
                            if self.recovery.is_lost(entry)
                            else resolve(item, entry)
                        )
                    )
                elif self.recovery.is_lost(entry):
                    recover(item, oid, entry)
                else:
                    resolve(item, entry)
            else:

                async def locate(item=item, oid=oid, owner=owner):
                    resolve(item, await self._locate(oid, owner))

                self.loop.create_task(locate())

    def _schedule(self, rec: TaskRecord) -> None:
        if rec.done:
            return
        demand = rec.demand
        if self.cluster is not None and not rec.msg["opts"].get("placed"):
            target = self.cluster.place_task(rec)
            if target is DEFERRED:
                return
            if isinstance(target, BaseException):
                self._fail(rec, target)
                return
            if target is not None and target != self.node_id:
                self.cluster.run_remote(rec, target)
                return
        if not self.ledger.could_ever_fit(demand):
            self._fail(
                rec,
                TaskUnschedulableError(
                    rec.tid.hex(),
                    f"no node can ever provide {dict(demand)} "
                    f"(this node has {self.total_resources})",
                ),
            )
            return
        if self.recovery.fetch_args_first(rec):
            return  # an argument's only copy is on another node: it comes here first
        self.ready_queue.append(rec)
        self._dispatch()

    def _dispatch(self) -> None:
        queue = self.ready_queue
        ledger = self.ledger
        while queue:
            rec = queue[0]
            if rec.done:
                queue.popleft()
                continue
            if not self.idle_workers:
                self._maybe_spawn()
                return
            try:
                ledger.acquire(rec.tid.hex(), rec.demand)
            except InsufficientResources:
                return
            queue.popleft()
            worker = self.idle_workers.pop()  # the most recently idle: warm caches
            self._run_on(worker, rec)

    def _maybe_spawn(self) -> None:
        active = sum(1 for w in self.task_workers if not w.blocked)
        if active < self.max_active_workers and self.starting_workers < len(self.ready_queue):
            self._spawn_task_worker()

    def _run_on(self, worker: WorkerHandle, rec: TaskRecord) -> None:
        msg = rec.msg
        rec.worker = worker
        worker.tasks[rec.tid] = rec
        out = {
            "op": "task",
            "tid": rec.tid,
            "fn": msg["fn"],
            "args": msg["args"],
            "nret": rec.nret,
            "name": rec.name,
        }
        if rec.nret == STREAMING:
            stream = self.streams[rec.tid]
            stream.worker = worker
            out["window"] = stream.window
        if msg["fn"] not in worker.loaded:
            out["blob"] = self.code[msg["fn"]]
            worker.loaded.add(msg["fn"])
        worker.send(out)

    def _on_done(self, worker: WorkerHandle, message: dict) -> None:
        tid = message["tid"]
        rec = worker.tasks.pop(tid, None)
        if rec is None:
            return
        if worker.is_actor:
            actor = worker.actor
            if actor is not None:
                actor.inflight.pop(tid, None)
        else:
            self.ledger.release(tid.hex())
            if worker.alive:
                self.idle_workers.append(worker)
        err = message.get("err")
        if (
            err is not None
            and not message.get("cancelled")
            and not rec.cancelled
            and self._should_retry_exception(rec, message.get("mro", []))
        ):
            rec.retries_left -= 1
            self.stats["retries"] += 1
            if rec.actor is None:
                self.ready_queue.append(rec)
            else:
                self._send_actor_call(rec.actor, rec)
            self._dispatch()
            return
        self._complete(rec, message)
        if not worker.is_actor:
            self._dispatch()

    def _complete(self, rec: TaskRecord, message: dict) -> None:
        """Seal a task's results (local worker reply or remote node reply)."""
        err = message.get("err")
        tid = rec.tid
        if rec.nret == STREAMING:
            stream = self.streams.get(tid)
            if stream is not None:
                if err is not None:
                    self._seal(object_id(tid, stream.count), ERROR, err)
                    self.refs.stream_item(tid, object_id(tid, stream.count))
                    stream.count += 1
                stream.finished = True
                stream.wake()
            if self.refs.stream_end(tid):
                self.streams.pop(tid, None)
        elif err is not None:
            for i in range(rec.nret):
                self._seal(object_id(tid, i), ERROR, err)
        else:
            inner = message.get("inner")
            for i, data in enumerate(message["vals"]):
                if inner and inner[i]:  # counted before the seal, which may free the result
                    self.refs.contain(object_id(tid, i), inner[i])
                self._seal(object_id(tid, i), OK, data)
        if rec.actor is None and "aid" not in rec.msg:
            self.recovery.on_complete(rec, err is not None)
        rec.done = True
        self.tasks.pop(tid, None)
        if tid in self.refs.task_pins:
            self.refs.task_done(tid)
        if "held_by" in message:  # refs inside remote results are counted here now
            self.cluster.ack_held(message["held_by"], tid)
        if rec.pins:
            pins, rec.pins = rec.pins, None
            for cid in pins:
                self._unpin(cid)
        notify = getattr(rec.client, "on_task_complete", None)
        if notify is not None:
            notify(rec, message)

    def _should_retry_exception(self, rec: TaskRecord, mro: list[str]) -> bool:
        retry = rec.retry_exc
        if not retry or rec.retries_left == 0:
            return False
        if retry is True:
            return True
        return any(name in retry for name in mro)

    def _fail(self, rec: TaskRecord, exc: BaseException) -> None:
        self._fail_with_blob(rec, error_blob(exc))

    def _fail_with_blob(self, rec: TaskRecord, blob: bytes) -> None:
        if rec.done:
            return
        self._complete(rec, {"err": blob})

    def _on_yield(self, message: dict) -> None:
        tid = message["tid"]
        stream = self.streams.get(tid)
        if stream is None:
            return
        index = message["i"]
        oid = object_id(tid, index)
        if message.get("inner"):  # refs inside the item live as long as it does
            self.refs.contain(oid, message["inner"])
        self._seal(oid, OK, message["d"])
        stream.count = max(stream.count, index + 1)
        if not self.refs.stream_item(tid, oid):  # nobody will take it: the producer goes on
            stream.consumed = max(stream.consumed, index + 1)
            self._ack_stream(tid, stream)
        stream.wake()
        rec = self.tasks.get(tid)
        notify = getattr(rec.client, "on_task_yield", None) if rec is not None else None
        if notify is not None:
            notify(rec, message)

    async def _req_stream_next(self, message: dict, client=None) -> dict:
        tid, index = message["tid"], message["i"]
        stream = self.streams.get(tid)
        if stream is None:
            owner = message.get("owner")
            if self.cluster is not None and owner and owner != self.node_id:
                return await self.cluster.remote_stream_next(owner, message)
            return {"end": True}
        if index >= stream.count and not stream.finished:
            future = self.loop.create_future()

            def wake():
                if not future.done():
                    future.set_result(None)

            deadline = (
                None if message.get("timeout") is None else self.loop.time() + message["timeout"]
            )
            while index >= stream.count and not stream.finished:
                future = self.loop.create_future()
                stream.waiters.append(lambda f=future: f.done() or f.set_result(None))
                left = None if deadline is None else max(0.0, deadline - self.loop.time())
                try:
                    await asyncio.wait_for(future, left)
                except TimeoutError:
                    return {"timeout": True}
        if index < stream.count:
            if index + 1 > stream.consumed:
                stream.consumed = index + 1
                self._ack_stream(tid, stream)
            oid = object_id(tid, index)
            reply = {"oid": oid, "owner": self.node_id}
            if not message.get("borrow") and self.refs.take_item(tid, oid, client):
                reply["held"] = True  # the generator's hold is the taker's now
            return reply
        self.streams.pop(tid, None)
        return {"end": True}

    def _on_stream_drop(self, message: dict, client) -> None:
        """The process that submitted a streaming task dropped its generator (or died): the
        items nobody took are released, and so are the ones the task still yields."""
        tid = message["tid"]
        stream = self.streams.get(tid)
        running = stream is not None and not stream.finished
        self.refs.drop_stream(tid, running)
        if not running:
            self.streams.pop(tid, None)
        elif stream.count > stream.consumed:
            stream.consumed = stream.count
            self._ack_stream(tid, stream)

    def _ack_stream(self, tid: bytes, stream: StreamState) -> None:
        if stream.worker is not None:
            stream.worker.send({"op": "gen_ack", "tid": tid, "n": stream.consumed})
        elif self.cluster is not None:
            self.cluster.ack_remote_stream(tid, stream.consumed)

    # ---- cancel
    def _on_cancel(self, message: dict, client) -> None:
        self.cancel_task(
            task_of(message["oid"]), message.get("force", False), message.get("recursive", True)
        )

    def cancel_task(self, tid: bytes, force: bool, recursive: bool) -> None:
        rec = self.tasks.get(tid)
        if rec is None or rec.done:
            return
        rec.cancelled = True
        if recursive and rec.children:
            for child in rec.children:
                self.cancel_task(child, force, recursive)
        worker = rec.worker
        if rec.remote_peer is not None and self.cluster is not None:
            self.cluster.cancel_remote(rec, force)
            return
        if worker is None:
            if rec.actor is not None:
                actor = rec.actor
                try:
                    actor.outbox.remove(rec)
                except ValueError:
                    pass
            self._fail(rec, TaskCancelledError(f"task {rec.name} was cancelled before it ran"))
            return
        if force and not worker.is_actor:
            worker.kill()
        else:
            worker.send({"op": "cancel", "tid": tid})
            if not worker.is_actor and worker.proc.poll() is None:
                try:  # the worker's main thread runs user code: a signal makes it look
                    os.kill(worker.proc.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass

    # ---- actors
    def _on_create_actor_post(self, message: dict, client) -> None:
        self._create_actor(message, client)

    async def _create_actor_request(self, message: dict, client) -> dict:
        opts = message["opts"]
        name = opts.get("name")
        if name and self.cluster is not None:
            namespace = opts.get("namespace") or "default"
            try:  # sets message["host"]
                reply = await self.cluster.claim_named_actor(namespace, name, message)
            except TaskUnschedulableError as exc:
                return {"error": error_blob(exc)}
            if reply is not None:
                return reply
            reply = self._create_actor(message, client)
            # the claim went through: a creation that failed here gives the name back (unless
            # the name's holder is another actor of this node)
            if "error" in reply and self.named_actors.get((namespace, name)) is None:
                self.cluster.release_actor_name(namespace, name, message["aid"])
            return reply
        return self._create_actor(message, client)

    def _create_actor(self, message: dict, client) -> dict:
        aid = message["aid"]
        opts = message["opts"]
        if "blob" in message:
            self.code[message["cls"]] = message.pop("blob")
        name = opts.get("name")
        namespace = opts.get("namespace") or "default"
        if name:
            existing = self.named_actors.get((namespace, name))
            if (
                existing is not None
                and existing in self.actors
                and self.actors[existing].state != "DEAD"
            ):
                if opts.get("get_if_exists"):
                    record = self.actors[existing]
                    return {
                        "aid": existing,
                        "node": self.node_id,
                        "existing": True,
                        "meta": record.opts.get("meta"),
                    }
                return {
                    "error": error_blob(
                        ActorNameTakenError(
                            f"an actor named {name!r} already exists in namespace {namespace!r}"
                        )
                    )
                }
        self._adopt_actor(message, client)
        if self.cluster is not None:
            target = message.pop("host", None) or self.cluster.place_actor(message, defer=True)
            if target is DEFERRED:
                return {"aid": aid, "node": self.node_id}
            if target is not None and target != self.node_id:
                return self.cluster.create_remote_actor(message, target)
        return self.host_actor(message)

    def _adopt_actor(self, message: dict, client) -> None:
        """This node owns the actor it creates: it keeps the refs in its creation arguments and,
        unless the actor is detached, ends it when the attached driver that made it goes."""
        message.setdefault("owner", self.node_id)
        if "inner" in message:
            self.refs.pin_task(message["aid"], message.pop("inner"))
        if isinstance(client, AttachedDriver) and message["opts"].get("lifetime") != "detached":
            if not hasattr(client, "owned_actors"):
                client.owned_actors = []
            client.owned_actors.append(message["aid"])

    def host_actor(self, message: dict) -> dict:
        aid = message["aid"]
        opts = message["opts"]
        actor = ActorRecord(aid, message, opts)
        if not self.ledger.could_ever_fit(actor.demand):
            actor.state = "DEAD"
            actor.death_cause = (
                f"the actor needs {actor.demand}, more than this node's {self.total_resources}"
            )
            self.actors[aid] = actor
            return {"error": error_blob(TaskUnschedulableError(aid.hex(), actor.death_cause))}
        try:
            if actor.demand:
                self.ledger.acquire("actor-" + aid.hex(), actor.demand)
        except InsufficientResources as exc:
            actor.state = "DEAD"
            actor.death_cause = f"not enough resources on this node for the actor: {exc}"
            self.actors[aid] = actor
            return {"error": error_blob(TaskUnschedulableError(aid.hex(), actor.death_cause))}
        self.actors[aid] = actor
        if actor.name:
            self.named_actors[(actor.namespace, actor.name)] = aid
        self._start_actor_worker(actor)
        return {"aid": aid, "node": self.node_id}

    def _start_actor_worker(self, actor: ActorRecord) -> None:
        """Start the actor's worker once its constructor's top-level ref arguments are values
        (calls queue in its outbox meanwhile); an argument that failed kills the actor."""

        def start() -> None:
            if actor.state != "DEAD":
                self._spawn_actor_worker(actor)

        self._resolve_ref_args(
            actor, start, lambda blob: self._constructor_argument_failed(actor, blob)
        )

    def _constructor_argument_failed(self, actor: ActorRecord, blob: bytes) -> None:
        actor.state = "DEAD"
        actor.no_restart = True
        actor.death_cause = (
            f"an argument of the actor's constructor failed:\n{serialization.deserialize(blob)}"
        )
        self._release_actor_args(actor)
        while actor.outbox:
            self._fail(actor.outbox.popleft(), ActorDiedError(self._death_message(actor)))

    def _spawn_actor_worker(self, actor: ActorRecord) -> None:
        worker = self._spawn_worker(is_actor=True)
        worker.actor = actor
        actor.worker = worker
        actor.state = "ALIVE"
        msg = actor.msg
        opts = actor.opts
        worker.send(
            {
                "op": "actor_create",
                "aid": actor.aid,
                "cls": msg["cls"],
                "blob": self.code[msg["cls"]],
                "args": msg["args"],
                "mc": opts.get("max_concurrency") or (1000 if opts.get("is_async") else 1),
                "async": bool(opts.get("is_async")),
                "name": msg.get("cname", "actor"),
            }
        )
        worker.loaded.add(msg["cls"])
        while actor.outbox:
            self._send_actor_call(actor, actor.outbox.popleft())

    def _on_actor_ready(self, worker: WorkerHandle, message: dict) -> None:
        actor = worker.actor
        if actor is not None and actor.max_restarts == 0:
            self._release_actor_args(actor)  # the constructor has its arguments and runs once
        if actor is None or "err" not in message:
            return
        actor.state = "DEAD"
        actor.no_restart = True
        self._release_actor_args(actor)
        cause = serialization.deserialize(message["err"])
        actor.death_cause = f"the actor's constructor raised:\n{cause}"
        worker.kill()

    def _release_actor_args(self, actor: ActorRecord) -> None:
        while actor.pins:
            self._unpin(actor.pins.pop())

    def _on_actor_call(self, message: dict, client) -> None:
        aid = message["aid"]
        actor = self.actors.get(aid)
        tid = message["tid"]
        nret = message["nret"]
        rec = TaskRecord(
            tid,
            message,
            nret,
            message.get("retries", 0),
            None,
            {},
            message.get("name", message["m"]),
        )
        rec.client = client
        self.tasks[tid] = rec
        if client is None or client.kind != "remote":
            self.recovery.table.record_actor_call(tid, nret)
        if nret == STREAMING:
            self.streams[tid] = StreamState(DEFAULT_STREAM_WINDOW)
            self.refs.open_stream(tid, client)
        else:
            for i in range(nret):
                oid = object_id(tid, i)
                self.objects[oid] = ObjectEntry()
                self.refs.create(oid, client)
        if client.kind != "remote" and ("inner" in message or message["args"][0] == "l"):
            self.refs.pin_task(tid, refcount.task_arg_refs(message))
        if actor is None:
            if self.cluster is not None and (
                message.get("anode") != self.node_id or aid in self.cluster.actor_location
            ):
                self.cluster.enqueue_actor_call(rec)
                self._resolve_args(rec, lambda r: self.cluster.pump_actor(aid))
                return
            self._fail(rec, ActorDiedError(f"actor {aid.hex()} does not exist on this node"))
            return
        rec.actor = actor
        if actor.state == "DEAD":
            self._fail(rec, ActorDiedError(self._death_message(actor)))
            return
        actor.outbox.append(rec)
        self._resolve_args(rec, lambda r: self._pump_actor(actor))

    def _pump_actor(self, actor: ActorRecord) -> None:
        if actor.state != "ALIVE":
            return
        outbox = actor.outbox
        while outbox and outbox[0].deps_left == 0:
            rec = outbox.popleft()
            if rec.done:
                continue
            self._send_actor_call(actor, rec)

    def _send_actor_call(self, actor: ActorRecord, rec: TaskRecord) -> None:
        worker = actor.worker
        msg = rec.msg
        rec.worker = worker
        worker.tasks[rec.tid] = rec
        actor.inflight[rec.tid] = rec
        out = {
            "op": "actor_call",
            "tid": rec.tid,
            "m": msg["m"],
            "args": msg["args"],
            "nret": rec.nret,
            "name": rec.name,
        }
        if rec.nret == STREAMING:
            stream = self.streams[rec.tid]
            stream.worker = worker
            out["window"] = stream.window
        worker.send(out)

    def _death_message(self, actor: ActorRecord) -> str:
        return (
            f"actor {actor.name or actor.aid.hex()} is dead: "
            f"{actor.death_cause or 'its worker process died'}"
        )

    def _on_actor_worker_died(self, actor: ActorRecord) -> None:
        inflight = list(actor.inflight.values())
        actor.inflight.clear()
        can_restart = (
            not actor.no_restart
            and actor.state != "DEAD"
            and (actor.max_restarts < 0 or actor.restarts < actor.max_restarts)
        )
        if not can_restart:
            actor.state = "DEAD"
            if not actor.death_cause:
                actor.death_cause = (
                    "it was killed"
                    if actor.no_restart
                    else "its worker process died and no restarts are left"
                )
            if actor.demand:
                self.ledger.release("actor-" + actor.aid.hex())
            self._release_actor_args(actor)
            self.refs.task_done(actor.aid)
            if actor.name and self.named_actors.get((actor.namespace, actor.name)) == actor.aid:
                del self.named_actors[(actor.namespace, actor.name)]
                if self.cluster is not None:
                    self.cluster.release_actor_name(actor.namespace, actor.name, actor.aid)
            for rec in inflight + list(actor.outbox):
                self._fail(rec, ActorDiedError(self._death_message(actor)))
            actor.outbox.clear()
            return
        actor.restarts += 1
        self.stats["actor_restarts"] += 1
        retry = []
        for rec in inflight:
            rec.worker = None
            if rec.retries_left != 0 and not self._stream_started(rec):
                rec.retries_left -= 1
                retry.append(rec)
            else:
                self._fail(
                    rec,
                    ActorDiedError(
                        f"actor {actor.name or actor.aid.hex()} died while running {rec.name} "
                        f"(it restarts; the call has no retries left)"
                    ),
                )
        actor.outbox.extendleft(reversed(retry))
        self._start_actor_worker(actor)

    def _on_kill(self, message: dict, client) -> None:
        aid = message["aid"]
        actor = self.actors.get(aid)
        if actor is None:
            if self.cluster is not None:
                self.cluster.kill_remote_actor(message)
            return
        if message.get("no_restart", True):
            actor.no_restart = True
            actor.death_cause = "it was killed with kill()"
        if actor.worker is not None:
            actor.worker.kill()

    async def _req_get_actor(self, message: dict) -> dict:
        key = (message.get("ns") or "default", message["name"])
        aid = self.named_actors.get(key)
        if aid is not None:
            actor = self.actors[aid]
            return {"aid": aid, "node": self.node_id, "meta": actor.opts.get("meta")}
        if self.cluster is not None:
            found = await self.cluster.lookup_actor_name(*key)
            if found is not None:
                return found
        return {
            "error": error_blob(ValueError(f"no actor named {key[1]!r} in namespace {key[0]!r}"))
        }

    # ---- cluster view
    def local_view(self) -> dict:
        return {
            "NodeID": self.node_id,
            "Alive": True,
            "Resources": self.total_resources,
            "Available": self.ledger.available,
            "Workers": len(self.task_workers),
            "Actors": sum(1 for a in self.actors.values() if a.state != "DEAD"),
        }

    def nodes(self) -> list[dict]:
        if self.cluster is not None:
            return self.cluster.nodes()
        return [self.local_view()]
