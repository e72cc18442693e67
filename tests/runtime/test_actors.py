"""Actors on an embedded node: state, ordering, concurrency, async, names, kill, restarts."""

import asyncio
import os
import threading
import time

import pytest

import latticaray as lattica


@lattica.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def incr(self, by=1):
        self.value += by
        return self.value

    def get(self):
        return self.value

    def pid(self):
        return os.getpid()

    @lattica.method(num_returns=2)
    def pair(self):
        return self.value, -self.value

    def stream(self, n):
        for i in range(n):
            yield self.value + i

    def crash(self):
        os._exit(1)


@lattica.remote
def use_counter(counter, times):
    return lattica.get([counter.incr.remote() for _ in range(times)])[-1]


def test_actor_state_and_order(runtime):
    counter = Counter.remote(10)
    refs = [counter.incr.remote() for _ in range(200)]
    assert lattica.get(refs) == list(range(11, 211))
    assert lattica.get(counter.get.remote()) == 210


def test_actor_method_num_returns_and_stream(runtime):
    counter = Counter.remote(3)
    a, b = counter.pair.remote()
    assert lattica.get([a, b]) == [3, -3]
    assert [lattica.get(r) for r in counter.stream.remote(4)] == [3, 4, 5, 6]


def test_handle_passed_to_task(runtime):
    counter = Counter.remote()
    assert lattica.get(use_counter.remote(counter, 5)) == 5
    assert lattica.get(counter.get.remote()) == 5


def test_ref_args_keep_call_order(runtime):
    counter = Counter.remote()

    @lattica.remote
    def slow_value(v):
        time.sleep(0.3)
        return v

    first = counter.incr.remote(slow_value.remote(100))
    second = counter.incr.remote(1)
    assert lattica.get([first, second]) == [100, 101]


@lattica.remote
class Gate:
    def __init__(self):
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def hold(self, seconds):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(seconds)
        with self.lock:
            self.active -= 1
        return self.peak

    def peak_seen(self):
        return self.peak


def test_threaded_actor_max_concurrency(runtime):
    gate = Gate.options(max_concurrency=4).remote()
    lattica.get([gate.hold.remote(0.3) for _ in range(8)], timeout=30)
    assert lattica.get(gate.peak_seen.remote()) >= 2
    serial = Gate.remote()
    lattica.get([serial.hold.remote(0.05) for _ in range(4)], timeout=30)
    assert lattica.get(serial.peak_seen.remote()) == 1


