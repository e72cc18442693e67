"""Executors deduplicate task ids a caller sends again after its task session broke (loopback).

The driver runs tasks on a node over QUIC; then a same-host Unix connection appears, the task
session moves to it (fence) and the old QUIC connection is closed while work is still owed on it,
so the driver sends that work again on the new session. Four tasks are still running on the node
at that point, and one has finished but its `done` was dropped by the driver (a test hook on the
session's frame decoder stands for the frame lost with the old path). Every task creates its own
file exclusively, so a second execution fails loudly. The node and the driver are child
processes the test always stops. The executor's table itself (bounds, a deliberate re-run of the
same id) is checked directly.
"""

import collections
import os
import time
import types

from meshutil import SESSION_DRIVER_HELPERS, FakeRemoteClient, run_session_driver

from latticaray.runtime.local.records import STREAMING
from latticaray.runtime.remote import dedup as dedup_mod
from latticaray.runtime.remote.dedup import CallerTasks, TaskDedup
from latticaray.runtime.remote.wire import SubmitTask, TaskDone, ValuePart

DRIVER = (
    SESSION_DRIVER_HELPERS
    + r"""
from latticaray.runtime.remote import wire

bootstrap, credential, workdir = sys.argv[1:4]
runtime = join_mesh(bootstrap, credential)
loop = api._runtime.loop

def worker_alive():
    return nodes_offering("dd")
wait_for(worker_alive, "the node never showed up")
worker = worker_alive()[0]
peer = next(p for p in runtime.mesh.connected_peers() if str(p) == worker)
def unix_addrs():
    return [a for a in runtime.mesh.addrs_of(peer) if a.transport == "unix"]
wait_for(unix_addrs, "identify never told us the node's unix address")

dropped = []
armed = [False]
decode = wire.decode_task_reply
def lossy_decode(raw):
    message = decode(raw)
    if armed[0] and isinstance(message, wire.TaskDone):
        armed[0] = False
        dropped.append(message.tid)
        raise wire.UnknownKind("lost-in-test")  # skipped by the session, as a lost frame
    return message
wire.decode_task_reply = lossy_decode

opts = dict(resources={"dd": 0.01})
held = [step.options(**opts).remote(i, workdir, True) for i in range(4)]
wait_for(lambda: all(os.path.exists(os.path.join(workdir, f"run-{i}")) for i in range(4)),
         "the held tasks never started")
armed[0] = True
finished = step.options(**opts).remote(10, workdir, False)
wait_for(lambda: dropped, "the finished task's reply never came")
assert dropped[0] == finished.id[:-4]

state = task_sessions_to(worker)
asyncio.run_coroutine_threadsafe(
    runtime.mesh.connections.upgrade(peer, unix_addrs()[0]), loop).result(30)
wait_for(lambda: state.retiring, "the task session never moved")
old = state.retiring[0]
owed = len(old.pending)
loop.call_soon_threadsafe(old.conn.close, "test: the old path breaks")
wait_for(lambda: runtime.remote.stats["tasks_resent"] >= 5, "the owed work was never re-sent")
open(os.path.join(workdir, "go"), "w").close()
results = lattica.get(held + [finished], timeout=120)
print(json.dumps({"worker": worker, "results": results, "owed": owed,
                  "stats": {k: runtime.remote.stats[k] for k in
                            ("sessions_moved", "tasks_resent")}}), flush=True)
lattica.shutdown()
"""
)


def test_resent_tasks_run_once_and_a_finished_one_is_answered_again(tmp_path):
    info, report = run_session_driver(DRIVER, tmp_path, {"dd": 1}, 8)
    workdir = tmp_path / "runs"
    worker = info["node_id"]
    assert report["results"] == [[worker, i * i] for i in (0, 1, 2, 3, 10)], report
    assert sorted(os.listdir(workdir)) == ["go"] + [f"run-{i}" for i in (0, 1, 10, 2, 3)]
    assert report["owed"] == 5, report
    assert report["stats"] == {"sessions_moved": 1, "tasks_resent": 5}, report


def _dedup() -> TaskDedup:
    return TaskDedup(types.SimpleNamespace(stats=collections.Counter()))


def _task(tid: bytes, again: bool = False, nret: int = 1, got: int | None = None) -> SubmitTask:
    return SubmitTask(tid, b"fn", "task", nret, ["b", b""], {}, again=again, got=got)


