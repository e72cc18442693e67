"""Reference counting across processes and nodes (in the spirit of Ray's test_reference_counting).

A driver node plus node processes on loopback. Each test makes an object large enough to live in
a shared-memory store, moves refs to it around (inside other objects, into tasks and actors on
other nodes, back inside results) and checks on the owner that the object stays while anything
references it and is deleted from the store once nothing does, including when the borrowing node
is killed.
"""

import asyncio
import gc
import time

import msgpack
import numpy as np
import pytest
from meshutil import NodeProcess, driver_with_nodes, wait_for

import latticaray as lattica
from latticaray.mesh.errors import RpcError
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.runtime import api, context, refcount, serialization
from latticaray.runtime.remote.wire import REF_PROTOCOL

N = 300_000  # 2.4 MB of float64: above the store threshold


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(2) as cluster:
        yield cluster


def on(node_id: str):
    return lattica.NodeAffinitySchedulingStrategy(node_id)


def drop_refs() -> None:
    """Finalize unreachable refs and send their releases to the node now."""
    gc.collect()
    context.current_core().flush_releases()


def owner_node():
    return api._runtime.node


def in_driver_store(cid: str) -> bool:
    return owner_node().store.contains(cid)


@lattica.remote
def sum_first(refs):
    return float(lattica.get(refs[0]).sum())


@lattica.remote
def in_store_here(cid):
    return serialization.get_store().contains(cid)


@lattica.remote
def make_nested(value):
    ref = lattica.put(np.full(N, float(value)))
    return [ref, ref.cid]  # the CID in the owner's store


@lattica.remote
class Gate:
    def __init__(self):
        self.opened = False

    def open(self):
        self.opened = True

    def is_open(self):
        return self.opened


@lattica.remote
def hold_until_open(refs, gate):
    deadline = time.monotonic() + 60
    while not lattica.get(gate.is_open.remote()):
        if time.monotonic() > deadline:
            raise TimeoutError("the gate was never opened")
        time.sleep(0.02)
    return [float(lattica.get(refs[0]).sum()), refs[0]]


@lattica.remote
class Holder:
    def hold(self, refs):
        self.refs = refs
        return lattica.get_runtime_context().node_id

    def total(self):
        return float(lattica.get(self.refs[0]).sum())

    def drop(self):
        self.refs = None
        return True


def test_object_inside_another_lives_until_the_outer_is_released(mesh):
    x = lattica.put(np.ones(N))
    cid, xid = x.cid, x.id
    outer = lattica.put([x])
    del x
    drop_refs()
    # the outer object keeps it: readable here and from a task on another node
    inner = lattica.get(outer)[0]
    assert float(lattica.get(inner).sum()) == N
    del inner
    drop_refs()
    assert (
        lattica.get(
            sum_first.options(scheduling_strategy=on(mesh["nodes"][0].node_id)).remote(outer),
            timeout=60,
        )
        == N
    )
    assert in_driver_store(cid) and xid in owner_node().objects.entries
    del outer
    drop_refs()
    wait_for(
        lambda: not in_driver_store(cid) and xid not in owner_node().objects.entries,
        20,
        "the inner object to be released with the outer one",
    )


def test_nested_ref_in_local_task_args_does_not_free_callers_object(mesh):
    x = lattica.put(np.ones(N))
    cid = x.cid
    here = on(mesh["driver"])
    # the worker deserializes and drops its copy; the driver's own ref must still count
    assert lattica.get(sum_first.options(scheduling_strategy=here).remote([x]), timeout=60) == N
    assert lattica.get(sum_first.options(scheduling_strategy=here).remote([x]), timeout=60) == N
    assert float(lattica.get(x).sum()) == N
    del x
    drop_refs()
    wait_for(lambda: not in_driver_store(cid), 20, "the object to be released")


@lattica.remote
def total_len(blob):
    return len(blob)


def test_ref_argument_outlives_the_callers_ref_until_the_task_ran(mesh):
    # 300 KiB: inline (not in the store) and fetched by the executor from the owner by id
    strategy = on(mesh["nodes"][0].node_id)
    results = []
    for i in range(5):
        x = lattica.put(bytes([i]) * (300 << 10))
        results.append(total_len.options(scheduling_strategy=strategy).remote(x))
        del x
        drop_refs()
    assert lattica.get(results, timeout=60) == [300 << 10] * 5
    wait_for(lambda: not owner_node().refs.task_pins, 10, "the tasks' argument pins to go")


