"""A streaming task re-sent by its caller attaches to the generator running on the executor.

Loopback, two processes the test always stops: a node and a driver. The driver starts a
streaming task on the node that creates its run file exclusively (a second execution fails
loudly) and yields each item only once told to by a condition file, with a backpressure window
of 2. Before the first yield the task session moves to a same-host Unix connection and the old
QUIC connection is closed with the task owed on it: the driver sends it again. Mid-stream, after
the consumer took items 0 and 1, items 2 and 3 are produced but their frames are lost on the
driver's side (a hook on the session's frame decoder stands for frames lost with the path), and
the Unix connection is closed next to a fresh QUIC one: the session reopens and the task is sent
again with the count of items the driver has. The consumer must see every item once, in order,
from one execution. A second stream finishes while its last two items and its end are lost
that way, then the session moves and the old path closes: the executor answers the re-sent task
from the items it kept. The executor's table (re-delivery from `got`, a finished stream
answered from its kept items, the budget) is checked directly.
"""

import collections
import os
import time
import types

from meshutil import SESSION_DRIVER_HELPERS, FakeRemoteClient, run_session_driver

from latticaray.runtime.local.records import STREAMING
from latticaray.runtime.remote import dedup as dedup_mod
from latticaray.runtime.remote.dedup import CallerTasks, TaskDedup
from latticaray.runtime.remote.wire import SubmitTask, TaskDone, ValuePart, YieldItem
from latticaray.runtime.serialization import deserialize

N = 6

DRIVER = (
    SESSION_DRIVER_HELPERS
    + r"""
from latticaray.runtime.remote import wire

bootstrap, credential, workdir, count = sys.argv[1:5]
count = int(count)
runtime = join_mesh(bootstrap, credential)
loop = api._runtime.loop
stats = runtime.remote.stats

@lattica.remote
def produce(n, workdir, tag):
    import os, time
    fd = os.open(os.path.join(workdir, f"run-{tag}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    for i in range(n):
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(workdir, f"go-{tag}-{i}")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"never told to yield item {i}")
            time.sleep(0.02)
        yield i * 10

def waited(cond, what):
    try:
        wait_for(cond, what)
    except AssertionError:
        streams = api._runtime.node.streams.states.values()
        raise AssertionError(f"{what}; dropped {dropped}; stats {dict(stats)}; streams "
                             f"{[(s.count, s.consumed, s.finished) for s in streams]}")

def go(i, tag="a"):
    open(os.path.join(workdir, f"go-{tag}-{i}"), "w").close()

wait_for(lambda: nodes_offering("sd"), "the node never showed up")
worker = nodes_offering("sd")[0]
peer = next(p for p in runtime.mesh.connected_peers() if str(p) == worker)
def unix_addrs():
    return [a for a in runtime.mesh.addrs_of(peer) if a.transport == "unix"]
wait_for(unix_addrs, "identify never told us the node's unix address")

dropped = []
to_drop = set()
decode = wire.decode_task_reply
def lossy_decode(raw):
    message = decode(raw)
    item = isinstance(message, wire.YieldItem)
    if item and message.i in to_drop or isinstance(message, wire.TaskDone) and "done" in to_drop:
        key = message.i if item else "done"
        to_drop.discard(key)
        dropped.append(key)
        raise wire.UnknownKind("lost-in-test")  # skipped by the session, as a lost frame
    return message
wire.decode_task_reply = lossy_decode

def streaming(n, tag):
    return produce.options(num_returns="streaming", resources={"sd": 0.01},
                           _generator_backpressure_num_objects=2).remote(n, workdir, tag)

state = task_sessions_to(worker)
def move_session_then_break_old_path(resent):
    asyncio.run_coroutine_threadsafe(
        runtime.mesh.connections.upgrade(peer, unix_addrs()[0]), loop).result(30)
    waited(lambda: state.retiring, "the task session never moved")
    old = state.retiring[0]
    loop.call_soon_threadsafe(old.conn.close, "test: the old path breaks")
    waited(lambda: stats["tasks_resent"] >= resent, "the streaming task was never re-sent")

gen = streaming(count, "a")
wait_for(lambda: os.path.exists(os.path.join(workdir, "run-a")), "the task never started")
# break 1, before the first yield: the session moves to the unix path, the old one closes
move_session_then_break_old_path(1)

items = []
go(0)
go(1)
items += [lattica.get(next(gen), timeout=60) for _ in range(2)]

# break 2, mid-stream: items 2 and 3 are produced, their frames lost, then the path closes
to_drop.update((2, 3))
go(2)
go(3)
waited(lambda: dropped == [2, 3], "items 2 and 3 never came")

reconnect_then_break(bootstrap, state)
waited(lambda: stats["sessions_reopened"] >= 1, "the task session never reopened")

for i in range(4, count):
    go(i)
items += [lattica.get(ref, timeout=60) for ref in gen]

# a stream that finished while its last items and its end were lost with the path: the
# executor answers the re-sent task with them (item 0 was taken, so it is not kept)
for i in range(3):
    go(i, "b")
finished_gen = streaming(3, "b")
to_drop.update((1, 2, "done"))
finished_items = [lattica.get(next(finished_gen), timeout=60)]
waited(lambda: dropped[2:] == [1, 2, "done"], "the finished stream's frames never came")
move_session_then_break_old_path(2)
finished_items += [lattica.get(ref, timeout=60) for ref in finished_gen]
print(json.dumps({"items": items, "finished_items": finished_items, "dropped": dropped,
                  "stats": {k: stats[k] for k in
                            ("sessions_moved", "tasks_resent", "sessions_reopened")}}),
      flush=True)
lattica.shutdown()
"""
)


