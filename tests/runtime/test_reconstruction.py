"""Lost objects across node processes: other copies first, then re-execution from lineage.

A driver node plus one node process for the whole module; each test that kills a node starts its
own extra node process (B), makes a store-resident value there, kills B with SIGKILL and then
asks for the value. Executions are counted with one line per run in a file under tmp_path.
"""

import gc
import os
import signal
import time

import numpy as np
import pytest
from meshutil import NodeProcess, alive_nodes, driver_with_nodes, wait_for

import latticaray as lattica
from latticaray.runtime import api, context, serialization
from latticaray.runtime.ids import object_id, task_of
from latticaray.runtime.lineage import LineageTable, TaskSpec

N = 400_000  # float64: 3.2 MB, above the store threshold (1 MiB)


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(1) as cluster:
        yield cluster


@pytest.fixture
def node_b(mesh):
    """A node process that the test kills; stopped (and its store removed) in any case."""
    node = NodeProcess(mesh["addr"], mesh["invite"])
    try:
        wait_for(lambda: node.node_id in alive_nodes(), 30, "node B to join")
        yield node
    finally:
        node.stop()


def kill(node: NodeProcess) -> None:
    node.kill9()
    wait_for(lambda: node.node_id not in alive_nodes(), 30, "the driver to see node B gone")


