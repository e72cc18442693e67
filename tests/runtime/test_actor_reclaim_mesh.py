"""Actor reclamation across node processes: the owner (the creating node) counts the handles
of its actors wherever they are, and tells the host to end one when none is left.

The driver's embedded node and two `latticaray.runtime.node_main` processes on loopback. An
actor hosted on a node process ends when the driver drops its last handle; a copy held by a
task on the other node process (a borrower there) keeps it until that task ends; a named one's
name is freed; a detached one stays; an actor created by a task on a node process (owned
there) and returned to the driver lives while the driver holds the returned handle.
"""

import functools
import gc
import os

import pytest
import reclaimutil
from meshutil import driver_with_nodes
from reclaimutil import actor_row, process_alive

import latticaray as lattica

DEADLINE = 60.0


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(2) as cluster:
        yield cluster


@lattica.remote
class Box:
    def __init__(self):
        self.inner = None

    def pid(self):
        return os.getpid()

    def set_inner(self, inner):
        self.inner = inner

    def inner_pid(self):
        return lattica.get(self.inner.pid.remote(), timeout=DEADLINE)

    def drop_inner(self):
        self.inner = None
        gc.collect()

    def node(self):
        return lattica.get_runtime_context().get_node_id()


@lattica.remote
def use_after(handle, started, go):
    """Holds ``handle`` (an argument) until the file ``go`` exists, then calls it."""
    open(started, "w").close()
    wait_path(go)
    return lattica.get(handle.pid.remote(), timeout=DEADLINE)


@lattica.remote
def make_box():
    """An actor created (owned) on this task's node, handed back."""
    box = Box.remote()
    lattica.get(box.pid.remote(), timeout=DEADLINE)
    return [box]


wait_path = functools.partial(reclaimutil.wait_path, deadline=DEADLINE)
wait_for = functools.partial(reclaimutil.wait_for, deadline=DEADLINE)
assert_reclaimed = functools.partial(reclaimutil.assert_reclaimed, deadline=DEADLINE)


def on(node) -> lattica.NodeAffinitySchedulingStrategy:
    return lattica.NodeAffinitySchedulingStrategy(node.node_id)


def test_actor_on_a_node_process_is_reclaimed_when_the_driver_drops_it(mesh):
    host = mesh["nodes"][0]
    box = Box.options(scheduling_strategy=on(host)).remote()
    assert lattica.get(box.node.remote(), timeout=DEADLINE) == host.node_id
    pid, actor_id = lattica.get(box.pid.remote(), timeout=DEADLINE), box.actor_id
    del box
    assert_reclaimed(pid, actor_id)


def test_a_copy_borrowed_on_another_node_keeps_it_until_the_task_ends(mesh, tmp_path):
    host, other = mesh["nodes"]
    box = Box.options(scheduling_strategy=on(host)).remote()
    pid, actor_id = lattica.get(box.pid.remote(), timeout=DEADLINE), box.actor_id
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    result = use_after.options(scheduling_strategy=on(other)).remote(box, started, go)
    del box
    wait_path(started)
    gc.collect()
    assert process_alive(pid)
    assert actor_row(actor_id).state == "ALIVE"
    open(go, "w").close()
    assert lattica.get(result, timeout=DEADLINE) == pid
    del result
    assert_reclaimed(pid, actor_id)


def test_a_copy_kept_by_an_actor_on_another_node_keeps_it(mesh):
    """The holder's node borrows the handle from the driver (the owner) over
    /latticaray/ref/1: once the call that passed it is done, that borrow is all that holds it."""
    host, other = mesh["nodes"]
    box = Box.options(scheduling_strategy=on(host)).remote()
    holder = Box.options(scheduling_strategy=on(other)).remote()
    pid, actor_id = lattica.get(box.pid.remote(), timeout=DEADLINE), box.actor_id
    lattica.get(holder.set_inner.remote(box), timeout=DEADLINE)
    del box
    gc.collect()
    assert lattica.get(holder.inner_pid.remote(), timeout=DEADLINE) == pid
    assert actor_row(actor_id).state == "ALIVE"
    lattica.get(holder.drop_inner.remote(), timeout=DEADLINE)
    assert_reclaimed(pid, actor_id)
    holder_pid, holder_id = lattica.get(holder.pid.remote(), timeout=DEADLINE), holder.actor_id
    del holder
    assert_reclaimed(holder_pid, holder_id)


def test_named_dropped_is_gone_by_name_detached_stays(mesh):
    host = mesh["nodes"][0]
    named = Box.options(name="mesh-reclaim", scheduling_strategy=on(host)).remote()
    kept = Box.options(name="mesh-kept", lifetime="detached", scheduling_strategy=on(host)).remote()
    named_pid, named_id = lattica.get(named.pid.remote(), timeout=DEADLINE), named.actor_id
    kept_pid = lattica.get(kept.pid.remote(), timeout=DEADLINE)
    del kept, named
    assert_reclaimed(named_pid, named_id)

    def name_gone() -> bool:
        try:
            lattica.get_actor("mesh-reclaim")
        except ValueError:
            return True
        return False

    wait_for(name_gone, "the reclaimed actor's name to be freed")
    assert process_alive(kept_pid)
    kept = lattica.get_actor("mesh-kept")
    assert lattica.get(kept.pid.remote(), timeout=DEADLINE) == kept_pid
    lattica.kill(kept)
    wait_for(lambda: not process_alive(kept_pid), "kill() to end the detached actor")


def test_an_actor_owned_by_a_node_process_lives_while_the_driver_holds_it(mesh):
    """A node process owns (and hosts) the actor a task of it created; the driver borrows the
    handle that task returned."""
    creator = mesh["nodes"][0]
    [box] = lattica.get(
        make_box.options(scheduling_strategy=on(creator)).remote(), timeout=DEADLINE
    )
    pid, actor_id = lattica.get(box.pid.remote(), timeout=DEADLINE), box.actor_id
    assert lattica.get(box.node.remote(), timeout=DEADLINE) == creator.node_id
    # the creating task is over: the handle the driver got back is what keeps the actor
    gc.collect()
    assert lattica.get(box.pid.remote(), timeout=DEADLINE) == pid
    assert actor_row(actor_id).state == "ALIVE"
    del box
    assert_reclaimed(pid, actor_id)
