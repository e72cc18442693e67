"""Client stubs of a node: what the user API calls into, in a driver (`DriverCore`), a worker
(`WorkerCore`) or a driver attached to a node process (`AttachedCore`).

Both speak the same request vocabulary to their node (see docs/protocol/runtime.md, "client ops"):
fire-and-forget posts (submit, actor_call, put, release, stream_drop, kill, cancel) and requests
with a reply (get, wait, stream_next, get_actor, named create_actor, cid, nodes). A driver's node
runs in a background event-loop thread of the same process; a worker's node is at the end of its
socketpair.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from latticaray.objectstore.errors import ObjectNotFound
from latticaray.observe.unhandled import UnhandledErrors
from latticaray.runtime import context, serialization
from latticaray.runtime.channel import WorkerConnection
from latticaray.runtime.errors import GetTimeoutError, NotPermittedError, TaskError
from latticaray.runtime.ids import ids, object_id
from latticaray.runtime.protocol import ERROR, OK
from latticaray.runtime.refs import ObjectRef, ObjectRefGenerator, borrowed_ref, collect_refs

RELEASE_BATCH = 64
RELEASE_AGE = 0.05  # s: a driver's queued releases go with its next post once this old
REF_MARK = b"_rebuild_ref"
_NO_REFS = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})


def raise_error_value(data: bytes) -> NoReturn:
    err = serialization.deserialize(data)
    if isinstance(err, TaskError):
        raise err.as_instanceof_cause()
    if not isinstance(err, BaseException):
        raise TypeError(f"an error value holds {type(err).__name__}, not an exception")
    raise err


def decode_value(entry) -> object:
    status, data = entry
    if status == OK:
        core = context.current_core()
        # a pickle holding refs names their rebuild function; a store value may hold refs too
        if core is None or (REF_MARK not in data and not serialization.is_store_ref(data)):
            return serialization.deserialize(data)
        with core.borrowing():
            return serialization.deserialize(data)
    raise_error_value(data)


class _Borrowing:
    """Refs deserialized inside this block are registered with the node in one message."""

    __slots__ = ("core", "outer")

    def __init__(self, core: CoreClient):
        self.core = core

    def __enter__(self) -> None:
        local = self.core._borrow_local
        self.outer = getattr(local, "batch", None)
        local.batch = []

    def __exit__(self, *exc) -> None:
        local = self.core._borrow_local
        batch, local.batch = local.batch, self.outer
        if batch:
            self.core.post_borrows(batch)


class CoreClient:
    """Common client logic: ids, reference counts, argument encoding, result decoding."""

    node_id: str
    job_id: str = "job"
    namespace: str = "default"
    #: errors never raised by get(), printed when their last ref goes (drivers that can see them)
    unhandled: UnhandledErrors | None = None
    #: a dropped actor handle's release is posted at once (a worker's go after its task)
    prompt_releases = True

    def __init__(self):
        self._ref_counts: dict[bytes, int] = {}
        self._escaped: set[bytes] = set()
        self._shipped: set[bytes] = set()
        self._release_queue: list[bytes] = []
        self._stored: dict[bytes, str] = {}  # put by this process into the shared-memory store
        self._lock = threading.RLock()  # re-entered when GC finalizes a ref inside
        self._borrow_local = threading.local()

    @property
    def releases_pending(self) -> bool:
        """Whether releases wait to be posted (flushed in a batch)."""
        return bool(self._release_queue)

    # ---- transport (subclasses)
    def post(self, message: dict) -> None:
        raise NotImplementedError

    def request(self, message: dict, timeout: float | None = None) -> dict:
        raise NotImplementedError

    # ---- reference counting
    def add_ref(self, oid: bytes) -> None:
        with self._lock:  # refs are made and dropped on several threads (threaded actors, GC)
            counts = self._ref_counts
            counts[oid] = counts.get(oid, 0) + 1

    def remove_ref(self, oid: bytes) -> None:
        with self._lock:
            counts = self._ref_counts
            left = counts.get(oid, 0) - 1
            if left > 0:
                counts[oid] = left
                return
            counts.pop(oid, None)
            stored = self._stored.pop(oid, None)
            if oid in self._escaped:
                return
            self._release_queue.append(oid)
            # a large object's memory (and its pages, recycled for the next put) comes back now
            flush = len(self._release_queue) >= RELEASE_BATCH or stored is not None
        if self.unhandled is not None:
            self.released_unhandled(oid)
        if flush:
            self.flush_releases()
        if stored is not None:
            store = serialization.get_store()
            if store is not None and hasattr(store, "expect_back"):
                store.expect_back(stored)

    def released_unhandled(self, oid: bytes) -> None:
        """The last ref to ``oid`` is gone: its error is printed if get() never raised it
        (clients that see the object's state override this)."""

    def decode_values(self, refs: list[ObjectRef], entries: list) -> list:
        """The values of ``entries`` (of ``refs``), raising the first error; the errors are
        then seen (none is printed as unhandled later)."""
        try:
            return [decode_value(entry) for entry in entries]
        except BaseException:
            if self.unhandled is not None:
                self.unhandled.raised([r.id for r, e in zip(refs, entries) if e[0] != OK])
            raise

    def add_borrowed_ref(self, oid: bytes, owner: str) -> None:
        """A ref deserialized here: the first copy in this process registers it with the node."""
        with self._lock:
            counts = self._ref_counts
            held = counts.get(oid, 0)
            counts[oid] = held + 1
            if held:
                return
        batch = getattr(self._borrow_local, "batch", None)
        if batch is not None:
            batch.append([oid, owner])
        else:
            self.post_borrows([[oid, owner]])

    def put_counted(self, value) -> ObjectRef:
        """`put`, and the refs pickled inside the value live as long as the object (the node
        counts them as its contents, told right behind the put on the same channel)."""
        if type(value) in _NO_REFS:
            return self.put(value)
        with collect_refs() as inner:
            ref = self.put(value)
        if inner:
            self.post({"op": "contain", "oid": ref.id, "inner": inner})
        return ref

    def borrowing(self) -> _Borrowing:
        return _Borrowing(self)

    def post_borrows(self, refs: list) -> None:
        with self._lock:  # a queued release of one of them must reach the node first
            releases, self._release_queue = self._release_queue, []
        if releases:
            self.post({"op": "release", "oids": releases})
        self.post({"op": "borrow", "refs": refs})

    def escape_ref(self, ref: ObjectRef) -> None:
        self.escape_id(ref.id)

    def escape_id(self, oid: bytes) -> None:
        """A ref or actor handle pickled outside the runtime's serialization: it is never
        released by this process (whatever holds the copy cannot be tracked)."""
        self._escaped.add(oid)

    def flush_releases(self) -> None:
        with self._lock:
            batch, self._release_queue = self._release_queue, []
        if batch:
            self.post({"op": "release", "oids": batch})

    # ---- encoding
    def code_fields(self, code_hash: bytes, blob: bytes) -> dict:
        if code_hash in self._shipped:
            return {}
        self._shipped.add(code_hash)
        return {"blob": blob}

    @staticmethod
    def encode_args(args: tuple, kwargs: dict, message: dict) -> list:
        """Arguments on the wire; refs nested inside them go to `message["inner"]` (the node
        keeps them alive until the task is done)."""
        has_ref = any(type(a) is ObjectRef for a in args) or any(
            type(v) is ObjectRef for v in kwargs.values()
        )
        if (
            not has_ref
            and all(type(a) in _NO_REFS for a in args)
            and all(type(v) in _NO_REFS for v in kwargs.values())
        ):
            return ["b", serialization.serialize((args, kwargs))]
        with collect_refs() as inner:
            if not has_ref:
                encoded = ["b", serialization.serialize((args, kwargs))]
            else:
                positional = [
                    [1, a.id, a.owner] if type(a) is ObjectRef else [0, serialization.serialize(a)]
                    for a in args
                ]
                keyword: dict[str, list] = {
                    k: [1, v.id, v.owner]
                    if type(v) is ObjectRef
                    else [0, serialization.serialize(v)]
                    for k, v in kwargs.items()
                }
                encoded = ["l", positional, keyword]  # type: ignore[list-item]
        if inner:
            message["inner"] = inner
        return encoded

    # ---- verbs
    def submit_task(self, fn_hash: bytes, blob: bytes, name: str, args, kwargs, opts: dict):
        task_id = ids.next_id()
        nret = opts["nret"]
        message = {
            "op": "submit",
            "tid": task_id,
            "fn": fn_hash,
            "name": name,
            "nret": nret,
            "opts": opts["wire"],
            "parent": context.current_task_id.get(),
        }
        message["args"] = self.encode_args(args, kwargs, message)
        message.update(self.code_fields(fn_hash, blob))
        self.post(message)
        return self._returns(task_id, nret)

    def _returns(self, task_id: bytes, nret: int):
        if nret == -1:
            return ObjectRefGenerator(task_id, self.node_id, _owned=True)
        refs = [ObjectRef(object_id(task_id, i), self.node_id) for i in range(nret)]
        if nret == 1:
            return refs[0]
        return refs

    def create_actor(
        self, cls_hash: bytes, blob: bytes, name: str, args, kwargs, opts: dict, actor_id: bytes
    ) -> dict:
        message = {
            "op": "create_actor",
            "aid": actor_id,
            "cls": cls_hash,
            "cname": name,
            "opts": opts,
        }
        message["args"] = self.encode_args(args, kwargs, message)
        message.update(self.code_fields(cls_hash, blob))
        if opts.get("name"):
            reply = self.request(message)
            if "error" in reply:
                raise_error_value(reply["error"])
            return reply
        self.post(message)
        return {"node": self.node_id}

    def submit_actor_task(
        self,
        actor_id: bytes,
        actor_node: str,
        method: str,
        args,
        kwargs,
        nret: int,
        retries: int,
        name: str,
        owner: str = "",
    ):
        """Call an actor's method; ``owner``: the node counting the actor's handles (the call
        holds the actor until it is done), "" for a detached actor."""
        task_id = ids.next_id()
        message = {
            "op": "actor_call",
            "tid": task_id,
            "aid": actor_id,
            "anode": actor_node,
            "m": method,
            "nret": nret,
            "retries": retries,
            "name": name,
        }
        message["args"] = self.encode_args(args, kwargs, message)
        if owner:  # the call holds its actor until done
            inner = message.get("inner")
            if isinstance(inner, list):
                inner.append([actor_id, owner])
            else:
                message["inner"] = [[actor_id, owner]]
        self.post(message)
        return self._returns(task_id, nret)

    def put(self, value) -> ObjectRef:
        oid = object_id(ids.next_id(), 0)
        data = serialization.serialize(value)
        self.post({"op": "put", "oid": oid, "d": data})
        ref = ObjectRef(oid, self.node_id)
        if serialization.is_store_ref(data):
            with self._lock:
                self._stored[oid] = serialization.store_name(data)
        return ref

    def get(self, refs: list[ObjectRef], timeout: float | None):
        reply = self.request(
            {"op": "get", "oids": [[r.id, r.owner] for r in refs], "timeout": timeout}, timeout
        )
        if reply.get("timeout"):
            raise GetTimeoutError(f"get timed out after {timeout} s")
        if "error" in reply:
            raise_error_value(reply["error"])
        return self.decode_values(refs, reply["vals"])

    def get_by_cid(self, cid: str, timeout: float | None):
        reply = self.request({"op": "get_cid", "cid": cid, "timeout": timeout}, timeout)
        if reply.get("timeout"):
            raise GetTimeoutError(f"fetching {cid} timed out after {timeout} s")
        if "error" in reply:
            raise_error_value(reply["error"])
        return decode_value(reply["val"])

    def wait(
        self, refs: list[ObjectRef], num_returns: int, timeout: float | None, fetch_local: bool
    ) -> list[int]:
        reply = self.request(
            {
                "op": "wait",
                "oids": [[r.id, r.owner] for r in refs],
                "k": num_returns,
                "timeout": timeout,
                "fetch": fetch_local,
            }
        )
        return reply["ready"]

    def object_cid(self, ref: ObjectRef) -> str:
        reply = self.request({"op": "cid", "oid": ref.id, "owner": ref.owner})
        if "error" in reply:
            raise_error_value(reply["error"])
        return reply["cid"]

    def stream_next(self, task_id: bytes, index: int, timeout: float | None, owner: str = ""):
        reply = self.request(
            {"op": "stream_next", "tid": task_id, "i": index, "timeout": timeout, "owner": owner},
            timeout,
        )
        if reply.get("timeout"):
            raise GetTimeoutError(f"next stream item timed out after {timeout} s")
        if "error" in reply:
            raise_error_value(reply["error"])
        if reply.get("end"):
            return None
        oid, owner = reply["oid"], reply.get("owner", self.node_id)
        if reply.get("held"):  # the node handed this process the generator's hold on it
            return ObjectRef(oid, owner)
        return borrowed_ref(oid, owner, core=self)  # taken before (a copy of the generator)

    def drop_stream(self, task_id: bytes) -> None:
        """The generator of a streaming task this process submitted was dropped."""
        self.post({"op": "stream_drop", "tid": task_id})

    def value_future(self, ref: ObjectRef) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def resolve():
            try:
                future.set_result(self.get([ref], None)[0])
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=resolve, daemon=True, name="ref-future").start()
        return future

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        self.post(
            {
                "op": "cancel",
                "oid": ref.id,
                "owner": ref.owner,
                "force": force,
                "recursive": recursive,
            }
        )

    def kill_actor(self, actor_id: bytes, actor_node: str, no_restart: bool) -> None:
        self.post({"op": "kill", "aid": actor_id, "anode": actor_node, "no_restart": no_restart})

    def get_actor(self, name: str, namespace: str) -> dict:
        reply = self.request({"op": "get_actor", "name": name, "ns": namespace})
        if "error" in reply:
            raise_error_value(reply["error"])
        return reply

    def nodes(self) -> list[dict]:
        return self.request({"op": "nodes"})["nodes"]

    def runtime_context(self) -> context.RuntimeContext:
        task_id = context.current_task_id.get()
        actor_id = context.current_actor_id.get()
        return context.RuntimeContext(
            node_id=self.node_id,
            job_id=self.job_id,
            task_id=task_id.hex() if task_id else None,
            actor_id=actor_id.hex() if actor_id else None,
            worker_id=getattr(self, "worker_id", "driver"),
            namespace=self.namespace,
        )

    def shutdown(self) -> None:
        pass


