"""A task session moves to a better path with work in flight, on loopback (no root needed).

The path change here is QUIC -> same-host Unix socket instead of relay -> hole-punched QUIC: the
runtime code under test (MeshCluster's fence and retiring sessions) does not depend on which
transports are involved. The driver runs with `nat={"lab": True, "auto_configure": False}`,
which only turns its automatic same-host upgrade off, so the test decides when the better
connection appears: after four tasks are running over QUIC. Every task creates its own file
exclusively, so a second execution fails loudly; the node and the driver are child processes
the test always stops.
"""

import os
import sys

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "runtime"
    ),
)

from meshutil import SESSION_DRIVER_HELPERS, run_session_driver

DRIVER = (
    SESSION_DRIVER_HELPERS
    + r"""

bootstrap, credential, workdir = sys.argv[1:4]
lattica.init(bootstrap=[bootstrap], credential=credential, num_cpus=1,
             listen=["/ip4/127.0.0.1/udp/0/quic-v1"], nat={"lab": True, "auto_configure": False})
runtime = api._runtime.mesh_runtime

def worker_alive():
    return nodes_offering("mv")
wait_for(worker_alive, "the node never showed up")
worker = worker_alive()[0]
peer = next(p for p in runtime.mesh.connected_peers() if str(p) == worker)

def unix_addrs():
    return [a for a in runtime.mesh.addrs_of(peer) if a.transport == "unix"]
wait_for(unix_addrs, "identify never told us the node's unix address")

opts = dict(resources={"mv": 0.01})
held = [step.options(**opts).remote(i, workdir, True) for i in range(4)]
wait_for(lambda: all(os.path.exists(os.path.join(workdir, f"run-{i}")) for i in range(4)),
         "the held tasks never started")
path_before = runtime.mesh.connection_to(peer).transport
upgraded = asyncio.run_coroutine_threadsafe(
    runtime.mesh.connections.upgrade(peer, unix_addrs()[0]), api._runtime.loop).result(30)
more = lattica.get([step.options(**opts).remote(i, workdir, False) for i in range(4, 8)],
                   timeout=60)
ready, _ = lattica.wait(held, num_returns=len(held), timeout=0)
state = task_sessions_to(worker)
retiring_before_go = len(state.retiring)
open(os.path.join(workdir, "go"), "w").close()
results = lattica.get(held, timeout=120) + more
wait_for(lambda: not state.retiring, "the old task session was never closed")
print(json.dumps({"worker": worker, "results": results, "path_before": path_before,
                  "path_after": upgraded.transport, "held_done_before_go": len(ready),
                  "retiring_before_go": retiring_before_go,
                  "stats": {k: runtime.remote.stats[k] for k in
                            ("sessions_moved", "sessions_reopened", "tasks_resent")}}), flush=True)
lattica.shutdown()
"""
)


def test_task_session_moves_to_a_better_path_and_tasks_in_flight_run_once(tmp_path):
    info, report = run_session_driver(DRIVER, tmp_path, {"mv": 1}, 8)
    workdir = tmp_path / "runs"
    worker = info["node_id"]
    assert report["worker"] == worker
    assert report["results"] == [[worker, i * i] for i in range(8)], report
    assert sorted(os.listdir(workdir)) == ["go"] + [f"run-{i}" for i in range(8)]
    assert report["path_before"] == "quic" and report["path_after"] == "unix", report
    # the held tasks were still owed on the old session while new work ran on the new one
    assert report["held_done_before_go"] == 0 and report["retiring_before_go"] == 1, report
    assert report["stats"] == {"sessions_moved": 1, "sessions_reopened": 0, "tasks_resent": 0}, (
        report
    )
