"""RemoteRuntime: the part of a RuntimeNode that reaches other nodes of the mesh.

It is composed of parts, one role each (this package):

  membership  Membership     admission, renewal, revocation, peers' views and liveness
                             (admit/1, renew/1, runtime-view/1)
  placer      Placer         where a task or actor runs (scheduler policy over the views)
  capacity    DhtPlacement   nodes found through DHT capacity ads; work waiting for capacity
  caller      Caller         task sessions to peers: work out, results in (task/1, caller side)
  executor    Executor       task sessions from peers: work in, results out (task/1, executor)
  dedup       TaskDedup      work a caller sends again is not run twice
  objects     RemoteObjects  arguments on the wire, fetches by id and CID (object/1)
  actors      OwnedActors    actors this node owns on other nodes
  names       NameService    named actors: claims and lookups at the name's arbiter (names/1);
                             the records it arbitrates are arbiter.py's NameArbiterCore
  refs        RemoteRefs     borrow registrations at owners (ref/1), `held`
  streams     RemoteStreams  stream items from another owner (stream/1)
  observe     RemoteObserve  state reports and worker output of members (report/1, logs/1)

It is the "remote" side, as opposed to the node's local parts (local/); it was called
MeshCluster. `MeshRuntime` (mesh_runtime.py) starts it next to the mesh services.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from latticaray.runtime.admission import Admission
from latticaray.runtime.remote.actors import OwnedActors
from latticaray.runtime.remote.caller import Caller
from latticaray.runtime.remote.dedup import TaskDedup
from latticaray.runtime.remote.executor import Executor
from latticaray.runtime.remote.membership import Membership
from latticaray.runtime.remote.names import NameService
from latticaray.runtime.remote.objects import RemoteObjects
from latticaray.runtime.remote.observe import RemoteObserve
from latticaray.runtime.remote.placement import Placer
from latticaray.runtime.remote.refs import RemoteRefs
from latticaray.runtime.remote.streams import RemoteStreams
from latticaray.runtime.remote.wire import (
    ADMIT_PROTOCOL,
    NAMES_PROTOCOL,
    OBJECT_PROTOCOL,
    REF_PROTOCOL,
    RENEW_PROTOCOL,
    STREAM_PROTOCOL,
    TASK_PROTOCOL,
    VIEW_PROTOCOL,
)

if TYPE_CHECKING:
    from latticaray.mesh.node import MeshNode
    from latticaray.runtime.node import RuntimeNode
    from latticaray.runtime.remote.capacity import DhtPlacement


class RemoteRuntime:
    """Placement across peers, remote execution, object fetches and admission for one node."""

    def __init__(self, node: RuntimeNode, mesh: MeshNode, admission: Admission):
        self.node = node
        self.mesh = mesh
        self.node_id = node.node_id
        self.loop = asyncio.get_running_loop()
        self.stats: collections.Counter = collections.Counter()
        self.state: Any = None  # latticaray.state StateService: members, named-actor claims
        self.exchange: Any = None  # latticaray.objectstore ObjectExchange: store objects
        self.capacity: DhtPlacement | None = None  # candidates from DHT capacity ads
        self.sparse = False  # meet peers only when needed: no admission on connect/introduction
        # the node embedded in a driver process (init()): it ends with the driver, so a detached
        # actor is placed on another node when one can host it
        self.embedded = False
        self.stopped = False
        self._tasks: set[asyncio.Task] = set()
        self.membership = Membership(self, admission)
        self.placer = Placer(self)
        self.caller = Caller(self)
        self.executor = Executor(self)
        self.dedup = TaskDedup(self)
        self.objects = RemoteObjects(self)
        self.actors = OwnedActors(self)
        self.names = NameService(self)
        self.refs = RemoteRefs(self)
        self.streams = RemoteStreams(self)
        self.observe = RemoteObserve(self)

    def register(self) -> None:
        mesh = self.mesh
        membership = self.membership
        mesh.register_unary(ADMIT_PROTOCOL, membership.serve_admit)
        mesh.register_unary(RENEW_PROTOCOL, membership.serve_renew)
        mesh.register_unary(VIEW_PROTOCOL, membership.serve_view)
        mesh.register_bidi(TASK_PROTOCOL, self.executor.serve_session)
        mesh.register_server_stream(OBJECT_PROTOCOL, self.objects.serve_object)
        mesh.register_unary(REF_PROTOCOL, self.refs.serve)
        mesh.register_unary(NAMES_PROTOCOL, self.names.serve)
        mesh.register_unary(STREAM_PROTOCOL, self.streams.serve)
        self.observe.register()
        mesh.on_peer_connected(self._peer_connected)
        mesh.on_peer_disconnected(membership.disconnected)
        mesh.connections.on_connection_added(self.caller.on_connection_added)
        self.spawn(membership.view_loop())
        self.spawn(membership.credential_loop())

    def _peer_connected(self, peer: Any) -> None:
        self.membership.connected(peer)
        if not self.sparse:  # a sparse node admits peers only when it needs them
            self.spawn(self.membership.admit_with(peer))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        if not self.stopped:
            try:
                await self.membership.leave()
            except Exception:  # a peer that cannot be told finds out by its liveness window
                pass
        self.stopped = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.objects.same_host.close()
