"""The runtime over real kernel NATs (netlab): a driver behind a NAT runs tasks on a worker behind
another NAT.

pub1 runs a runtime node that is the mesh's bootstrap, relay and AutoNAT server (the only public
node: NAT types come from its main and alternate observer ports). A worker node
(`python -m latticaray.runtime.node_main --nat ...`) runs inside hostB (cone NAT) or hostC
(symmetric NAT); a driver process inside hostA (cone NAT) joins with
`init(bootstrap=..., credential=..., nat=...)`, meets the worker through pub1 (its circuit address
travels in the runtime views), and runs `remote` tasks that need the worker's custom resource.
The relayed connection is upgraded to direct QUIC (spraying cone<->cone, birthday probing
cone<->symmetric) while tasks run; the relay drains and the task session moves without
re-sending work. Every process is started with `ip netns exec` (bench/netlab_nodes.py, which
the netlab benchmarks use too; each process's stderr in a log file) and stopped by the test.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [os.path.join(ROOT, "tests", "runtime"), os.path.join(ROOT, "bench")]

from meshutil import SESSION_DRIVER_HELPERS  # noqa: E402
from netlab_nodes import QUIC_PORT, LabNode, start_driver, start_pub1  # noqa: E402
from netlab_nodes import start_worker as start_lab_worker  # noqa: E402

pytestmark = pytest.mark.netlab

DRIVER = r"""
import json, logging, sys, time
import latticaray as lattica
logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")
for name in ("latticaray.runtime.remote", "latticaray.mesh.nat"):
    logging.getLogger(name).setLevel(logging.INFO)
from latticaray.runtime import api

bootstrap, credential, relay, listen, worker_resource = sys.argv[1:6]
started = time.monotonic()
lattica.init(bootstrap=[bootstrap], credential=credential, num_cpus=1, listen=[listen],
             nat={"observers": ["198.18.0.11:4701"], "relays": [relay], "lab": True})
joined = time.monotonic() - started

def worker_alive():
    return [n["NodeID"] for n in lattica.nodes()
            if n["Alive"] and n.get("Resources", {}).get(worker_resource)]

deadline = time.monotonic() + 60
while not worker_alive():
    assert time.monotonic() < deadline, lattica.nodes()
    time.sleep(0.05)
worker = worker_alive()[0]
seen = time.monotonic() - started

@lattica.remote
def where(i):
    return lattica.get_runtime_context().node_id, i * i

t0 = time.monotonic()
first = lattica.get(where.options(resources={worker_resource: 0.01}).remote(7), timeout=60)
first_latency = time.monotonic() - t0
mesh_runtime = api._runtime.mesh_runtime
def path_to(node_id):
    peer = next(p for p in mesh_runtime.mesh.connected_peers() if str(p) == node_id)
    conn = mesh_runtime.mesh.connection_to(peer)
    return conn.transport if conn is not None else "none"
first_path = path_to(worker)
results = lattica.get([where.options(resources={worker_resource: 0.01}).remote(i)
                       for i in range(40)], timeout=120)
t1 = time.monotonic()
lattica.get([where.options(resources={worker_resource: 0.01}).remote(i) for i in range(40)],
            timeout=120)
batch_s = time.monotonic() - t1

path = path_to(worker)
deadline = time.monotonic() + 20
while path == "relay" and time.monotonic() < deadline:  # a punch may still be on its way
    time.sleep(0.2)
    path = path_to(worker)
peer = next(p for p in mesh_runtime.mesh.connected_peers() if str(p) == worker)
link = mesh_runtime.nat.links.get(peer)
metrics = link.metrics if link is not None else None
upgrade_s = (metrics.upgraded_at - metrics.started_at if metrics is not None
             and None not in (metrics.upgraded_at, metrics.started_at) else None)
print(json.dumps({"worker": worker, "first": first, "results": results, "join_s": joined,
                  "worker_seen_s": seen, "first_task_s": first_latency,
                  "tasks_40_s": batch_s, "path": path, "first_path": first_path,
                  "sessions_reopened": mesh_runtime.remote.stats["sessions_reopened"],
                  "sessions_moved": mesh_runtime.remote.stats["sessions_moved"],
                  "tasks_resent": mesh_runtime.remote.stats["tasks_resent"],
                  "punch_path": metrics.path if metrics is not None else "none",
                  "upgrade_s": upgrade_s, "drains": mesh_runtime.nat.drains,
                  "advertised": mesh_runtime.advertised_addrs,
                  "timings": mesh_runtime.timings}), flush=True)