def runs(path) -> list[str]:
    """Node ids of the executions logged to `path`, in order."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


def _log_run(path: str) -> None:
    with open(path, "a") as f:
        f.write(lattica.get_runtime_context().node_id + "\n")


@lattica.remote(max_retries=2)
def make_big(path, k):
    _log_run(path)
    return np.arange(N, dtype=np.float64) * k


@lattica.remote(max_retries=2)
def plus_one(path, array):
    _log_run(path)
    return array + 1


@lattica.remote(max_retries=2)
def plus_one_nested(path, refs):
    _log_run(path)
    return lattica.get(refs[0]) + 1


@lattica.remote
def total(array):
    return float(array.sum())


@lattica.remote
def holds(cid):
    return serialization.get_store().contains(cid)


@lattica.remote
class Maker:
    def big(self, path):
        _log_run(path)
        return np.ones(N)


def on(node: NodeProcess, soft: bool = True) -> lattica.NodeAffinitySchedulingStrategy:
    return lattica.NodeAffinitySchedulingStrategy(node.node_id, soft=soft)


def recovery_stats():
    return api._runtime.node.recovery.stats


def driver_holds(ref) -> bool:
    return serialization.get_store().contains(ref.cid)


def test_lost_return_is_reexecuted_elsewhere(mesh, node_b, tmp_path):
    log = str(tmp_path / "make_big")
    ref = make_big.options(scheduling_strategy=on(node_b)).remote(log, 3)
    ready, _ = lattica.wait([ref], timeout=60)
    assert ready == [ref]
    assert runs(log) == [node_b.node_id]
    assert not driver_holds(ref)  # the only copy is on B, which made it
    kill(node_b)
    with pytest.raises(lattica.GetTimeoutError):  # recovery honours the get's deadline
        lattica.get(ref, timeout=0.5)
    value = lattica.get(ref, timeout=90)
    assert np.array_equal(value, np.arange(N, dtype=np.float64) * 3)
    executions = runs(log)
    assert len(executions) == 2 and executions[1] != node_b.node_id


def test_chain_is_reconstructed_recursively(mesh, node_b, tmp_path):
    first_log, second_log = str(tmp_path / "first"), str(tmp_path / "second")
    first = make_big.options(scheduling_strategy=on(node_b)).remote(first_log, 2)
    second = plus_one.options(scheduling_strategy=on(node_b)).remote(second_log, first)
    ready, _ = lattica.wait([first, second], num_returns=2, timeout=60)
    assert len(ready) == 2
    assert runs(first_log) == [node_b.node_id] and runs(second_log) == [node_b.node_id]
    assert not driver_holds(first) and not driver_holds(second)
    kill(node_b)
    value = lattica.get(second, timeout=120)
    assert np.array_equal(value, np.arange(N, dtype=np.float64) * 2 + 1)
    assert len(runs(first_log)) == 2 and len(runs(second_log)) == 2
    assert node_b.node_id not in runs(first_log)[1:] + runs(second_log)[1:]


@pytest.mark.parametrize("nested", [False, True], ids=["argument", "nested-in-argument"])
def test_released_argument_is_reconstructed_from_kept_lineage(mesh, node_b, tmp_path, nested):
    first_log, second_log = str(tmp_path / "first"), str(tmp_path / "second")
    first = make_big.options(scheduling_strategy=on(node_b)).remote(first_log, 5)
    consumer = plus_one_nested if nested else plus_one
    second = consumer.options(scheduling_strategy=on(node_b)).remote(
        second_log, [first] if nested else first
    )
    assert lattica.wait([second], timeout=60)[0] == [second]
    assert runs(first_log) == [node_b.node_id] and runs(second_log) == [node_b.node_id]
    first_id, first_cid = first.id, first.cid
    node = api._runtime.node
    del first
    gc.collect()
    context.current_core().flush_releases()
    wait_for(lambda: first_id not in node.objects.entries, 20, "the owner to release the argument")
    on_b = holds.options(scheduling_strategy=on(node_b, soft=False))
    wait_for(
        lambda: not lattica.get(on_b.remote(first_cid), timeout=30),
        20,
        "node B to delete the argument's copy",
    )
    assert task_of(first_id) in node.recovery.core.table.specs  # kept by the second task's lineage
    assert not driver_holds(second)
    kill(node_b)
    revived = recovery_stats()["revived"]
    value = lattica.get(second, timeout=120)
    assert np.array_equal(value, np.arange(N, dtype=np.float64) * 5 + 1)
    assert len(runs(first_log)) == 2 and len(runs(second_log)) == 2
    assert node_b.node_id not in runs(first_log)[1:] + runs(second_log)[1:]
    assert recovery_stats()["revived"] == revived + 1
    # the re-created argument was held by the re-run only: it is released again
    wait_for(
        lambda: first_id not in node.objects.entries, 20, "the re-created argument to be released"
    )
    assert task_of(first_id) in node.recovery.core.table.specs
    second_tid = task_of(second.id)
    del second
    gc.collect()
    context.current_core().flush_releases()
    wait_for(lambda: second_tid not in node.recovery.core.table.specs, 20, "the lineage to go")
    assert task_of(first_id) not in node.recovery.core.table.specs


def test_no_retries_means_object_lost(mesh, node_b, tmp_path):
    log = str(tmp_path / "once")
    ref = make_big.options(scheduling_strategy=on(node_b), max_retries=0).remote(log, 1)
    lattica.wait([ref], timeout=60)
    cid = ref.cid
    kill(node_b)
    with pytest.raises(lattica.ObjectLostError) as info:
        lattica.get(ref, timeout=60)
    assert info.value.cid == cid and info.value.object_id == ref.id.hex()
    assert "max_retries=0" in info.value.reason
    assert runs(log) == [node_b.node_id]


def test_actor_output_is_not_reexecuted(mesh, node_b, tmp_path):
    log = str(tmp_path / "actor")
    maker = Maker.options(scheduling_strategy=on(node_b, soft=False)).remote()
    ref = maker.big.remote(log)
    lattica.wait([ref], timeout=60)
    assert runs(log) == [node_b.node_id]
    kill(node_b)
    with pytest.raises(lattica.ObjectLostError) as info:
        lattica.get(ref, timeout=60)
    assert "actor" in info.value.reason
    assert runs(log) == [node_b.node_id]


def test_put_object_comes_from_a_replica_else_is_lost(mesh):
    other = mesh["nodes"][0]
    array = np.arange(N, dtype=np.float64)
    shared = lattica.put(array)
    strategy = lattica.NodeAffinitySchedulingStrategy(other.node_id)
    assert (
        lattica.get(total.options(scheduling_strategy=strategy).remote(shared), timeout=60)
        == array.sum()
    )
    # the task's node fetched a replica into its store
    assert lattica.get(holds.options(scheduling_strategy=strategy).remote(shared.cid), timeout=60)
    store = serialization.get_store()
    fetched = recovery_stats()["fetched_replicas"]
    store.delete(shared.cid)  # as if evicted: the driver (owner) lost its own copy
    assert not driver_holds(shared)
    assert np.array_equal(lattica.get(shared, timeout=60), array)
    assert recovery_stats()["fetched_replicas"] == fetched + 1
    assert driver_holds(shared)

    alone = lattica.put(np.arange(N, dtype=np.float64) + 7)  # no other node has a copy
    cid = alone.cid
    store.delete(cid)
    with pytest.raises(lattica.ObjectLostError) as info:
        lattica.get(alone, timeout=60)
    assert info.value.cid == cid and "put()" in info.value.reason


def test_lineage_budget_and_release():
    table = LineageTable(max_bytes=3 * 1024)
    message = {
        "fn": b"f",
        "name": "f",
        "nret": 1,
        "opts": {},
        "args": ["l", [[0, b"x" * 512], [1, b"o" * 20, "owner"]], {}],
    }
    tids = [bytes([i]) * 16 for i in range(6)]
    for tid in tids:
        table.record(tid, message, 3, 1)
    assert table.bytes <= table.max_bytes
    assert tids[0] not in table.specs and tids[-1] in table.specs
    assert "evicted" in table.why_not(tids[0])
    kept = table.specs[tids[-1]]
    assert kept.msg["args"] is not message["args"]  # resolution may rewrite the original
    assert kept.size == TaskSpec(tids[-1], message, 3, 1).size
    table.released(tids[-1] + bytes(4))
    assert tids[-1] not in table.specs
    table.record(b"z" * 16, message, 0, 1)
    assert "max_retries=0" in table.why_not(b"z" * 16)
    assert "put()" in table.why_not(b"q" * 16)
    call = b"a" * 16
    table.record_actor_call(call, 2)
    assert "actor" in table.why_not(call)
    table.released(call + bytes(4))
    assert "actor" in table.why_not(call)  # its second return is still referenced
    table.released(call + b"\x00\x00\x00\x01")
    assert call not in table.no_lineage
    table.record_actor_call(b"n" * 16, 0)  # no returns: nothing is kept
    assert b"n" * 16 not in table.no_lineage


def _ref_arg(tid: bytes) -> list:
    return [1, object_id(tid, 0), "owner"]


def test_lineage_keeps_argument_lineage():
    table = LineageTable(max_bytes=1 << 20)
    a, b, c, d = (bytes([i]) * 16 for i in b"abcd")
    table.record(a, {"nret": 1, "opts": {}, "args": ["l", [], {}]}, 3, 1)
    table.record(b, {"nret": 1, "opts": {}, "args": ["l", [_ref_arg(a), _ref_arg(a)], {}]}, 3, 1)
    nested = [[object_id(b, 0), "owner"], [object_id(a, 0), "owner"]]  # refs inside a value
    table.record(c, {"nret": 1, "opts": {}, "args": ["b", b"x" * 64], "inner": nested}, 3, 1)
    assert sorted(table.specs[c].deps) == sorted([a, b]) and table.specs[a].kept == 2
    table.released(object_id(a, 0))
    table.released(object_id(c, 0))
    assert set(table.specs) == {a, b}  # a is kept by b; c's lineage is gone
    table.released(object_id(a, 0))  # a second release (of a re-created copy) changes nothing
    assert a in table.specs
    table.revived(object_id(a, 0))
    table.released(object_id(b, 0))
    assert set(table.specs) == {a}  # re-created: referenced again on its own
    table.released(object_id(a, 0))
    assert not table.specs and table.bytes == 0

    small = LineageTable(max_bytes=1000)  # specs of 256 and 288 bytes: d evicts a
    small.record(a, {"nret": 1, "opts": {}, "args": ["l", [], {}]}, 3, 1)
    small.record(b, {"nret": 1, "opts": {}, "args": ["l", [_ref_arg(a)], {}]}, 3, 1)
    small.released(object_id(a, 0))
    small.record(c, {"nret": 1, "opts": {}, "args": ["l", [_ref_arg(b)], {}]}, 3, 1)
    small.record(d, {"nret": 1, "opts": {}, "args": ["l", [], {}]}, 3, 1)
    assert "evicted" in small.why_not(a) and b in small.specs  # the oldest went first
    small.completed(b, 3, failed=True)  # its dependents lose nothing they can use
    small.released(object_id(b, 0))
    small.released(object_id(c, 0))
    small.released(object_id(d, 0))
    assert not small.specs and small.bytes == 0


# ---- borrowed refs: a borrower that finds an object lost gets it recovered by its owner
#
# Three node processes: the driver (A, owner of x), the module's node process (B, the borrower)
# and node_b (C, which runs the producing tasks and is killed). Each execution creates its own
# file exclusively in a directory, so two runs can never be counted as one.


def _mark_run(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    node_id = lattica.get_runtime_context().node_id
    for i in range(100):
        try:
            fd = os.open(os.path.join(directory, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            continue
        os.write(fd, node_id.encode())
        os.close(fd)
        return
    raise RuntimeError("more than 100 executions")


def executions(directory: str) -> list[str]:
    """Node ids of the runs marked in `directory`, in order."""
    if not os.path.isdir(directory):
        return []
    names = sorted(os.listdir(directory), key=int)
    out = []
    for name in names:
        with open(os.path.join(directory, name)) as f:
            out.append(f.read())
    return out


@lattica.remote(max_retries=2)
def made_big(directory, k):
    _mark_run(directory)
    return np.arange(N, dtype=np.float64) * k


@lattica.remote(max_retries=2)
def made_plus_one(directory, array):
    _mark_run(directory)
    return array + 1


@lattica.remote
class Borrower:
    """Lives on B; keeps the refs it is given (B borrows them from their owner)."""

    def __init__(self):
        self.refs = []

    def keep(self, refs):
        self.refs = list(refs)
        return len(self.refs)

    def total(self):
        return float(lattica.get(self.refs[0], timeout=120).sum())

    def total_or_why(self):
        """The sum, or what the ObjectLostError raised here says."""
        try:
            return float(lattica.get(self.refs[0], timeout=120).sum())
        except lattica.ObjectLostError as exc:
            return {"object_id": exc.object_id, "cid": exc.cid, "reason": exc.reason}

    def make_on(self, directory, node_id):
        """A task this actor's node owns, run on `node_id`; the ref comes back nested."""
        strategy = lattica.NodeAffinitySchedulingStrategy(node_id, soft=True)
        y = made_big.options(scheduling_strategy=strategy).remote(directory, 6)
        lattica.wait([y], timeout=60)
        return [y]

    def drop(self):
        self.refs = []
        return True

    def submit_plus_one(self, directory, node_id):
        """B submits (so B owns) a task whose argument it borrowed; returns the ref nested."""
        strategy = lattica.NodeAffinitySchedulingStrategy(node_id, soft=True)
        y = made_plus_one.options(scheduling_strategy=strategy).remote(directory, self.refs[0])
        ready, _ = lattica.wait([y], timeout=60)
        return [y], len(ready)


