"""Local puts sent to another node are named by CID off the node's event loop.

A 200 MB local put passed to a task on another node is hashed on an executor thread while the
node's event loop keeps serving: a loop-lag probe on the driver node's loop sees a maximal
stall well below the time the old in-loop hashing stalled it (measured in the same run on an
equal object). One hash per object however many sends wait for it; an actor call submitted
after one whose argument is being hashed does not overtake it.
"""

import asyncio
import threading
import time

import numpy as np
import pytest
from meshutil import driver_with_nodes, wait_for

import latticaray as lattica
from latticaray.runtime import api, serialization

BIG = 200 << 20


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(1) as cluster:
        yield cluster


@lattica.remote
def nbytes(array):
    return int(array.nbytes)


@lattica.remote
def make_big(fill):
    return np.full(BIG, fill, dtype=np.uint8)


@lattica.remote
def size_of_result_from(node_id):
    strategy = lattica.NodeAffinitySchedulingStrategy(node_id)
    return int(lattica.get(make_big.options(scheduling_strategy=strategy).remote(5)).nbytes)


@lattica.remote
class Recorder:
    def __init__(self):
        self.seen = []

    def record(self, label, value=None):
        self.seen.append((label, None if value is None else int(value.nbytes)))
        return len(self.seen)

    def log(self):
        return self.seen


def _node():
    return api._runtime.node, api._runtime.loop


def _big_put(fill: int):
    """A fresh 200 MB local put and its store reference as the driver node holds it."""
    node, _ = _node()
    ref = lattica.put(np.full(BIG, fill, dtype=np.uint8))
    wait_for(
        lambda: ref.id in node.objects.entries and node.objects.entries[ref.id].data is not None,
        30,
        "the put to reach the node",
    )
    data = node.objects.entries[ref.id].data
    assert serialization.is_store_ref(data) and node.objects.cid_pending(data)
    return ref, data


def _run_on_loop(coro, timeout=120):
    _, loop = _node()
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


async def _probe_until(
    started: threading.Event, done, window=lambda: True, tick=0.001
) -> tuple[float, int]:
    """Largest gap between ticks of the event loop (beyond the tick itself) until ``done()``,
    counting the gaps that begin or end while ``window()`` holds."""
    worst, ticks = 0.0, 0
    last = time.perf_counter()
    was_open = window()
    started.set()
    while True:
        await asyncio.sleep(tick)
        now = time.perf_counter()
        is_open = window()
        if was_open or is_open:
            worst = max(worst, now - last - tick)
            ticks += 1
        last, was_open = now, is_open
        if done():
            return worst, ticks


def _stall_trial(target) -> tuple[float, float, int]:
    """One run: the loop stall of in-loop hashing (the old path, on one 200 MB put) and the
    largest stall while another 200 MB put is named by CID for a remote task."""
    node, loop = _node()
    before_ref, before_data = _big_put(1)

    async def in_loop_hash():
        started = time.perf_counter()
        node.objects.portable(before_data)
        return time.perf_counter() - started

    in_loop = _run_on_loop(in_loop_hash())

    ref, data = _big_put(2)
    name = serialization.store_name(data)
    resolved = lambda: node.store.cid_if_resolved(name) is not None  # noqa: E731
    started = threading.Event()
    probe = asyncio.run_coroutine_threadsafe(_probe_until(started, resolved), loop)
    assert started.wait(30)
    result = nbytes.options(scheduling_strategy=target).remote(ref)
    stall, ticks = probe.result(120)
    assert lattica.get(result, timeout=120) == BIG
    del before_ref, ref, result
    return in_loop, stall, ticks


def test_hashing_for_remote_task_does_not_stall_event_loop(mesh):
    target = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][0].node_id)
    # this machine is shared and noisy: a stall from elsewhere may land in one trial, while
    # in-loop hashing stalls every trial by the hashing time
    trials = []
    for _ in range(3):
        in_loop, stall, ticks = _stall_trial(target)
        trials.append((in_loop, stall, ticks))
        print(
            f"in-loop hashing stalled the loop {in_loop * 1e3:.1f} ms; "
            f"off-loop: max stall {stall * 1e3:.1f} ms over {ticks} ticks"
        )
        if ticks >= 5 and stall < in_loop / 3:
            break
    else:
        pytest.fail(f"the event loop stalled while a put was hashed: {trials}")


def test_hashing_a_result_for_its_remote_caller_does_not_stall_event_loop(mesh):
    """The driver node runs a task for the other node; its 200 MB result (a local put by the
    worker) is named by CID off the loop before the `done` frame goes back."""
    node, loop = _node()
    target = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][0].node_id)
    trials = []
    for _ in range(3):
        before_ref, before_data = _big_put(1)

        async def in_loop_hash():
            started = time.perf_counter()
            node.objects.portable(before_data)
            return time.perf_counter() - started

        in_loop = _run_on_loop(in_loop_hash())
        del before_ref

        seen = []
        deadline = time.monotonic() + 60

        def hashed():
            if node.objects.hashing:
                seen.append(True)
            return (seen and not node.objects.hashing) or time.monotonic() > deadline

        started = threading.Event()
        probe = asyncio.run_coroutine_threadsafe(
            _probe_until(started, hashed, lambda: bool(node.objects.hashing)), loop
        )
        assert started.wait(30)
        outer = size_of_result_from.options(scheduling_strategy=target).remote(
            lattica.get_runtime_context().node_id
        )
        stall, ticks = probe.result(130)
        assert seen and ticks >= 5, "the result was never hashed off the loop"
        assert lattica.get(outer, timeout=120) == BIG
        trials.append((in_loop, stall, ticks))
        print(
            f"result: in-loop hashing stalled the loop {in_loop * 1e3:.1f} ms; "
            f"off-loop: max stall {stall * 1e3:.1f} ms over {ticks} ticks"
        )
        if stall < in_loop / 3:
            break
    else:
        pytest.fail(f"the event loop stalled while a result was hashed: {trials}")


def test_one_hash_per_object_for_concurrent_sends(mesh, monkeypatch):
    node, _ = _node()
    target = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][0].node_id)
    ref, data = _big_put(3)
    name = serialization.store_name(data)
    hashed = []
    real = serialization.store_cid

    def counting(ref_data):
        if serialization.store_name(ref_data) == name and node.objects.cid_pending(ref_data):
            hashed.append(name)
        return real(ref_data)

    monkeypatch.setattr(serialization, "store_cid", counting)
    results = [nbytes.options(scheduling_strategy=target).remote(ref) for _ in range(3)]
    assert lattica.get(results, timeout=120) == [BIG] * 3
    assert hashed == [name]


def test_actor_call_after_hashed_argument_keeps_its_place(mesh):
    target = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][0].node_id)
    recorder = Recorder.options(scheduling_strategy=target).remote()
    assert lattica.get(recorder.record.remote("warm"), timeout=60) == 1
    ref, _ = _big_put(4)
    first = recorder.record.remote("big", ref)
    following = [recorder.record.remote(f"small-{i}") for i in range(5)]
    assert lattica.get([first] + following, timeout=120) == [2, 3, 4, 5, 6, 7]
    assert lattica.get(recorder.log.remote(), timeout=60) == [("warm", None), ("big", BIG)] + [
        (f"small-{i}", None) for i in range(5)
    ]