@lattica.remote
class AsyncWorker:
    def __init__(self):
        self.active = 0
        self.peak = 0

    async def work(self, seconds):
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(seconds)
        self.active -= 1
        return self.peak

    async def ticks(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i


def test_async_actor_runs_calls_concurrently(runtime):
    actor = AsyncWorker.remote()
    start = time.monotonic()
    peaks = lattica.get([actor.work.remote(0.5) for _ in range(20)], timeout=60)
    assert max(peaks) >= 10
    assert time.monotonic() - start < 20
    assert [lattica.get(r) for r in actor.ticks.remote(3)] == [0, 1, 2]


def test_async_actor_respects_max_concurrency(runtime):
    actor = AsyncWorker.options(max_concurrency=2).remote()
    peaks = lattica.get([actor.work.remote(0.1) for _ in range(6)], timeout=60)
    assert max(peaks) == 2


def test_named_actor_and_conflict(runtime):
    creator = Counter.options(name="shared", namespace="tests").remote(7)  # kept: not reclaimed
    handle = lattica.get_actor("shared", namespace="tests")
    assert lattica.get(handle.get.remote()) == 7
    with pytest.raises(lattica.ActorNameTakenError, match="shared"):
        Counter.options(name="shared", namespace="tests").remote()
    same = Counter.options(name="shared", namespace="tests", get_if_exists=True).remote()
    assert lattica.get(same.get.remote()) == 7
    with pytest.raises(ValueError):
        lattica.get_actor("missing", namespace="tests")
    del creator


def test_kill_actor(runtime):
    counter = Counter.options(name="doomed").remote()
    assert lattica.get(counter.incr.remote()) == 1
    lattica.kill(counter)
    with pytest.raises(lattica.ActorDiedError):
        lattica.get(counter.incr.remote(), timeout=30)
    replacement = Counter.options(name="doomed").remote(5)  # the name is free again
    assert lattica.get(replacement.get.remote()) == 5


def _pid_after_worker_killed(actor, pid: int, within: float) -> int:
    """Kill the actor's worker (``pid``) with -9; the pid its ``pid()`` answers with once it
    answers from another process, or ``pid`` still when ``within`` seconds pass first."""
    os.kill(pid, 9)
    deadline = time.monotonic() + within
    new_pid = pid
    while new_pid == pid and time.monotonic() < deadline:
        try:
            new_pid = lattica.get(actor.pid.remote(), timeout=30)
        except lattica.ActorDiedError:
            pass  # a call in flight when the worker died, without retries, fails; ask again
    return new_pid


def test_actor_restart_and_task_retries(runtime):
    counter = Counter.options(max_restarts=1, max_task_retries=1).remote(1)
    first_pid = lattica.get(counter.pid.remote())
    crashed = counter.crash.remote()
    with pytest.raises(lattica.ActorDiedError):
        lattica.get(crashed, timeout=60)  # retried once on the restarted actor, which crashes too
    with pytest.raises(lattica.ActorDiedError):
        lattica.get(counter.get.remote(), timeout=60)
    restarted = Counter.options(max_restarts=2).remote(1)
    pid = lattica.get(restarted.pid.remote())
    new_pid = _pid_after_worker_killed(restarted, pid, 30)
    assert new_pid != pid and new_pid != first_pid
    assert lattica.get(restarted.get.remote()) == 1  # state re-built by the constructor


def test_actor_without_restarts_dies(runtime):
    counter = Counter.remote()
    crashed = counter.crash.remote()
    with pytest.raises(lattica.ActorDiedError):
        lattica.get(crashed, timeout=60)
    with pytest.raises(lattica.ActorDiedError):
        lattica.get(counter.get.remote(), timeout=60)


def test_constructor_error_kills_actor(runtime):
    @lattica.remote
    class Broken:
        def __init__(self):
            raise RuntimeError("no way")

        def ping(self):
            return 1

    actor = Broken.remote()
    with pytest.raises(lattica.ActorDiedError, match="no way"):
        lattica.get(actor.ping.remote(), timeout=60)


def test_actor_error_keeps_actor_alive(runtime):
    @lattica.remote
    class Picky:
        def check(self, x):
            if x < 0:
                raise ValueError("negative")
            return x

    actor = Picky.remote()
    with pytest.raises(ValueError, match="negative"):
        lattica.get(actor.check.remote(-1))
    assert lattica.get(actor.check.remote(3)) == 3


def test_actor_runtime_context(runtime):
    @lattica.remote
    class Who:
        def ids(self):
            ctx = lattica.get_runtime_context()
            return ctx.actor_id, ctx.task_id

    who = Who.remote()
    actor_id, task_id = lattica.get(who.ids.remote())
    assert actor_id == who.actor_id and task_id


def test_cancel_actor_call(runtime):
    gate = Gate.remote()
    blocker = gate.hold.remote(1.0)
    queued = gate.hold.remote(0.0)
    lattica.cancel(queued)
    with pytest.raises(lattica.TaskCancelledError):
        lattica.get(queued, timeout=30)
    lattica.get(blocker, timeout=30)


def test_restarted_actor_gets_its_large_constructor_argument_again(runtime):
    """A constructor argument held in the store (a ref the driver has since dropped) stays pinned
    while the actor may restart: the restarted constructor reads the same value."""
    import gc

    import numpy as np

    @lattica.remote(max_restarts=1)
    class Holder:
        def __init__(self, array):
            self.total = int(array.sum())

        def pid(self):
            return os.getpid()

        def total_(self):
            return self.total

    array = np.arange(2_000_000, dtype=np.int64)  # 16 MB: a store value, not inlined
    ref = lattica.put(array)
    holder = Holder.remote(ref)
    expected = int(array.sum())
    assert lattica.get(holder.total_.remote(), timeout=60) == expected
    del ref
    gc.collect()
    pid = lattica.get(holder.pid.remote(), timeout=30)
    assert _pid_after_worker_killed(holder, pid, 60) != pid
    assert lattica.get(holder.total_.remote(), timeout=60) == expected