def test_borrower_gets_lost_object_recovered_by_its_owner(mesh, node_b, tmp_path):
    """Case 1: A owns x (only copy on C); B borrows x; C dies; B reads x: A re-executes."""
    node_bb = mesh["nodes"][0]
    x_runs = str(tmp_path / "x")
    x = made_big.options(scheduling_strategy=on(node_b)).remote(x_runs, 3)
    assert lattica.wait([x], timeout=60)[0] == [x]
    assert executions(x_runs) == [node_b.node_id] and not driver_holds(x)
    borrower = Borrower.options(scheduling_strategy=on(node_bb, soft=False)).remote()
    assert lattica.get(borrower.keep.remote([x]), timeout=60) == 1
    kill(node_b)
    assert lattica.get(borrower.total.remote(), timeout=150) == float(
        (np.arange(N, dtype=np.float64) * 3).sum()
    )
    runs_of_x = executions(x_runs)
    assert len(runs_of_x) == 2 and runs_of_x[1] != node_b.node_id


def test_borrowers_own_task_is_reexecuted_with_argument_recovered_by_its_owner(
    mesh, node_b, tmp_path
):
    """Case 2: B owns y = t2(x), x borrowed from A; both live only on C; C dies; y is
    re-executed at B, which needs x: A re-executes x's task."""
    node_bb = mesh["nodes"][0]
    x_runs, y_runs = str(tmp_path / "x"), str(tmp_path / "y")
    x = made_big.options(scheduling_strategy=on(node_b)).remote(x_runs, 4)
    assert lattica.wait([x], timeout=60)[0] == [x]
    borrower = Borrower.options(scheduling_strategy=on(node_bb, soft=False)).remote()
    assert lattica.get(borrower.keep.remote([x]), timeout=60) == 1
    [y], ready = lattica.get(borrower.submit_plus_one.remote(y_runs, node_b.node_id), timeout=90)
    assert ready == 1
    assert executions(x_runs) == [node_b.node_id] and executions(y_runs) == [node_b.node_id]
    # B read x from its owner, which pulled a copy from C to serve it: drop that copy (as if
    # evicted) so that no node holds x once C is gone
    wait_for(lambda: driver_holds(x), 20, "the owner to hold the copy it served")
    serialization.get_store().delete(x.cid)
    kill(node_b)
    value = lattica.get(y, timeout=180)
    assert np.array_equal(value, np.arange(N, dtype=np.float64) * 4 + 1)
    runs_of_x, runs_of_y = executions(x_runs), executions(y_runs)
    assert len(runs_of_x) == 2 and len(runs_of_y) == 2
    assert node_b.node_id not in runs_of_x[1:] + runs_of_y[1:]