def test_executor_table_attaches_answers_and_lets_deliberate_reruns_run():
    dedup, first, second = _dedup(), FakeRemoteClient(), FakeRemoteClient()
    assert not dedup.seen_before(first, _task(b"t1"))
    assert dedup.callers["caller"].running[b"t1"] is first
    # sent again while it runs: attached, answered on the later session
    assert dedup.seen_before(second, _task(b"t1", again=True))
    seen = dedup.callers["caller"]
    assert seen.running[b"t1"] is second and second.frames == []
    seen.running.pop(b"t1")
    part = ValuePart(b"t1", 0, b"x" * 10)
    done = TaskDone(b"t1", vals=[None])
    seen.record(b"t1", [(0, [b"x" * 10]), done], 10, time.monotonic())
    # sent again once finished: the kept frames answer it, in order, and nothing runs
    third = FakeRemoteClient()
    assert dedup.seen_before(third, _task(b"t1", again=True))
    assert third.frames == [part, done]
    assert dedup.stats == {"resent_tasks_attached": 1, "resent_tasks_answered": 1}
    # the same id sent afresh (a lineage re-execution, a caller-side retry) runs again
    assert not dedup.seen_before(third, _task(b"t1"))
    assert b"t1" not in seen.finished and seen.result_bytes == 0
    # an unknown id sent again runs (this node never saw it)
    assert not dedup.seen_before(third, _task(b"t2", again=True))
    # so does an unknown streaming id whose caller has none of its items (see test_stream_dedup)
    assert not dedup.seen_before(third, _task(b"t3", again=True, nret=STREAMING, got=0))
    assert seen.running[b"t3"] is third and b"t3" in seen.streams


def test_executor_table_is_bounded(monkeypatch):
    monkeypatch.setattr(dedup_mod, "SEEN_RESULT_BYTES", 100)
    monkeypatch.setattr(dedup_mod, "SEEN_TASKS", 3)
    dedup, client = _dedup(), FakeRemoteClient()
    seen = dedup.callers["caller"] = CallerTasks()
    now = time.monotonic()
    seen.record(b"a", [TaskDone(b"a")], 60, now)
    seen.record(b"b", [TaskDone(b"b")], 60, now)
    # over the byte budget: the oldest reply goes, its id stays known
    assert seen.finished[b"a"][1] is None and seen.result_bytes == 60
    assert not dedup.seen_before(client, _task(b"a", again=True))  # its reply is gone: runs
    assert client.frames == [] and b"a" in seen.running
    for tid in (b"c", b"d", b"e"):
        seen.record(tid, [TaskDone(tid)], 1, now)
    assert list(seen.finished) == [b"c", b"d", b"e"]  # at most SEEN_TASKS ids
    seen.expire(now + dedup_mod.SEEN_TASKS_TTL)
    assert not seen.finished and seen.result_bytes == 0


ACTOR_DRIVER = (
    SESSION_DRIVER_HELPERS
    + r"""
bootstrap, credential, workdir = sys.argv[1:4]
runtime = join_mesh(bootstrap, credential)
wait_for(lambda: nodes_offering("ad"), "the node never showed up")
worker = nodes_offering("ad")[0]

@lattica.remote
class Holder:
    def where(self):
        return lattica.get_runtime_context().node_id

    def hold(self, i, workdir):
        import os, time
        fd = os.open(os.path.join(workdir, f"call-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(workdir, "go")):
            if time.monotonic() > deadline:
                raise TimeoutError("never told to go")
            time.sleep(0.02)
        return i

holder = Holder.options(resources={"ad": 0.01}).remote()  # calls: no retries (the default)
assert lattica.get(holder.where.remote(), timeout=60) == worker
calls = [holder.hold.remote(i, workdir) for i in range(2)]
wait_for(lambda: os.path.exists(os.path.join(workdir, "call-0")), "the first call never ran")
reconnect_then_break(bootstrap, task_sessions_to(worker))
wait_for(lambda: runtime.remote.stats["sessions_reopened"] >= 1, "the session never reopened")
open(os.path.join(workdir, "go"), "w").close()
print(json.dumps({"results": lattica.get(calls, timeout=60),
                  "reopened": runtime.remote.stats["sessions_reopened"]}), flush=True)
lattica.shutdown()
"""
)


def test_actor_calls_in_flight_on_a_broken_session_are_sent_again_not_failed(tmp_path):
    """A task session that breaks while its peer stays connected is reopened and the actor calls
    in flight on it are sent again (`again`): they spend no retry (these have none), run once
    and in order, and answer."""
    _info, report = run_session_driver(ACTOR_DRIVER, tmp_path, {"ad": 1}, 2)
    assert report["results"] == [0, 1], report
    assert report["reopened"] >= 1, report
    assert sorted(os.listdir(tmp_path / "runs")) == ["call-0", "call-1", "go"]