class DriverCore(CoreClient):
    """A driver's client: its node runs on an event loop in a background thread of this process."""

    def __init__(self, node, loop: asyncio.AbstractEventLoop, namespace: str = "default"):
        super().__init__()
        self.node = node
        self.loop = loop
        self.node_id = node.node_id
        self.namespace = namespace
        self.client = node.local_client()
        self._outbox: list[dict | Callable[[], Any]] = []
        self._flush_scheduled = False
        self._releases_flushed = 0.0  # when queued releases last rode along with posts
        self.unhandled = UnhandledErrors()

    def released_unhandled(self, oid: bytes) -> None:
        entry = self.node.objects.entries.get(oid)
        if entry is not None and entry.status == ERROR and self.unhandled is not None:
            data = entry.data
            self.unhandled.released(oid, lambda: serialization.deserialize(data))

    # ---- verbs this node's credential may not allow (an observer's)
    def _require_submit(self) -> None:
        refusal = self.node.submit_refusal()
        if refusal is not None:
            raise NotPermittedError(refusal)

    def submit_task(self, *args, **kwargs):
        self._require_submit()
        return super().submit_task(*args, **kwargs)

    def create_actor(self, *args, **kwargs) -> dict:
        self._require_submit()
        return super().create_actor(*args, **kwargs)

    def submit_actor_task(self, *args, **kwargs):
        self._require_submit()
        return super().submit_actor_task(*args, **kwargs)

    def post(self, message: dict | Callable[[], Any]) -> None:
        """Queue a message for the loop (or a waiter registration riding the same wake-up)."""
        self._outbox.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._outbox = self._outbox, []
        handle = self.node.handle_post
        for message in batch:
            if callable(message):  # a waiter registration riding the same wake-up as submits
                message()
            else:
                handle(message, self.client)
        if self._release_queue:  # releases older than RELEASE_AGE ride along (after the
            now = time.monotonic()  # posts made before), a busy driver's still in batches
            if now - self._releases_flushed >= RELEASE_AGE:
                self._releases_flushed = now
                with self._lock:
                    releases, self._release_queue = self._release_queue, []
                if releases:
                    handle({"op": "release", "oids": releases}, self.client)

    def request(self, message: dict, timeout: float | None = None) -> dict:
        if self.loop.is_closed():
            raise RuntimeError("latticaray has been shut down")
        if self._release_queue:  # as a worker's requests do
            self.flush_releases()
        future = asyncio.run_coroutine_threadsafe(
            self.node.handle_request(message, self.client), self.loop
        )
        return future.result()

    def get(self, refs: list[ObjectRef], timeout: float | None):
        oids = [r.id for r in refs]
        objects = self.node.objects
        ready = objects.ready_entries(oids) if not self._outbox else None
        if ready is None:
            ready = self._wait_local(oids, timeout)
            if ready is None:
                return super().get(refs, timeout)
        try:
            return self.decode_values(refs, ready)
        except ObjectNotFound:  # its store copy is gone: the node recovers it (lineage.py)
            return super().get(refs, timeout)

    def wait(
        self, refs: list[ObjectRef], num_returns: int, timeout: float | None, fetch_local: bool
    ) -> list[int]:
        table = self.node.objects
        objects = table.entries
        if self._outbox:  # let the loop take in what was just submitted
            flushed = threading.Event()
            self.post(flushed.set)
            flushed.wait()
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = table.seal_cond
        with cond:
            table.seal_waiters += 1
        try:
            while True:
                seen = table.seal_count
                ready = []
                for i, r in enumerate(refs):  # the first num_returns ready, in list order
                    e = objects.get(r.id)
                    if e is None:  # not this node's to watch: the node waits for it
                        return super().wait(refs, num_returns, timeout, fetch_local)
                    if e.status != -1:
                        ready.append(i)
                        if len(ready) >= num_returns:
                            return ready
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return ready
                with cond:
                    if table.seal_count == seen:
                        cond.wait(left)
        finally:
            with cond:
                table.seal_waiters -= 1

    def _wait_local(self, oids: list[bytes], timeout: float | None):
        """Block until objects this node holds are sealed, woken straight from the loop thread.

        Returns None when some object is not in the node's table (owned elsewhere): the caller
        then takes the general request path, which knows how to fetch it.
        """
        done = threading.Event()
        missing = []

        def register():
            objects = self.node.objects.entries
            pending = []
            for oid in oids:
                entry = objects.get(oid)
                if entry is None:
                    missing.append(oid)
                    done.set()
                    return
                if entry.waiters is not None or entry.status == -1:
                    pending.append(entry)
            if not pending:
                done.set()
                return
            left = [len(pending)]

            def one_ready():
                left[0] -= 1
                if left[0] == 0:
                    done.set()

            for entry in pending:
                entry.on_ready(one_ready)

        self.post(register)
        if not done.wait(timeout):
            raise GetTimeoutError(f"get timed out after {timeout} s")
        if missing:
            return None
        return self.node.objects.ready_entries(oids)