def test_ref_held_by_an_actor_on_another_node(mesh):
    other = mesh["nodes"][1].node_id
    holder = Holder.options(scheduling_strategy=on(other)).remote()
    x = lattica.put(np.full(N, 2.0))
    cid, xid = x.cid, x.id
    assert lattica.get(holder.hold.remote([x]), timeout=60) == other
    del x
    drop_refs()
    # only the borrower (the actor's node) keeps it alive now
    assert lattica.get(holder.total.remote(), timeout=60) == 2.0 * N
    assert in_driver_store(cid)
    assert other in owner_node().refs.borrowers.get(xid, ())
    assert lattica.get(holder.drop.remote(), timeout=30)
    wait_for(
        lambda: not in_driver_store(cid) and xid not in owner_node().objects.entries,
        20,
        "the object to be released after the borrower dropped it",
    )
    lattica.kill(holder)


def test_ref_returned_inside_a_result_lives_on_its_owner_until_dropped(mesh):
    other = mesh["nodes"][0].node_id
    lst = lattica.get(make_nested.options(scheduling_strategy=on(other)).remote(3), timeout=60)
    ref, cid = lst
    assert ref.owner == other
    probe = in_store_here.options(scheduling_strategy=on(other))
    assert float(lattica.get(ref, timeout=60).sum()) == 3.0 * N
    assert lattica.get(probe.remote(cid), timeout=30)
    del lst, ref
    drop_refs()
    wait_for(
        lambda: not lattica.get(probe.remote(cid), timeout=30),
        20,
        "the owner node to delete the object once the driver dropped its refs",
    )


def test_killed_borrower_node_does_not_pin_an_object(mesh):
    extra = NodeProcess(mesh["addr"], mesh["invite"])
    try:
        wait_for(
            lambda: any(
                n["NodeID"] == extra.node_id and n["Alive"] and n.get("Resources")
                for n in lattica.nodes()
            ),
            30,
            "the extra node",
        )
        holder = Holder.options(scheduling_strategy=on(extra.node_id)).remote()
        x = lattica.put(np.full(N, 5.0))
        cid, xid = x.cid, x.id
        assert lattica.get(holder.hold.remote([x]), timeout=60) == extra.node_id
        del x
        drop_refs()
        assert lattica.get(holder.total.remote(), timeout=60) == 5.0 * N
        assert extra.node_id in owner_node().refs.borrowers.get(xid, ())
        extra.kill9()
        wait_for(
            lambda: not in_driver_store(cid) and xid not in owner_node().objects.entries,
            20,
            "the object borrowed by the killed node to be released",
        )
    finally:
        extra.stop()


def test_ref_passed_to_a_task_on_another_node_lives_while_it_runs(mesh):
    other = mesh["nodes"][1].node_id
    gate = Gate.options(scheduling_strategy=on(mesh["driver"])).remote()
    x = lattica.put(np.full(N, 4.0))
    cid, xid = x.cid, x.id
    result = hold_until_open.options(scheduling_strategy=on(other)).remote([x], gate)
    del x
    drop_refs()
    lattica.get(gate.is_open.remote(), timeout=30)  # the node has taken in the release
    assert in_driver_store(cid) and xid in owner_node().objects.entries
    gate.open.remote()
    total, back = lattica.get(result, timeout=60)
    assert total == 4.0 * N
    # the task returned the ref inside its result: the result keeps it now
    del result
    drop_refs()
    assert float(lattica.get(back).sum()) == 4.0 * N
    del back
    drop_refs()
    wait_for(
        lambda: not in_driver_store(cid) and xid not in owner_node().objects.entries,
        20,
        "the object to be released once the task and its result are gone",
    )
    lattica.kill(gate)


def test_dead_worker_gives_back_its_refs(mesh):
    holder = Holder.options(scheduling_strategy=on(mesh["driver"])).remote()
    x = lattica.put(np.full(N, 6.0))
    cid = x.cid
    assert lattica.get(holder.hold.remote([x]), timeout=60) == mesh["driver"]
    del x
    drop_refs()
    assert lattica.get(holder.total.remote(), timeout=60) == 6.0 * N
    assert in_driver_store(cid)
    lattica.kill(holder)  # its worker process is killed without releasing anything
    wait_for(lambda: not in_driver_store(cid), 20, "the dead worker's refs to be released")


