"""SchedulerService and SchedulerClient against an in-process fake node (no sockets)."""

import asyncio

import msgpack
import pytest

from latticaray.scheduler.advertiser import CapacityAd
from latticaray.scheduler.errors import UnschedulableError
from latticaray.scheduler.local import AdmissionKind, LocalScheduler
from latticaray.scheduler.policy import PlacementPolicy, PlacementRequest
from latticaray.scheduler.resources import ResourceLedger
from latticaray.scheduler.service import SCHED_PROTOCOL, SchedulerClient, SchedulerService


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
                if handler is None:
                    from latticaray.mesh.errors import PeerUnreachable

                    raise PeerUnreachable(f"no {peer}")
                return await asyncio.wait_for(handler(Ctx(name), payload), timeout)

        return Node()


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


async def test_offer_view_queue_and_fairness_by_authenticated_peer():
    mesh = FakeMesh()
    node = mesh.node("A")
    started = []
    local = LocalScheduler("A", ResourceLedger({"CPU": 1, "GPU": 1}), queue_limit=10)
    service = SchedulerService(node, local, on_start=lambda key, meta: started.append((key, meta)))
    handler = mesh.handlers[("A", SCHED_PROTOCOL)]

    reply = msgpack.unpackb(
        await handler(
            Ctx("X"),
            pack({"v": 1, "op": "offer", "task": "t1", "res": {"CPU": 1, "GPU": 1}, "meta": b"m1"}),
        )
    )
    assert reply["kind"] == "started" and reply["gpus"] == "0"
    assert started == [("X:t1", b"m1")]
    # The claimed submitter is ignored; fairness is by the caller's authenticated id.
    for i in range(3):
        await handler(Ctx("X"), pack({"v": 1, "op": "offer", "task": f"x{i}", "res": {"CPU": 1}}))
    await handler(
        Ctx("Y"), pack({"v": 1, "op": "offer", "task": "y0", "res": {"CPU": 1}, "submitter": "X"})
    )
    assert local.queued == 4
    service.finish("X:t1")
    service.finish("X:x0")
    assert [k for k, _ in started[1:]] == ["X:x0", "Y:y0"]
    view = msgpack.unpackb(await handler(Ctx("Z"), pack({"v": 1, "op": "view"})))
    ad = CapacityAd.decode(view["ad"], publisher="A")
    assert ad.running == 1 and ad.queued == 2
    service.cancel("X:x2")  # queued: dropped, nothing starts
    service.cancel("Y:y0")  # running: ends, the next queued one starts
    assert [k for k, _ in started[3:]] == ["X:x1"] and local.queued == 0
    await service.close()


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
    ],
)
async def test_bad_requests_get_a_clear_error_and_the_node_keeps_working(payload):
    mesh = FakeMesh()
    local = LocalScheduler("A", ResourceLedger({"CPU": 1}))
    service = SchedulerService(mesh.node("A"), local)
    handler = mesh.handlers[("A", SCHED_PROTOCOL)]
    reply = msgpack.unpackb(await handler(Ctx("X"), payload))
    assert reply["error"] == "bad_request" and reply["message"]
    ok = msgpack.unpackb(
        await handler(Ctx("X"), pack({"v": 1, "op": "offer", "task": "t", "res": {"CPU": 1}}))
    )
    assert ok["kind"] == "started" and service.bad_requests == 1


