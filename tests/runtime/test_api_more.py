"""More of Ray's verbs on an embedded node: recursive cancel, kill with restart, wait without
fetching, num_returns="streaming" as an option, and cancelling a task known to be running."""

import os
import time

import pytest

import latticaray as lattica

DEADLINE = 30.0


def wait_for_file(path, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


@lattica.remote
class Mailbox:
    """Hands a ref from a running task to the driver (the ref travels nested in a list)."""

    def __init__(self):
        self.items = []

    def post(self, item):
        self.items.append(item)

    def take(self):
        return self.items


@lattica.remote
def child_until_released(release_path, started_path):
    open(started_path, "w").close()
    deadline = time.monotonic() + DEADLINE
    while not os.path.exists(release_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "child done"


@lattica.remote
def parent_waiting_on_child(mailbox, release_path, started_path):
    child = child_until_released.remote(release_path, started_path)
    lattica.get(mailbox.post.remote([child]))
    return lattica.get(child)


def _child_of(mailbox):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        items = lattica.get(mailbox.take.remote(), timeout=DEADLINE)
        if items:
            return items[0][0]
        time.sleep(0.01)
    raise AssertionError("the parent task never posted its child's ref")


@pytest.mark.parametrize("recursive", [True, False])
def test_cancel_reaches_children_only_when_recursive(runtime, tmp_path, recursive):
    release, started = str(tmp_path / "release"), str(tmp_path / "started")
    mailbox = Mailbox.remote()
    parent = parent_waiting_on_child.remote(mailbox, release, started)
    child = _child_of(mailbox)
    wait_for_file(started)
    lattica.cancel(parent, recursive=recursive)
    with pytest.raises(lattica.TaskCancelledError):
        lattica.get(parent, timeout=DEADLINE)
    if recursive:
        with pytest.raises(lattica.TaskCancelledError):
            lattica.get(child, timeout=DEADLINE)
    else:
        open(release, "w").close()
        assert lattica.get(child, timeout=DEADLINE) == "child done"
    lattica.kill(mailbox)


@lattica.remote(max_restarts=1)
class Counter:
    def __init__(self):
        self.value = 0

    def incr(self):
        self.value += 1
        return self.value

    def pid(self):
        return os.getpid()


def test_kill_with_restart_allowed_restarts_the_actor(runtime):
    counter = Counter.remote()
    assert lattica.get([counter.incr.remote() for _ in range(3)], timeout=DEADLINE) == [1, 2, 3]
    first_pid = lattica.get(counter.pid.remote(), timeout=DEADLINE)
    lattica.kill(counter, no_restart=False)
    # the restarted actor is a fresh process whose state began again from __init__
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            value = lattica.get(counter.incr.remote(), timeout=DEADLINE)
            break
        except lattica.ActorDiedError:
            # calls in flight when the worker was killed may fail; later ones reach the restart
            assert time.monotonic() < deadline, "the actor never came back"
    assert value == 1
    assert lattica.get(counter.pid.remote(), timeout=DEADLINE) != first_pid
    lattica.kill(counter)  # no_restart=True by default: gone for good
    with pytest.raises(lattica.ActorDiedError):
        lattica.get(counter.incr.remote(), timeout=DEADLINE)


@lattica.remote
def value_after_file(path, value):
    wait_for_file(path)
    return value


def test_wait_without_fetch_local(runtime, tmp_path):
    gate = str(tmp_path / "gate")
    fast = lattica.put(b"x" * 10)
    slow = value_after_file.remote(gate, 2)
    ready, not_ready = lattica.wait(
        [fast, slow], num_returns=1, timeout=DEADLINE, fetch_local=False
    )
    assert ready == [fast] and not_ready == [slow]
    open(gate, "w").close()
    ready, not_ready = lattica.wait(
        [fast, slow], num_returns=2, timeout=DEADLINE, fetch_local=False
    )
    assert {r.id for r in ready} == {fast.id, slow.id} and not_ready == []
    assert lattica.get(slow, timeout=DEADLINE) == 2


@lattica.remote
def letters(word):
    yield from word


def test_streaming_option_on_a_generator(runtime):
    gen = letters.options(num_returns="streaming").remote("mesh")
    assert isinstance(gen, lattica.ObjectRefGenerator)
    assert [lattica.get(ref, timeout=DEADLINE) for ref in gen] == list("mesh")


@lattica.remote
def mark_then_sleep(path, seconds):
    open(path, "w").close()
    time.sleep(seconds)
    return "finished"


def test_cancel_a_task_known_to_be_running(runtime, tmp_path):
    started = str(tmp_path / "started")
    ref = mark_then_sleep.remote(started, 60)
    wait_for_file(started)
    lattica.cancel(ref)
    with pytest.raises(lattica.TaskCancelledError):
        lattica.get(ref, timeout=DEADLINE)


@lattica.remote
class Holder:
    def __init__(self, small, big=None):
        self.small, self.big = small, big

    def summary(self):
        return self.small, None if self.big is None else float(self.big.sum())


@lattica.remote
def seven_after_file(path):
    wait_for_file(path)
    return 7


@lattica.remote
def raises_key_error():
    raise KeyError("no such key")


def test_actor_constructor_ref_arguments_are_resolved(runtime, tmp_path):
    import numpy as np

    gate = str(tmp_path / "gate")
    big = lattica.put(np.ones(1_000_000))
    assert lattica.get(
        Holder.remote(lattica.put(41), big=big).summary.remote(), timeout=DEADLINE
    ) == (41, 1_000_000.0)
    # a pending task's result: calls queue until the constructor has its value
    pending = Holder.remote(seven_after_file.remote(gate), big)
    call = pending.summary.remote()
    open(gate, "w").close()
    assert lattica.get(call, timeout=DEADLINE) == (7, 1_000_000.0)
    failed = Holder.remote(raises_key_error.remote())
    with pytest.raises(lattica.ActorDiedError, match="constructor failed"):
        lattica.get(failed.summary.remote(), timeout=DEADLINE)