def test_borrower_gets_owners_reason_when_lost_object_cannot_be_reexecuted(mesh, node_b, tmp_path):
    """A borrowed object whose task has max_retries=0: the owner answers ObjectLostError."""
    node_bb = mesh["nodes"][0]
    x_runs = str(tmp_path / "x")
    x = made_big.options(scheduling_strategy=on(node_b), max_retries=0).remote(x_runs, 1)
    assert lattica.wait([x], timeout=60)[0] == [x]
    borrower = Borrower.options(scheduling_strategy=on(node_bb, soft=False)).remote()
    assert lattica.get(borrower.keep.remote([x]), timeout=60) == 1
    cid = x.cid
    kill(node_b)
    why = lattica.get(borrower.total_or_why.remote(), timeout=90)
    assert why["object_id"] == x.id.hex() and why["cid"] == cid
    assert "max_retries=0" in why["reason"]
    assert executions(x_runs) == [node_b.node_id]


def test_borrowed_object_of_a_dead_owner_is_lost(mesh, node_b, tmp_path):
    """The owner (C, an actor's node) dies; the value's copy lives on, on B: the driver, a
    borrower, gets ObjectLostError naming the dead owner (as in Ray), not the value."""
    node_bb = mesh["nodes"][0]
    owner = Borrower.options(scheduling_strategy=on(node_b, soft=False)).remote()
    [y] = lattica.get(owner.make_on.remote(str(tmp_path / "y"), node_bb.node_id), timeout=90)
    assert executions(str(tmp_path / "y")) == [node_bb.node_id]
    kill(node_b)
    with pytest.raises(lattica.ObjectLostError) as info:
        lattica.get(y, timeout=60)
    assert info.value.object_id == y.id.hex()
    assert node_b.node_id in info.value.reason and "owner" in info.value.reason


