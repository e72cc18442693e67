"""Member liveness on a real mesh (loopback): this process is the driver, node processes join it.

* every connection to a node is cut while its tasks and an actor call are in flight: the node is
  redialed, the task sessions suspend and resume, the work runs once and nothing is lost;
* a node stopped (SIGSTOP) for 5 s is suspected, never declared gone, and its work completes;
* a node killed and restarted at once under the same key is seen as a new process (its `inc`)
  before any silence could show it: its work is retried and its actor restarted;
* a node that stops cleanly (`bye`) is gone at once, not after the liveness window.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import types

import pytest
from meshutil import NodeProcess, alive_nodes, driver_with_nodes, wait_for

import latticaray as lattica
from latticaray.runtime import api
from latticaray.runtime.remote.wire import VIEW_PROTOCOL, RuntimeView


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(0) as cluster:
        yield cluster


def remote_runtime():
    return api._runtime.mesh_runtime.remote


def on_loop(fn):
    """Run ``fn()`` on the driver node's loop; its result."""

    async def call():
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), api._runtime.loop).result(30)


@lattica.remote
def run_once(workdir, i, hold):
    """Creates its own file exclusively (a second execution fails), then waits for `go`."""
    fd = os.open(os.path.join(workdir, f"run-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    deadline = time.monotonic() + 120
    while hold and not os.path.exists(os.path.join(workdir, "go")):
        if time.monotonic() > deadline:
            raise TimeoutError("never told to go")
        time.sleep(0.02)
    return lattica.get_runtime_context().node_id, i


@lattica.remote
class Journal:
    def __init__(self, workdir):
        self.workdir = workdir

    def write(self, i, hold):
        fd = os.open(os.path.join(self.workdir, f"call-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        deadline = time.monotonic() + 120
        while hold and not os.path.exists(os.path.join(self.workdir, "go")):
            if time.monotonic() > deadline:
                raise TimeoutError("never told to go")
            time.sleep(0.02)
        return i

    def node(self):
        return lattica.get_runtime_context().node_id


def pinned(node_id):
    return lattica.NodeAffinitySchedulingStrategy(node_id, soft=False)


def join(mesh, *extra) -> NodeProcess:
    node = NodeProcess(mesh["addr"], mesh["invite"], num_cpus=8, extra_args=extra)
    wait_for(lambda: node.node_id in alive_nodes(), 30, "the node to join")
    return node


def test_a_cut_connection_is_redialed_and_the_work_in_flight_runs_once(mesh, tmp_path):
    node = join(mesh)
    try:
        stats = remote_runtime().stats
        lost_before = stats["peers_lost"]
        workdir = str(tmp_path)
        journal = Journal.options(scheduling_strategy=pinned(node.node_id)).remote(workdir)
        assert lattica.get(journal.node.remote(), timeout=60) == node.node_id
        held = [
            run_once.options(scheduling_strategy=pinned(node.node_id)).remote(workdir, i, True)
            for i in range(4)
        ]
        call = journal.write.remote(0, True)
        wait_for(
            lambda: (
                all(os.path.exists(os.path.join(workdir, f"run-{i}")) for i in range(4))
                and os.path.exists(os.path.join(workdir, "call-0"))
            ),
            60,
            "the work to start on the node",
        )
        mesh_node = api._runtime.mesh_runtime.mesh
        peer = next(p for p in mesh_node.connected_peers() if str(p) == node.node_id)
        for conn in on_loop(lambda: mesh_node.connections.connections(peer)):
            api._runtime.loop.call_soon_threadsafe(conn.close, "test: the path breaks")
        wait_for(lambda: stats["sessions_suspended"] >= 1, 30, "the task session to suspend")
        open(os.path.join(workdir, "go"), "w").close()
        assert lattica.get(held, timeout=120) == [(node.node_id, i) for i in range(4)]
        assert lattica.get(call, timeout=120) == 0
        assert lattica.get(journal.write.remote(1, False), timeout=60) == 1
        assert sorted(os.listdir(workdir)) == ["call-0", "call-1", "go"] + [
            f"run-{i}" for i in range(4)
        ]
        assert stats["sessions_reopened"] >= 1
        assert stats["peers_lost"] == lost_before  # never declared gone
        assert node.node_id in alive_nodes()
    finally:
        node.stop()


def test_a_node_paused_for_5_s_is_suspected_not_lost(mesh, tmp_path):
    node = join(mesh)
    try:
        stats = remote_runtime().stats
        lost_before, suspected_before = stats["peers_lost"], stats["peers_suspected"]
        workdir = str(tmp_path)
        refs = [
            run_once.options(scheduling_strategy=pinned(node.node_id)).remote(workdir, i, False)
            for i in range(20)
        ]
        node.proc.send_signal(signal.SIGSTOP)
        try:
            paused = time.monotonic()
            wait_for(
                lambda: stats["peers_suspected"] > suspected_before, 30, "the node to be suspected"
            )
            time.sleep(max(0.0, 5.0 - (time.monotonic() - paused)))
        finally:
            node.proc.send_signal(signal.SIGCONT)
        assert lattica.get(refs, timeout=120) == [(node.node_id, i) for i in range(20)]
        report = on_loop(remote_runtime().membership.liveness_report)
        assert report["members"][node.node_id]["state"] == "alive", report
        assert stats["peers_lost"] == lost_before
        assert sorted(os.listdir(workdir)) == sorted(f"run-{i}" for i in range(20))
    finally:
        node.stop()


def test_a_node_restarted_under_the_same_key_is_a_new_process(mesh, tmp_path):
    key = str(tmp_path / "node.key")
    node = join(mesh, "--key-path", key)
    restarted = None
    try:
        stats = remote_runtime().stats
        lost_before = stats["peers_lost"]
        journal = Journal.options(
            scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(node.node_id, soft=True),
            max_restarts=1,
        ).remote(str(tmp_path))
        assert lattica.get(journal.node.remote(), timeout=60) == node.node_id
        node_id = node.node_id
        node.kill9()
        killed = time.monotonic()
        restarted = NodeProcess(
            mesh["addr"], mesh["invite"], num_cpus=8, extra_args=("--key-path", key)
        )
        assert restarted.node_id == node_id
        wait_for(lambda: stats["peers_lost"] > lost_before, 30, "the old process to be gone")
        seen = time.monotonic() - killed
        # the new process's view says so at once; silence alone would take the liveness window
        assert seen < remote_runtime().membership.liveness.config.min_down_after, seen
        wait_for(lambda: node_id in alive_nodes(), 30, "the new process to be admitted")
        assert lattica.get(journal.write.remote(5, False), timeout=60) == 5
        assert lattica.get(
            run_once.options(scheduling_strategy=pinned(node_id)).remote(str(tmp_path), 7, False),
            timeout=60,
        ) == (node_id, 7)
    finally:
        node.stop()
        if restarted is not None:
            restarted.stop()


def test_a_node_that_stops_cleanly_is_gone_at_once(mesh):
    node = join(mesh)
    stats = remote_runtime().stats
    lost_before = stats["peers_lost"]
    stopped = time.monotonic()
    node.stop()
    wait_for(lambda: node.node_id not in alive_nodes(), 10, "the node to be gone")
    assert time.monotonic() - stopped < 5.0
    assert stats["peers_lost"] == lost_before + 1
    report = on_loop(remote_runtime().membership.liveness_report)
    assert node.node_id not in report["members"]  # it said bye: not redialed


def test_a_view_pushed_before_bye_that_arrives_after_it_does_not_bring_the_node_back(mesh):
    # the view loop's pushes and the `bye` travel on different streams: one pushed just before
    # the node stopped may be served after its `bye`; the same process stays gone, while a
    # new one under the same peer id (a new incarnation) is admitted
    node = join(mesh)
    membership = remote_runtime().membership
    peer = membership.peers[node.node_id]
    old_inc = peer.incarnation
    assert old_inc is not None
    node.stop()
    wait_for(lambda: node.node_id not in alive_nodes(), 10, "the node to be gone")
    ctx = types.SimpleNamespace(peer_id=peer.peer_id, service=VIEW_PROTOCOL)

    def late_view(inc):
        payload = RuntimeView({"CPU": 8.0}, {"CPU": 8.0}, 0, 0, {}, [], inc, False).encode()
        return asyncio.run_coroutine_threadsafe(
            membership.serve_view(ctx, payload), api._runtime.loop
        ).result(30)

    ignored = remote_runtime().stats["late_views_ignored"]
    late_view(old_inc)
    assert remote_runtime().stats["late_views_ignored"] == ignored + 1
    assert node.node_id not in alive_nodes()
    late_view(os.urandom(8))  # a new process under the same key
    assert node.node_id in alive_nodes()
    on_loop(lambda: membership.peer_gone(node.node_id, "test: the new process is not real"))
