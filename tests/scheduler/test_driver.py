"""SchedulerDriver over an in-process fake mesh (no sockets): /latticaray/sched/1 end to end."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from latticaray.mesh.errors import RpcError
from latticaray.mesh.rpc import Status
from latticaray.scheduler.advertiser import CapacityAd
from latticaray.scheduler.core import SchedulerConfig, SchedulerCore, StartLocal
from latticaray.scheduler.driver import SCHED_PROTOCOL, SchedulerDriver
from latticaray.scheduler.errors import UnschedulableError
from latticaray.scheduler.neighbourhood import ViewPublisher
from latticaray.scheduler.placement_groups import STRICT_SPREAD, GroupCreated
from latticaray.scheduler.policy import NodeView, PlacementRequest
from latticaray.scheduler.resources import ResourceLedger


class Ctx:
    def __init__(self, peer_id):
        self.peer_id = peer_id


class FakePeerId(str):
    @classmethod
    def from_string(cls, s):
        return cls(s)


class FakeMesh:
    """Routes node.call(peer, service, payload) to the handler registered by that peer."""

    def __init__(self):
        self.handlers = {}
        self.calls = []

    def node(self, name):
        mesh = self

        class Node:
            peer_id = FakePeerId(name)

            def register_unary(self, service, handler):
                mesh.handlers[(name, service)] = handler

            def unregister(self, service):
                mesh.handlers.pop((name, service), None)

            async def call(self, peer, service, payload, timeout=None):
                handler = mesh.handlers.get((str(peer), service))
                mesh.calls.append((name, str(peer), msgpack.unpackb(payload).get("op")))
                if handler is None:
                    from latticaray.mesh.errors import PeerUnreachable

                    raise PeerUnreachable(f"no {peer}")
                return await asyncio.wait_for(handler(Ctx(name), payload), timeout)

        return Node()


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


class Node:
    """A driver with its core; StartLocal actions recorded (and run for ``hold`` seconds)."""

    def __init__(self, mesh, name, resources, hold=None, **kw):
        self.core = SchedulerCore(name, ResourceLedger(resources), **kw)
        self.started = []
        self.actions = []
        self.hold = hold
        self.driver = SchedulerDriver(
            mesh.node(name),
            self.core,
            on_action=self._on_action,
            publisher=ViewPublisher(min_interval=0.01),
        )
        self.driver.start()

    def _on_action(self, action):
        self.actions.append(action)
        if isinstance(action, StartLocal):
            key = action.request.task_id
            self.started.append((key, self.driver.meta_of(key)))
            if self.hold is not None:
                asyncio.get_running_loop().call_later(self.hold, self.driver.finish, key)


async def test_offers_queue_fairly_by_authenticated_caller_and_views_are_served():
    mesh = FakeMesh()
    a = Node(mesh, "A", {"CPU": 1, "GPU": 1}, config=SchedulerConfig(queue_limit=10))
    handler = mesh.handlers[("A", SCHED_PROTOCOL)]
    reply = msgpack.unpackb(
        await handler(
            Ctx("X"),
            pack({"v": 1, "op": "offer", "task": "t1", "res": {"CPU": 1, "GPU": 1}, "meta": b"m"}),
        )
    )
    assert reply["kind"] == "started" and reply["gpus"] == "0"
    assert a.started == [("X:t1", b"m")]
    for i in range(3):
        await handler(Ctx("X"), pack({"v": 1, "op": "offer", "task": f"x{i}", "res": {"CPU": 1}}))
    # a claimed submitter is ignored: fairness is by the caller's authenticated id
    await handler(
        Ctx("Y"), pack({"v": 1, "op": "offer", "task": "y0", "res": {"CPU": 1}, "submitter": "X"})
    )
    assert a.core.local.queued == 4
    a.driver.finish("X:t1")
    a.driver.finish("X:x0")
    assert [k for k, _ in a.started[1:]] == ["X:x0", "Y:y0"]
    view = msgpack.unpackb(await handler(Ctx("Z"), pack({"v": 1, "op": "view"})))
    ad = CapacityAd.decode(view["ad"], publisher="A")
    assert ad.running == 1 and ad.queued == 2
    await a.driver.stop()


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        b"x" * 20_000,
        pack([1, 2]),
        pack({"v": 2}),
        pack({"v": 1, "op": "nope"}),
        pack({"v": 1, "op": "offer", "task": "", "res": {}}),
        pack({"v": 1, "op": "offer", "task": "t", "res": {"CPU": -1}}),
        pack({"v": 1, "op": "offer", "task": "t", "res": {"CPU": 1}, "sel": {"k": 5}}),
        pack({"v": 1, "op": "offer", "task": "t", "res": {"CPU": 1}, "meta": b"x" * 5000}),
        pack({"v": 1, "op": "offer", "task": "t", "res": {"CPU": 1}, "bundle": ["g"]}),
        pack(
            {
                "v": 1,
                "op": "prepare",
                "group": "g",
                "index": 0,
                "res": {"CPU": 1},
                "attempt": 1,
                "lease": 1e9,
            }
        ),
        pack({"v": 1, "op": "push", "ad": b"junk"}),
    ],
)
async def test_bad_requests_get_a_clear_error_and_the_node_keeps_working(payload):
    mesh = FakeMesh()
    a = Node(mesh, "A", {"CPU": 1})
    handler = mesh.handlers[("A", SCHED_PROTOCOL)]
    reply = msgpack.unpackb(await handler(Ctx("X"), payload))
    assert reply["error"] == "bad_request" and reply["message"]
    ok = msgpack.unpackb(
        await handler(Ctx("X"), pack({"v": 1, "op": "offer", "task": "t", "res": {"CPU": 1}}))
    )
    assert ok["kind"] == "started" and a.driver.stats["bad_requests"] == 1
    await a.driver.stop()


async def test_non_members_are_refused_unread():
    mesh = FakeMesh()
    core = SchedulerCore("A", ResourceLedger({"CPU": 1}))
    driver = SchedulerDriver(mesh.node("A"), core, allowed=lambda peer: peer != "outsider")
    driver.start()
    with pytest.raises(RpcError, match="refused unread") as refused:
        await mesh.handlers[("A", SCHED_PROTOCOL)](Ctx("outsider"), b"\xc1 not even msgpack")
    assert refused.value.code == Status.PERMISSION_DENIED and core.local.running == 0
    await driver.stop()


async def test_placement_spills_over_unreachable_and_rejecting_nodes():
    mesh = FakeMesh()
    good = Node(mesh, "good", {"CPU": 2}, config=SchedulerConfig(queue_limit=0))
    busy = Node(mesh, "busy", {"CPU": 2}, config=SchedulerConfig(queue_limit=0))
    busy.core.offer(PlacementRequest("fill", {"CPU": 2}, "other"), 0)
    d = Node(mesh, "d", {}, config=SchedulerConfig(capacity_wait=0.5, retry_interval=0.05), seed=3)
    now = d.driver.now()
    stale_busy = NodeView("busy", {"CPU": 2}, {"CPU": 2}, queue_limit=0, ad_time=now)
    ghost = NodeView("ghost", {"CPU": 64}, {"CPU": 64}, ad_time=now)  # advertised, unreachable
    for view in (good.core.local.view(now), stale_busy, ghost):
        d.driver.on_view(view)
    placed = await asyncio.gather(
        *(d.driver.place(PlacementRequest(f"t{i}", {"CPU": 1}, "d"), timeout=10) for i in range(2))
    )
    assert {p.node_id for p in placed} == {"good"}
    with pytest.raises(UnschedulableError):
        await d.driver.place(PlacementRequest("huge", {"CPU": 1000}, "d"), timeout=10)
    with pytest.raises(asyncio.TimeoutError):  # everything full: waits, then the caller gives up
        await d.driver.place(PlacementRequest("later", {"CPU": 1}, "d"), timeout=0.5)
    assert d.core.submitter.waiting == 0 and d.core.submitter.in_flight == 0
    for n in (good, busy, d):
        await n.driver.stop()


async def test_subscribers_get_pushed_views_when_load_changes():
    mesh = FakeMesh()
    a = Node(mesh, "A", {"CPU": 2})
    d = Node(mesh, "d", {})
    d.driver.apply(d.core.add_neighbour("A", d.driver.now()))
    await asyncio.sleep(0.05)
    assert ("d", "A", "sub") in mesh.calls and "A" in d.core.snapshot.nodes
    assert d.core.snapshot.nodes["A"].available["CPU"] == 2.0
    handler = mesh.handlers[("A", SCHED_PROTOCOL)]
    for i in range(2):
        await handler(Ctx("X"), pack({"v": 1, "op": "offer", "task": f"x{i}", "res": {"CPU": 1}}))
    deadline = asyncio.get_running_loop().time() + 5
    while d.core.snapshot.nodes["A"].available.get("CPU", 0.0) != 0.0:
        assert asyncio.get_running_loop().time() < deadline, "no push arrived"
        await asyncio.sleep(0.01)
    assert a.driver.stats["pushes"] >= 1
    await a.driver.stop()
    await d.driver.stop()


async def test_placement_group_across_drivers_and_owner_checked_release():
    mesh = FakeMesh()
    nodes = [Node(mesh, f"N{i}", {"CPU": 2}) for i in range(3)]
    owner = Node(mesh, "O", {})
    for n in nodes:
        owner.driver.apply(owner.core.add_neighbour(n.core.node_id, owner.driver.now()))
    await asyncio.sleep(0.05)
    owner.driver.apply(
        owner.core.create_group("g", [{"CPU": 2}] * 3, STRICT_SPREAD, owner.driver.now())
    )
    deadline = asyncio.get_running_loop().time() + 5
    while not any(isinstance(a, GroupCreated) for a in owner.actions):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    created = next(a for a in owner.actions if isinstance(a, GroupCreated))
    assert sorted(created.nodes) == ["N0", "N1", "N2"]
    assert all(len(n.core.local.bundles) == 1 for n in nodes)
    # another member cannot release the owner's bundles
    handler = mesh.handlers[("N0", SCHED_PROTOCOL)]
    await handler(Ctx("intruder"), pack({"v": 1, "op": "release", "group": "g"}))
    assert len(nodes[0].core.local.bundles) == 1
    owner.driver.apply(owner.core.remove_group("g", owner.driver.now()))
    await asyncio.sleep(0.05)
    assert all(len(n.core.local.bundles) == 0 for n in nodes)
    for n in [*nodes, owner]:
        await n.driver.stop()