def test_borrowed_argument_its_owner_released_is_lost_for_a_reexecution(mesh, node_b, tmp_path):
    """B's lineage of y = t2(x) names x by reference only (as Ray's does): once A, x's owner,
    has released x (nobody holds it), re-executing y at B fails with ObjectLostError saying
    so (the documented limit)."""
    node_bb = mesh["nodes"][0]
    x_runs, y_runs = str(tmp_path / "x"), str(tmp_path / "y")
    x = made_big.options(scheduling_strategy=on(node_b)).remote(x_runs, 4)
    assert lattica.wait([x], timeout=60)[0] == [x]
    borrower = Borrower.options(scheduling_strategy=on(node_bb, soft=False)).remote()
    assert lattica.get(borrower.keep.remote([x]), timeout=60) == 1
    [y], ready = lattica.get(borrower.submit_plus_one.remote(y_runs, node_b.node_id), timeout=90)
    assert ready == 1 and executions(y_runs) == [node_b.node_id]
    x_id = x.id
    node = api._runtime.node
    assert lattica.get(borrower.drop.remote(), timeout=60)
    del x
    gc.collect()
    context.current_core().flush_releases()
    wait_for(lambda: x_id not in node.objects.entries, 20, "the owner to release x")
    kill(node_b)
    with pytest.raises(lattica.ObjectLostError) as info:
        lattica.get(y, timeout=120)
    assert info.value.object_id == x_id.hex()  # y's re-run failed on its argument
    assert "released" in info.value.reason and node.node_id in info.value.reason
    assert executions(x_runs) == [node_b.node_id] and executions(y_runs) == [node_b.node_id]


def test_executor_asks_the_owner_once_the_only_holder_of_an_argument_dies(mesh, node_b, tmp_path):
    """A passes x (only copy on C) by reference to a task on B; C stops answering before B
    can fetch x, then dies. B drops its exchange fetch when it sees C die and asks A, which
    re-executes x's task; before, B waited out the exchange's 30 s deadline first."""
    node_bb = mesh["nodes"][0]
    x_runs = str(tmp_path / "x")
    x = made_big.options(scheduling_strategy=on(node_b)).remote(x_runs, 7)
    assert lattica.wait([x], timeout=60)[0] == [x]
    node_b.proc.send_signal(signal.SIGSTOP)  # kill9 below reaps it
    started = time.monotonic()
    result = total.options(scheduling_strategy=on(node_bb, soft=False)).remote(x)
    tasks = api._runtime.node.tasks.records
    wait_for(
        lambda: (
            getattr(tasks.get(task_of(result.id)), "remote_peer", None) == node_bb.node_id
            or result.id not in api._runtime.node.objects.entries
        ),
        20,
        "the task to be sent to B",
    )
    kill(node_b)
    assert lattica.get(result, timeout=120) == float((np.arange(N, dtype=np.float64) * 7).sum())
    elapsed = time.monotonic() - started
    runs_of_x = executions(x_runs)
    assert len(runs_of_x) == 2 and runs_of_x[1] != node_b.node_id
    # failure detection (8 s of silence, liveness.py) + the owner's search for another copy
    # (5 s) + the re-run, under the 30 s exchange deadline that was waited out before B asked
    # the owner
    assert elapsed < 25, elapsed
