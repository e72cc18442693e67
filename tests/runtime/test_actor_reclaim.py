"""Actors whose every handle is gone are reclaimed (Ray's semantics), on one embedded node.

A non-detached actor (anonymous, or named without lifetime="detached") ends when the creator's
handle and every copy of it (passed to a task or an actor, put inside an object, found by
name) are gone and the calls made through them are done; its worker process exits and the
state API shows it DEAD with that cause. Detached actors stay.
"""

import functools
import gc
import os

import pytest
import reclaimutil
from reclaimutil import actor_row, process_alive

import latticaray as lattica

DEADLINE = 30.0


@lattica.remote
class Box:
    def __init__(self, inner=None):
        self.inner = inner

    def pid(self):
        return os.getpid()

    def wait_file(self, path):
        wait_path(path)
        return "finished"

    def inner_pid(self):
        return lattica.get(self.inner.pid.remote(), timeout=DEADLINE)

    def set_inner(self, inner):
        self.inner = inner

    def drop_inner(self):
        self.inner = None
        gc.collect()


@lattica.remote
def use_after(handle, started, go):
    """Holds ``handle`` (an argument) until the file ``go`` exists, then calls it."""
    open(started, "w").close()
    wait_path(go)
    return lattica.get(handle.pid.remote(), timeout=DEADLINE)


wait_path = functools.partial(reclaimutil.wait_path, deadline=DEADLINE)
wait_for = functools.partial(reclaimutil.wait_for, deadline=DEADLINE)
assert_reclaimed = functools.partial(reclaimutil.assert_reclaimed, deadline=DEADLINE)


def test_dropped_handle_reclaims_the_actor(runtime):
    box = Box.remote()
    pid, actor_id = lattica.get(box.pid.remote(), timeout=DEADLINE), box.actor_id
    assert actor_row(actor_id).state == "ALIVE"
    del box
    assert_reclaimed(pid, actor_id)


def test_calls_submitted_before_the_drop_still_complete(runtime, tmp_path):
    box = Box.remote()
    pid, actor_id = lattica.get(box.pid.remote(), timeout=DEADLINE), box.actor_id
    go = str(tmp_path / "go")
    pending = box.wait_file.remote(go)
    del box
    gc.collect()
    assert process_alive(pid)  # the pending call holds it
    open(go, "w").close()
    assert lattica.get(pending, timeout=DEADLINE) == "finished"
    del pending
    assert_reclaimed(pid, actor_id)


def test_a_handle_passed_to_a_task_keeps_the_actor_until_the_task_ends(runtime, tmp_path):
    box = Box.remote()
    pid, actor_id = lattica.get(box.pid.remote(), timeout=DEADLINE), box.actor_id
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    result = use_after.remote(box, started, go)
    del box
    wait_path(started)  # the task has its copy of the handle now
    gc.collect()
    assert process_alive(pid)
    assert actor_row(actor_id).state == "ALIVE"
    open(go, "w").close()
    assert lattica.get(result, timeout=DEADLINE) == pid  # the task's copy still works
    del result
    assert_reclaimed(pid, actor_id)


def test_a_handle_inside_an_object_or_another_actor_keeps_it(runtime):
    box = Box.remote()
    pid, actor_id = lattica.get(box.pid.remote(), timeout=DEADLINE), box.actor_id
    held = lattica.put({"handle": box})
    holder = Box.remote()
    lattica.get(holder.set_inner.remote(box), timeout=DEADLINE)  # kept in the actor's state
    del box
    gc.collect()
    assert lattica.get(lattica.get(held)["handle"].pid.remote(), timeout=DEADLINE) == pid
    del held  # the object goes: the holder actor's copy is left
    gc.collect()
    assert lattica.get(holder.inner_pid.remote(), timeout=DEADLINE) == pid
    assert actor_row(actor_id).state == "ALIVE"
    lattica.get(holder.drop_inner.remote(), timeout=DEADLINE)
    assert_reclaimed(pid, actor_id)
    holder_pid, holder_id = lattica.get(holder.pid.remote(), timeout=DEADLINE), holder.actor_id
    del holder
    assert_reclaimed(holder_pid, holder_id)


def test_a_handle_in_a_constructors_arguments_lives_as_long_as_that_actor(runtime):
    """Creation arguments are held for the creating actor's lifetime (it may restart with
    them): the inner actor is reclaimed once the outer one is."""
    inner = Box.remote()
    inner_pid, inner_id = lattica.get(inner.pid.remote(), timeout=DEADLINE), inner.actor_id
    outer = Box.remote(inner)
    del inner
    gc.collect()
    assert lattica.get(outer.inner_pid.remote(), timeout=DEADLINE) == inner_pid
    outer_pid, outer_id = lattica.get(outer.pid.remote(), timeout=DEADLINE), outer.actor_id
    assert process_alive(inner_pid)
    del outer
    assert_reclaimed(outer_pid, outer_id)
    assert_reclaimed(inner_pid, inner_id)


def test_named_actor_is_reclaimed_and_its_name_freed_detached_stays(runtime):
    named = Box.options(name="reclaim-named").remote()
    kept = Box.options(name="reclaim-kept", lifetime="detached").remote()
    named_pid = lattica.get(named.pid.remote(), timeout=DEADLINE)
    kept_pid = lattica.get(kept.pid.remote(), timeout=DEADLINE)
    named_id = named.actor_id
    found = lattica.get_actor("reclaim-named")  # a handle found by name counts too
    del named, kept
    gc.collect()
    assert lattica.get(found.pid.remote(), timeout=DEADLINE) == named_pid
    del found
    assert_reclaimed(named_pid, named_id)
    with pytest.raises(ValueError, match="no actor named 'reclaim-named'"):
        lattica.get_actor("reclaim-named")
    # the detached one was dropped before the named one was reclaimed: it stays, found by name
    assert process_alive(kept_pid)
    kept = lattica.get_actor("reclaim-kept")
    assert lattica.get(kept.pid.remote(), timeout=DEADLINE) == kept_pid
    lattica.kill(kept)
    wait_for(lambda: not process_alive(kept_pid), "kill() to end the detached actor")
    # a name freed by reclamation can be taken again
    again = Box.options(name="reclaim-named").remote()
    assert lattica.get(again.pid.remote(), timeout=DEADLINE) != named_pid


def test_unknown_lifetime_is_refused(runtime):
    with pytest.raises(ValueError, match="lifetime must be"):
        Box.options(lifetime="forever").remote()
    box = Box.options(lifetime="non_detached").remote()  # Ray's explicit default
    pid, actor_id = lattica.get(box.pid.remote(), timeout=DEADLINE), box.actor_id
    del box
    assert_reclaimed(pid, actor_id)