async def test_client_spills_over_unreachable_and_rejecting_nodes():
    mesh = FakeMesh()
    good = LocalScheduler("good", ResourceLedger({"CPU": 2}), queue_limit=0)
    busy = LocalScheduler("busy", ResourceLedger({"CPU": 2}), queue_limit=0)
    busy.offer(PlacementRequest("fill", {"CPU": 2}, "other"), 0)
    services = [
        SchedulerService(mesh.node("good"), good),
        SchedulerService(mesh.node("busy"), busy),
    ]
    stale = [good.view(0), busy.view(0)]
    stale[1] = type(stale[1])("busy", {"CPU": 2}, {"CPU": 2}, queue_limit=0)  # stale: looks idle
    ghost = type(stale[1])("ghost", {"CPU": 64}, {"CPU": 64})  # advertised, but unreachable
    client = SchedulerClient(
        mesh.node("driver"),
        views=lambda: [*stale, ghost],
        policy=PlacementPolicy(seed=3),
        call_timeout=1.0,
        infeasible_timeout=0.5,
        refresh_interval=0.05,
    )
    try:
        placed = await asyncio.gather(
            *(
                client.place(PlacementRequest(f"t{i}", {"CPU": 1}, "d"), timeout=10)
                for i in range(2)
            )
        )
        assert {p.node_id for p in placed} == {"good"}
        assert all(p.admission.kind is AdmissionKind.STARTED for p in placed)
        with pytest.raises(UnschedulableError):
            await client.place(PlacementRequest("huge", {"CPU": 1000}, "d"), timeout=10)
        with pytest.raises(
            asyncio.TimeoutError
        ):  # everything full: waits, then the caller gives up
            await client.place(PlacementRequest("later", {"CPU": 1}, "d"), timeout=0.5)
        assert client.submitter.waiting == 0 and client.submitter.in_flight == 0
    finally:
        await client.close()
        for s in services:
            await s.close()


async def test_small_meshes_use_the_member_view_large_ones_also_the_dht():
    from latticaray.scheduler.policy import NodeView

    class Sampler:
        calls = 0
        clock = None

        async def candidates(self, demand):
            Sampler.calls += 1
            return [NodeView("dht-node", {"CPU": 1}, {"CPU": 1}, ad_time=0.0)]

    members = [NodeView(f"m{i}", {"CPU": 1}, {"CPU": 1}) for i in range(3)]
    client = SchedulerClient(
        FakeMesh().node("d"), sampler=Sampler(), views=lambda: members, small_mesh_limit=3
    )
    await client.refresh()
    assert Sampler.calls == 0 and set(client.snapshot.nodes) == {"m0", "m1", "m2"}
    members.append(NodeView("m3", {"CPU": 1}, {"CPU": 1}))
    await client.refresh()
    assert Sampler.calls == 1 and "dht-node" in client.snapshot.nodes
    await client.close()


async def test_a_failing_start_hook_releases_the_resources():
    mesh = FakeMesh()
    local = LocalScheduler("A", ResourceLedger({"CPU": 1}))

    def broken(key, meta):
        raise RuntimeError("worker pool is gone")

    service = SchedulerService(mesh.node("A"), local, on_start=broken)
    handler = mesh.handlers[("A", SCHED_PROTOCOL)]
    reply = msgpack.unpackb(
        await handler(Ctx("X"), pack({"v": 1, "op": "offer", "task": "t", "res": {"CPU": 1}}))
    )
    assert reply["kind"] == "started"
    assert local.running == 0 and local.ledger.available == {"CPU": 1}
    await service.close()


async def test_client_fetches_holder_views_it_does_not_know_and_places_there():

    mesh = FakeMesh()
    holder = LocalScheduler("holder", ResourceLedger({"CPU": 2}))
    other = LocalScheduler("other", ResourceLedger({"CPU": 64}))
    services = [
        SchedulerService(mesh.node("holder"), holder),
        SchedulerService(mesh.node("other"), other),
    ]
    # The sampled view knows only "other"; the argument's holder is learned from provider records.
    client = SchedulerClient(
        mesh.node("driver"), views=lambda: [other.view(0)], policy=PlacementPolicy(seed=1)
    )
    client.snapshot.set_object("cid-1", 10 << 20, ["holder", "gone"])
    try:
        placed = await client.place(
            PlacementRequest("t", {"CPU": 1}, "d", args=(("cid-1", 10 << 20),)), timeout=10
        )
        assert placed.node_id == "holder" and placed.local_bytes == 10 << 20
        assert "holder" in client.snapshot.nodes and "gone" not in client.snapshot.nodes
    finally:
        await client.close()
        for s in services:
            await s.close()