def test_resent_streaming_task_runs_once_and_delivers_every_item_once(tmp_path):
    _info, report = run_session_driver(DRIVER, tmp_path, {"sd": 1}, 2, str(N))
    workdir = tmp_path / "runs"
    assert report["items"] == [i * 10 for i in range(N)], report
    assert report["finished_items"] == [0, 10, 20], report
    assert report["dropped"] == [2, 3, 1, 2, "done"], report
    assert sorted(os.listdir(workdir)) == sorted(
        ["run-a", "run-b"] + [f"go-a-{i}" for i in range(N)] + [f"go-b-{i}" for i in range(3)]
    )
    assert report["stats"] == {"sessions_moved": 2, "tasks_resent": 2, "sessions_reopened": 1}, (
        report
    )


class _Tasks:
    def __init__(self):
        self.cancelled: list = []

    def cancel_task(self, tid: bytes, force: bool, recursive: bool) -> None:
        self.cancelled.append(tid)


def _dedup() -> TaskDedup:
    tasks = _Tasks()
    return TaskDedup(
        types.SimpleNamespace(stats=collections.Counter(), node=types.SimpleNamespace(tasks=tasks))
    )


def _stream(tid: bytes, again: bool = False, got: int = 0) -> SubmitTask:
    return SubmitTask(
        tid, b"fn", "gen", STREAMING, ["b", b""], {}, again=again, got=got if again else None
    )


def _yield(tid: bytes, i: int) -> YieldItem:
    return YieldItem(tid, i, b"%d" % i)


def _keep(seen: CallerTasks, tid: bytes, i: int, large: bool = False) -> None:
    frames = [(("y", i), [b"p" * 10]), _yield(tid, i)] if large else [_yield(tid, i)]
    seen.keep_item(tid, i, frames, 10)


def test_running_stream_sent_again_gets_the_items_its_caller_lacks():
    dedup, first, second = _dedup(), FakeRemoteClient(), FakeRemoteClient()
    assert not dedup.seen_before(first, _stream(b"s"))
    seen = dedup.callers["caller"]
    for i in range(4):
        _keep(seen, b"s", i, large=i == 2)
    seen.acked(b"s", 2)  # the consumer took 0 and 1: they are let go of
    assert list(seen.streams[b"s"].items) == [2, 3] and seen.result_bytes == 20
    # the caller has item 2 already: only item 3 comes again, and later ones follow it
    assert dedup.seen_before(second, _stream(b"s", again=True, got=3))
    assert seen.running[b"s"] is second
    assert second.frames == [_yield(b"s", 3)]
    third = FakeRemoteClient()
    assert dedup.seen_before(third, _stream(b"s", again=True, got=2))
    assert third.frames == [
        ValuePart(b"s", ("y", 2), b"p" * 10),
        _yield(b"s", 2),
        _yield(b"s", 3),
    ]
    assert dedup.stats == {"resent_tasks_attached": 2} and not dedup.remote.node.tasks.cancelled


def test_finished_stream_sent_again_is_answered_from_its_kept_items():
    dedup, first = _dedup(), FakeRemoteClient()
    assert not dedup.seen_before(first, _stream(b"s"))
    seen = dedup.callers["caller"]
    for i in range(3):
        _keep(seen, b"s", i)
    seen.acked(b"s", 1)
    seen.running.pop(b"s")
    done = TaskDone(b"s")
    seen.stream_finished(b"s", [done], 0, time.monotonic())
    assert b"s" not in seen.streams and seen.result_bytes == 20
    again = FakeRemoteClient()
    assert dedup.seen_before(again, _stream(b"s", again=True, got=2))
    assert again.frames == [_yield(b"s", 2), done]
    assert dedup.stats == {"resent_tasks_answered": 1}


def test_stream_items_past_the_budget_end_the_stream_instead_of_running_it_twice(monkeypatch):
    monkeypatch.setattr(dedup_mod, "SEEN_RESULT_BYTES", 25)
    dedup, first = _dedup(), FakeRemoteClient()
    assert not dedup.seen_before(first, _stream(b"s"))
    seen = dedup.callers["caller"]
    seen.record(b"old", [TaskDone(b"old")], 20, time.monotonic())
    for i in range(3):
        _keep(seen, b"s", i)
    # an old finished reply goes first, then the oldest unacknowledged item
    assert seen.finished[b"old"][1] is None
    assert list(seen.streams[b"s"].items) == [1, 2] and seen.streams[b"s"].lost == 1
    assert seen.result_bytes == 20
    # a caller that has item 0 already gets items 1 and 2
    later = FakeRemoteClient()
    assert dedup.seen_before(later, _stream(b"s", again=True, got=1))
    assert later.frames == [_yield(b"s", 1), _yield(b"s", 2)]
    # one that lacks item 0 gets an error, and the generator is cancelled, not run twice
    lacking = FakeRemoteClient()
    assert dedup.seen_before(lacking, _stream(b"s", again=True, got=0))
    assert [f.KIND for f in lacking.frames] == ["done"]
    error = deserialize(lacking.frames[0].err)
    assert "from 0 on" in str(error), error
    assert dedup.remote.node.tasks.cancelled == [b"s"] and b"s" not in seen.running
    # a stream this node never saw, re-sent by a caller that has items: an error, no run
    unknown = FakeRemoteClient()
    assert dedup.seen_before(unknown, _stream(b"u", again=True, got=3))
    assert [f.KIND for f in unknown.frames] == ["done"] and b"u" not in seen.running
    assert dedup.stats["resent_streams_lost"] == 2