lattica.shutdown()
"""


# The driver keeps automatic hole punching off, puts tasks in flight over the relay (each creates
# its own file exclusively, so a second execution fails loudly, and holds until told to go),
# upgrades to direct itself, runs more tasks to completion over the direct path while the held
# ones are still in flight, then lets those finish.
EXACTLY_ONCE = (
    SESSION_DRIVER_HELPERS
    + r"""

bootstrap, credential, relay, listen, resource, workdir = sys.argv[1:7]
lattica.init(bootstrap=[bootstrap], credential=credential, num_cpus=1, listen=[listen],
             nat={"observers": ["198.18.0.11:4701"], "relays": [relay], "lab": True,
                  "hole_punching": False})
runtime = api._runtime.mesh_runtime

def worker_alive():
    return nodes_offering(resource)
wait_for(worker_alive, "the worker never showed up")
worker = worker_alive()[0]
peer = next(p for p in runtime.mesh.connected_peers() if str(p) == worker)

def transports():
    return sorted(c.transport for c in runtime.mesh.connections.connections(peer) if not c.closed)

opts = dict(resources={resource: 0.01})
held = [step.options(**opts).remote(i, workdir, True) for i in range(4)]
wait_for(lambda: all(os.path.exists(os.path.join(workdir, f"run-{i}")) for i in range(4)),
         "the held tasks never started")
path_before = runtime.mesh.connection_to(peer).transport

async def upgrade():
    task = runtime.nat.upgrade(peer)
    return await task if task is not None else None
t0 = time.monotonic()
upgraded = asyncio.run_coroutine_threadsafe(upgrade(), api._runtime.loop).result(60)
upgrade_s = time.monotonic() - t0
path_after = runtime.mesh.connection_to(peer).transport
more = lattica.get([step.options(**opts).remote(i, workdir, False) for i in range(4, 8)],
                   timeout=60)
during = transports()           # the held tasks' replies are still owed over the relay
ready, _ = lattica.wait(held, num_returns=len(held), timeout=0)
open(os.path.join(workdir, "go"), "w").close()
results = lattica.get(held, timeout=120) + more
wait_for(lambda: transports() == ["quic"], "the relayed connection was never closed", 60)
print(json.dumps({"worker": worker, "results": results, "path_before": path_before,
                  "upgraded": upgraded, "upgrade_s": upgrade_s, "path_after": path_after,
                  "during": during, "held_done_before_go": len(ready),
                  "after": transports(), "drains": runtime.nat.drains,
                  "stats": {k: runtime.remote.stats[k] for k in
                            ("sessions_moved", "sessions_reopened", "tasks_resent")}}), flush=True)