class WorkerCore(CoreClient):
    """A worker's client: requests travel to the node over the worker's socketpair."""

    prompt_releases = False  # flushed after each task: never from a finalizer mid-send

    def __init__(self, conn, node_id: str, worker_id: str):
        super().__init__()
        self.conn = conn
        self.node_id = node_id
        self.worker_id = worker_id

    def post(self, message: dict) -> None:
        self.conn.send(message)

    def request(self, message: dict, timeout: float | None = None) -> dict:
        if self._release_queue:
            self.flush_releases()
        message["task"] = context.current_task_id.get()
        reply = self.conn.request(message)
        if "error" in reply and isinstance(reply["error"], str):
            raise RuntimeError(reply["error"])
        return reply


class AttachedCore(WorkerCore):
    """A driver attached to a running node process over its Unix socket (`init(address=...)`)."""

    prompt_releases = True  # a driver: no task end flushes them

    def __init__(self, path: str, namespace: str = "default"):
        import socket as socket_module

        sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        sock.settimeout(10.0)
        sock.connect(path)
        sock.settimeout(None)
        conn = WorkerConnection(sock)
        welcome = conn.read()
        if welcome.get("op") != "welcome":
            sock.close()
            raise RuntimeError(f"{path} is not a latticaray node socket")
        super().__init__(conn, welcome["node_id"], "driver")
        self.namespace = namespace
        self.store_root = welcome.get("store")
        conn.router = lambda _message: None  # a driver gets only replies; requests read them

    def shutdown(self) -> None:
        try:
            self.flush_releases()
            self.conn.sock.close()
        except OSError:
            pass
