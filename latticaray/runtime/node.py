"""RuntimeNode: one node's side of tasks and actors (asyncio; owns the worker processes).

A node accepts client operations (from its driver thread, its workers and attached drivers, see
client.py), keeps the table of objects it owns, resolves task arguments, accounts resources
with the scheduler's ResourceLedger, runs tasks on a pool of worker processes, hosts actors on
dedicated worker processes, retries tasks whose worker died, restarts actors, and streams
generator items with backpressure. It is composed of parts, one role each (local/):

  objects    ObjectTable    entries, store pins, seal/free, get/wait/cid requests
  tasks      TaskTable      submission, argument resolution, scheduling, dispatch, results
  streams    StreamTable    streamed items, consumers, backpressure acks
  actors     ActorHost      hosted actors, their calls, restarts, kill
  workers    WorkerPool     worker processes and attached drivers, requests, deaths
  refs       RefTable       reference counts, borrowers, containment (refcount.py)
  recovery   ObjectRecovery lineage hooks and recovery of lost store objects
  activity   NodeActivity   task counts and recent tasks (activity.py)
  logs       LogRouter      worker output to the driver that owns the task
  state_source NodeStateSource  this node as the state API sees it (statesource.py)
  ipfs       IpfsSharing    objects shared with IPFS peers (ipfsshare.py; None unless opted in)

When the node is part of a mesh, `remote` (remote/runtime.py `RemoteRuntime`) places work on
peers and carries it there; it is None for a node on its own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import shutil
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from latticaray.objectstore.layout import default_root
from latticaray.observe.gather import encode_snapshot, gather
from latticaray.observe.model import MAX_ROWS
from latticaray.runtime import refcount, serialization
from latticaray.runtime.activity import NodeActivity
from latticaray.runtime.errors import CredentialError, NotPermittedError
from latticaray.runtime.local.actors import ActorHost
from latticaray.runtime.local.clients import LocalClient
from latticaray.runtime.local.envs import NodeEnvs
from latticaray.runtime.local.logs import LogRouter
from latticaray.runtime.local.objects import ObjectTable
from latticaray.runtime.local.recovery import ObjectRecovery
from latticaray.runtime.local.resources import NodeResources
from latticaray.runtime.local.streams import StreamTable
from latticaray.runtime.local.tasks import TaskTable
from latticaray.runtime.local.workers import WorkerPool
from latticaray.runtime.serialization import error_blob
from latticaray.runtime.statesource import NodeStateSource
from latticaray.scheduler.resources import ResourceLedger

if TYPE_CHECKING:
    from latticaray.runtime.ipfsshare import IpfsSharing
    from latticaray.runtime.remote.runtime import RemoteRuntime

log = logging.getLogger(__name__)


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
        store: Any = None,
        store_capacity: int | None = None,
        gpu_ids: list[str] | None = None,
    ):
        self.node_id = node_id
        self.ledger = ResourceLedger(resources, gpu_ids=gpu_ids)
        self.total_resources = self.ledger.total
        cpus = self.total_resources.get("CPU", 0.0)
        max_active = max_workers or max(1, int(cpus) or 1)
        self.worker_env = dict(worker_env or {})
        self.store = store
        self.store_capacity = store_capacity
        self._own_store = False
        self.store_ready: asyncio.Future | None = None
        self.code: dict[bytes, bytes] = {}  # function and class blobs by code hash
        self.remote: RemoteRuntime | None = None  # set when this node is part of a mesh
        self.ipfs: IpfsSharing | None = None  # set when its mesh node serves IPFS peers
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.stats: collections.Counter = collections.Counter()
        self._local_client = LocalClient(node_id)
        self._background: set[asyncio.Task] = set()
        self.objects = ObjectTable(self)
        self.tasks = TaskTable(self)
        self.streams = StreamTable(self)
        self.actors = ActorHost(self)
        self.workers = WorkerPool(self, max_active, max_active if prestart is None else prestart)
        self.refs = refcount.RefTable(self)
        self.recovery = ObjectRecovery(self)
        self.resources = NodeResources(self, self.ledger)  # ledger, bundles, placement groups
        self.envs = NodeEnvs(self)  # runtime_env packages and the worker's environment
        self.activity = NodeActivity(node_id)  # counts and recent tasks (state API, metrics)
        self.logs = LogRouter(self)  # worker output to the owning driver
        self.state_source = NodeStateSource(self)  # what `latticaray status` reads of this node
        self._post_handlers = {
            "submit": self.tasks.submit,
            "actor_call": self.actors.call,
            "put": self.objects.put,
            "contain": self.objects.contain,
            "release": self.objects.release,
            "create_actor": self.actors.create_post,
            "kill": self.actors.kill,
            "cancel": self.tasks.cancel,
            "borrow": self.objects.borrow,
            "stream_drop": self.streams.drop,
            "log": self.logs.from_worker,
        }

    # ------------------------------------------------------------------ lifecycle
    def local_client(self) -> LocalClient:
        return self._local_client

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.store is None:
            # created off the loop (it imports pyarrow): init() returns before it is ready, and
            # until then large values simply travel inline
            root = default_root(clean_dead=False)  # the dead's stores go in _create_store
            self.worker_env[serialization.STORE_ROOT_ENV] = root
            self._own_store = True
            self.store_ready = self.loop.run_in_executor(None, self._create_store, root)
        else:
            serialization.set_store(self.store)
            self.worker_env[serialization.STORE_ROOT_ENV] = self.store.root
        self.workers.start()
        self.resources.start()

    async def stop(self) -> None:
        self.stopping = True
        self.state_source.close()
        await self.resources.stop()
        await self.workers.stop()
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self._own_store:
            try:
                assert self.store_ready is not None
                await asyncio.wait_for(asyncio.shield(self.store_ready), 30)
            except Exception:
                pass  # the store never came up: nothing of it to remove beyond its directory
            shutil.rmtree(self.worker_env[serialization.STORE_ROOT_ENV], ignore_errors=True)
            if self.store is not None:
                shutil.rmtree(self.store.spill_dir, ignore_errors=True)
            serialization.set_store(None)

    def _create_store(self, root: str) -> None:
        from latticaray.objectstore.cid import BLAKE3
        from latticaray.objectstore.layout import remove_dead_stores
        from latticaray.objectstore.store import LocalStore

        # stores of node processes that were killed (kill -9, OOM) hold shared memory until
        # someone removes them: a node starting on the host does
        removed = remove_dead_stores()
        if removed:
            log.info("removed %d object stores left behind by processes that died", removed)

        # the runtime names store objects with BLAKE3 on every node (a dependency), so a value has
        # one CID mesh-wide; the store's config tells its other processes (workers, attached
        # drivers). BLAKE3 hashes ~8 GB/s per core here, SHA-256 ~1 GB/s
        store = LocalStore(root=root, capacity_bytes=self.store_capacity, hash_code=BLAKE3)
        self.store = store
        serialization.set_store(store)

    async def listen_for_drivers(self, path: str) -> str:
        """Accept drivers on a Unix socket (owner-only permissions); returns its path."""
        return await self.workers.listen_for_drivers(path)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run ``coro`` on the node's loop in the background (cancelled when the node stops)."""
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def worker_pids(self) -> list[int]:
        return self.workers.pids()

    # ------------------------------------------------------------------ client ops
    def handle_post(self, message: dict, client: Any) -> None:
        """A fire-and-forget operation of a client (see client.py)."""
        handler = self._post_handlers.get(message["op"])
        if handler is not None:
            handler(message, client)

    async def handle_request(self, message: dict, client: Any) -> dict:
        """A client's request; the reply is a map (``error``: a pickled exception)."""
        op = message["op"]
        if op == "get":
            return await self.objects.get(message)
        if op == "wait":
            return await self.objects.wait(message)
        if op == "stream_next":
            return await self.streams.next(message, client)
        if op == "cid":
            return await self.objects.cid(message)
        if op == "get_cid":
            return await self.objects.get_by_cid(message)
        if op == "create_actor":
            refusal = self.submit_refusal()
            if refusal is not None:
                return {"error": error_blob(NotPermittedError(refusal))}
            return await self.actors.create_request(message, client)
        if op == "revoke":  # a revocation signed by the mesh key, to spread (`latticaray revoke`)
            if self.remote is None:
                return {"error": error_blob(RuntimeError("this node is not part of a mesh"))}
            try:
                return {"subjects": self.remote.membership.publish_revocation(message["text"])}
            except (CredentialError, ValueError, KeyError) as exc:
                return {"error": error_blob(exc)}
        if op == "ipfs":  # latticaray.util.ipfs: share with IPFS peers (init(ipfs=True))
            if self.ipfs is None:
                from latticaray.runtime.ipfsshare import NOT_ENABLED

                return {"error": error_blob(RuntimeError(NOT_ENABLED))}
            return await self.ipfs.handle(message)
        if op == "get_actor":
            return await self.actors.get_actor(message)
        if op == "nodes":
            return {"nodes": self.nodes()}
        if op == "keep":  # `latticaray put`: the node itself holds the object from now on
            if not self.refs.hold(message["oid"], self.node_id):
                return {"error": error_blob(LookupError("no such object on this node"))}
            return {}
        if op == "pg":  # placement groups (latticaray.util.placement_group)
            try:
                if message.get("do") == "wait":
                    timeout = min(float(message.get("timeout", 0)), 3600.0)
                    wanted = str(message.get("id", ""))
                    return {"ok": await self.resources.wait_created(wanted, timeout)}
                return self.resources.handle(message, client)
            except ValueError as exc:  # PlacementGroupError included
                return {"error": error_blob(exc)}
        if op == "state":  # the state API (latticaray.util.state) of a driver of this node
            snapshot = await gather(
                self.state_source,
                limit=max(0, min(int(message.get("limit", 100)), MAX_ROWS)),
                timeout=max(0.1, min(float(message.get("timeout", 10.0)), 120.0)),
                remote=bool(message.get("remote", True)),
            )
            return {"snapshot": encode_snapshot(snapshot)}
        return {"error": error_blob(ValueError(f"unknown runtime request {op!r}"))}

    def submit_refusal(self) -> str | None:
        """Why this node may not take work from its clients (its mesh credential's role does
        not allow submitting: an observer), or None."""
        remote = self.remote
        if remote is None:
            return None
        return remote.membership.submit_refusal()

    # ------------------------------------------------------------------ cluster view
    def local_view(self) -> dict:
        return {
            "NodeID": self.node_id,
            "Alive": True,
            "Resources": self.total_resources,
            "Available": self.ledger.available,
            "Workers": len(self.workers.task_workers),
            "Actors": self.actors.alive_count(),
        }

    def nodes(self) -> list[dict]:
        if self.remote is not None:
            return self.remote.membership.nodes()
        return [self.local_view()]