lattica.shutdown()
"""
)


@pytest.fixture(scope="module")
def runtime_lab(nat_lab, tmp_path_factory):
    processes: list[LabNode] = []
    try:
        pub1, env = start_pub1(nat_lab[0], str(tmp_path_factory.mktemp("runtime-over-nat")), cpus=1)
        processes.append(pub1)
        yield {**env, "processes": processes}
    finally:
        for process in processes:
            process.stop()


def start_worker(
    lab: dict, host: str, resource: str | None = None, port: int = QUIC_PORT, cpus: int = 1
) -> tuple[LabNode, dict]:
    worker, info = start_lab_worker(
        lab, host, {resource or f"on_{host}": 1}, cpus, name=f"{host}-{port}", port=port
    )
    lab["processes"].append(worker)
    return worker, info


def run_driver(
    lab: dict, worker_host: str, script: str = DRIVER, *extra: str, resource: str | None = None
) -> dict:
    driver = start_driver(lab, "hostA", script, resource or f"on_{worker_host}", *extra)
    try:
        out = driver.wait_output(240)
        assert driver.proc.returncode == 0, driver.log_tail(4000)
        return json.loads(out.strip().splitlines()[-1])
    finally:
        driver.stop()


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def check_report(report: dict, worker_info: dict) -> None:
    assert report["worker"] == worker_info["node_id"]
    assert report["first"] == [worker_info["node_id"], 49]
    assert report["results"] == [[worker_info["node_id"], i * i] for i in range(40)]
    print(
        f"\nruntime over NAT: join {report['join_s']:.2f} s, worker seen after "
        f"{report['worker_seen_s']:.2f} s, first task {report['first_task_s'] * 1000:.0f} ms, "
        f"40 tasks {report['tasks_40_s'] * 1000:.0f} ms, path at first task "
        f"{report['first_path']}, final path {report['path']} ({report['punch_path']}, "
        f"upgrade {_ms(report['upgrade_s'])}), task sessions moved {report['sessions_moved']}, "
        f"reopened {report['sessions_reopened']}, tasks re-sent {report['tasks_resent']}"
    )


def test_driver_behind_cone_nat_runs_tasks_on_worker_behind_cone_nat(runtime_lab):
    _worker, info = start_worker(runtime_lab, "hostB")
    assert any("p2p-circuit" in a for a in info["advertised"]), info
    report = run_driver(runtime_lab, "hostB")
    check_report(report, info)
    assert any("p2p-circuit" in a for a in report["advertised"]), report
    assert report["path"] == "quic", report  # hole punched: the relayed connection was replaced
    assert report["sessions_reopened"] == 0 and report["tasks_resent"] == 0, report


def test_worker_behind_symmetric_nat_upgrades_to_direct_by_birthday_probing(runtime_lab):
    _worker, info = start_worker(runtime_lab, "hostC")
    assert any("p2p-circuit" in a for a in info["advertised"]), info
    assert info["timings"]["nat_type"] == "NatType.ENDPOINT_DEPENDENT", info["timings"]
    report = run_driver(runtime_lab, "hostC")
    check_report(report, info)
    assert report["timings"]["nat_type"] == "NatType.ENDPOINT_INDEPENDENT", report["timings"]
    assert report["path"] == "quic" and report["punch_path"] == "birthday", report
    assert report["sessions_reopened"] == 0 and report["tasks_resent"] == 0, report


def test_tasks_in_flight_during_the_upgrade_run_exactly_once(runtime_lab, tmp_path):
    """Relayed -> direct (birthday probing, cone driver <-> symmetric worker) while 4 tasks are
    running over the relay: new tasks go direct, the held ones reply over the draining relay,
    the relayed connection then closes, and every task ran once (no re-sent work)."""
    _worker, info = start_worker(
        runtime_lab, "hostC", resource="eo_hostC", port=QUIC_PORT + 20, cpus=8
    )
    workdir = tmp_path / "runs"
    workdir.mkdir()
    report = run_driver(runtime_lab, "hostC", EXACTLY_ONCE, str(workdir), resource="eo_hostC")
    node = info["node_id"]
    assert report["worker"] == node
    assert report["results"] == [[node, i * i] for i in range(8)], report
    assert sorted(os.listdir(workdir)) == ["go"] + [f"run-{i}" for i in range(8)]
    assert report["path_before"] == "relay" and report["upgraded"] is True, report
    assert report["path_after"] == "quic" and report["after"] == ["quic"], report
    assert report["held_done_before_go"] == 0, report
    assert set(report["during"]) == {"quic", "relay"}, report  # drained, not cut
    assert report["stats"]["sessions_moved"] >= 1, report
    assert report["stats"]["sessions_reopened"] == 0 and report["stats"]["tasks_resent"] == 0, (
        report
    )
    # the relayed connection that carried the held tasks' session drained before it closed
    busy = [d for d in report["drains"] if d["active_at_start"] > 0]
    assert busy and all(
        d["active_at_close"] == 0 and d["outcome"] in ("drained", "closed by peer or idle reaper")
        for d in report["drains"]
    ), report
    drain = busy[0]
    print(f"\n{json.dumps({k: report[k] for k in ('stats', 'drains', 'during')})}")
    print(
        f"upgrade with 4 tasks in flight: {report['upgrade_s']:.2f} s, relay drained in "
        f"{drain.get('drain_s', 0):.2f} s ({drain['outcome']}), 8/8 tasks ran once"
    )