def test_non_member_cannot_borrow_or_release(mesh):
    """Registrations are refused before decoding when the caller is not a member."""
    x = lattica.put(np.ones(N))
    cid, oid = x.cid, x.id

    async def attempt():
        stranger = MeshNode(MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"]))
        await stranger.start()
        try:
            peer = await stranger.connect(mesh["addr"], timeout=10)
            try:
                await stranger.call(
                    peer,
                    REF_PROTOCOL,
                    msgpack.packb({"ops": [[1, oid]]}, use_bin_type=True),
                    timeout=10,
                )
            except RpcError as exc:
                return exc.code
            return "accepted"
        finally:
            await stranger.stop()

    assert asyncio.run(attempt()) == "PERMISSION_DENIED"
    assert x.id not in owner_node().refs.borrowers
    del x
    drop_refs()
    wait_for(lambda: not in_driver_store(cid), 20, "the object to be released (no stranger pin)")


# ---------------------------------------------------------------------- RefTable on its own
class FakeClient:
    kind = "worker"

    def __init__(self):
        refcount.track_holds(self)


class FakeRemote:
    """What RefTable uses of a RemoteRuntime: ``refs.call`` and ``membership.is_alive``."""

    def __init__(self):
        self.calls = []
        self.alive = {"owner-node"}
        self.refs = self.membership = self

    def is_alive(self, node_id):
        return node_id in self.alive

    async def call(self, owner, ops):
        self.calls.append((owner, [list(op) for op in ops]))


class FakeObjects:
    def __init__(self, node):
        self.node = node
        self.entries = {}

    def free(self, oids):
        for oid in oids:
            if self.entries.pop(oid, None) is not None:
                self.node.freed.append(oid)


class FakeNode:
    """What RefTable uses of a RuntimeNode."""

    def __init__(self):
        self.node_id = "this-node"
        self.objects = FakeObjects(self)
        self.freed = []
        self.remote = FakeRemote()

    def spawn(self, coro):
        return asyncio.get_running_loop().create_task(coro)


def table_with(*oids):
    node = FakeNode()
    table = refcount.RefTable(node)
    creator = FakeClient()
    for oid in oids:
        node.objects.entries[oid] = object()
        table.create(oid, creator)
    return node, table, creator


def test_table_containment_frees_inner_after_outer():
    node, table, creator = table_with(b"inner", b"outer")
    table.contain(b"outer", [[b"inner", "this-node"]])
    table.release([b"inner"], creator)
    assert node.freed == []
    table.release([b"outer"], creator)
    assert node.freed == [b"outer", b"inner"]
    assert not table.counts and not table.contents


def test_table_borrower_keeps_object_until_it_unborrows_or_dies():
    node, table, creator = table_with(b"x", b"y")
    table.on_ops("peer-b", [[refcount.BORROW, b"x"], [refcount.BORROW, b"y"]])
    table.release([b"x", b"y"], creator)
    assert node.freed == [] and table.counts == {b"x": 0, b"y": 0}
    table.on_ops("peer-b", [[refcount.UNBORROW, b"x"]])
    assert node.freed == [b"x"]
    table.node_gone("peer-b")
    assert node.freed == [b"x", b"y"]
    table.on_ops("peer-c", [[refcount.BORROW, b"x"]])  # too late: already released
    assert b"x" not in table.borrowers


def test_table_dead_process_gives_back_its_holds():
    node, table, creator = table_with(b"x")
    worker = FakeClient()
    table.hold(b"x", "this-node", worker)
    table.hold(b"x", "this-node", worker)
    table.release([b"x"], creator)
    assert node.freed == []
    table.client_gone(worker)
    assert node.freed == [b"x"]


def test_table_registers_borrows_with_the_owner_in_order():
    async def scenario():
        node = FakeNode()
        table = refcount.RefTable(node)
        table.hold(b"r", "owner-node")
        table.hold(b"r", "owner-node")
        table.unhold(b"r")
        table.unhold(b"r")
        table.hold(b"r", "owner-node")
        assert table.unsettled()
        await table.settled()
        assert not table.unsettled()
        return node.remote.calls

    calls = asyncio.run(scenario())
    ops = [op for owner, batch in calls for op in batch]
    assert {owner for owner, _ in calls} == {"owner-node"}
    assert ops == [[1, b"r"], [0, b"r"], [1, b"r"]]


def test_table_forwarded_results_held_until_the_caller_acknowledges():
    node, table, creator = table_with(b"inner", b"result")
    table.contain(b"result", [[b"inner", "this-node"]])
    table.release([b"inner"], creator)
    assert table.forward(b"task", "caller", [b"result"]) == [[b"inner", "this-node"]]
    table.held(b"task", "someone-else")
    assert node.freed == []
    table.held(b"task", "caller")
    assert node.freed == [b"inner"]
