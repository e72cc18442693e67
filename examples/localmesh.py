"""Connect an example's driver to a mesh: a local one it starts, or an existing one it joins.

`start_local(node_resources)` makes this process the mesh's first node (an embedded driver,
`lattica.init(_mesh=True, ...)`) and starts one `latticaray start` node process per entry of
`node_resources`, each offering those custom resources (an example places its actors by them);
`join(bootstrap, credential, nat)` joins a mesh someone else started, e.g. across NATs. Both
return a `Mesh` whose `stop()` stops what it started. The examples' `--bootstrap`,
`--credential`, `--observer` and `--relay` flags come from `add_mesh_args`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

import latticaray as lattica


class Mesh:
    """The driver's view of the mesh it joined, and the node processes it started."""

    def __init__(self, processes: list[subprocess.Popen] | None = None):
        self.processes = processes or []
        self.node_ids: list[str] = []  # of the started node processes, in order

    def wait_for_nodes(self, resource: str, count: int, timeout: float = 60.0) -> list[str]:
        """Ids of the `count` (or more) alive nodes offering `resource`, waiting for them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                n["NodeID"]
                for n in lattica.nodes()
                if n["Alive"] and n.get("Resources", {}).get(resource)
            ]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(found)} of {count} nodes offering {resource!r}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_processes(self.processes)
        lattica.shutdown()


def paths_between(node_ids: list[str]) -> list[dict]:
    """How the nodes `node_ids` are connected to each other, as the state API reports it: one
    {"src", "dst", "path" (direct, punched, relayed, unix), "transport", "rtt_ms"} per link
    (the node ids cut to 12 characters); empty if the state could not be read."""
    from latticaray.util import state

    wanted = set(node_ids)
    try:
        links = state.list_links(raise_on_missing_output=False, timeout=10)
    except Exception:
        return []
    return [
        {
            "src": link.src[:12],
            "dst": link.dst[:12],
            "path": link.path,
            "transport": link.transport,
            "rtt_ms": None if link.rtt_ms is None else round(link.rtt_ms, 1),
        }
        for link in links
        if link.src in wanted and link.dst in wanted
    ]


def read_ready_line(proc: subprocess.Popen, timeout: float) -> dict:
    """The JSON line a `latticaray start` process prints once it is up, waiting `timeout` s."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"a node process was not ready within {timeout} s (or exited)")
    return json.loads(line)


def die_with_parent() -> None:
    """For Popen(preexec_fn=...): the child is killed if this process dies (Linux), so node
    processes never outlive a driver that was killed before it could stop them."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each (a node stops cleanly on it), then SIGKILL what is left after 15 s."""
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def machine_info(**versions: str) -> dict:
    """What a measured figure needs next to it: the machine, its load, the versions."""
    import numpy as np

    return {
        "cpus": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "latticaray": lattica.__version__,
        **versions,
    }


def start_local(
    node_resources: list[dict],
    cpus_per_node: float = 1,
    driver_cpus: float = 1,
    driver_listen: tuple[str, ...] = ("/ip4/127.0.0.1/udp/0/quic-v1",),
) -> Mesh:
    """This process as an embedded driver node (listening on `driver_listen`; the node
    processes bootstrap from the first) plus one node process per `node_resources`."""
    lattica.init(_mesh=True, num_cpus=driver_cpus, listen=list(driver_listen))
    info = lattica.mesh_info()
    invite = lattica.invite()
    mesh = Mesh()
    try:
        for resources in node_resources:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "latticaray",
                    "start",
                    "--num-cpus",
                    str(cpus_per_node),
                    "--resources",
                    json.dumps(resources),
                    "--listen",
                    "/ip4/127.0.0.1/udp/0/quic-v1",
                    "--bootstrap",
                    info["address"][0],
                    "--credential",
                    invite,
                ],
                stdout=subprocess.PIPE,
                text=True,
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
                preexec_fn=die_with_parent,
            )
            mesh.processes.append(proc)
            mesh.node_ids.append(read_ready_line(proc, timeout=120)["node_id"])
        deadline = time.monotonic() + 60
        while not set(mesh.node_ids) <= {n["NodeID"] for n in lattica.nodes() if n["Alive"]}:
            if time.monotonic() > deadline:
                raise TimeoutError("the node processes did not join the mesh")
            time.sleep(0.05)
    except BaseException:
        mesh.stop()
        raise
    return mesh


def join(args: argparse.Namespace, driver_cpus: float = 1) -> Mesh:
    """Join the mesh named by --bootstrap/--credential (NAT traversal with --observer/--relay)."""
    nat = None
    if args.observer or args.relay:
        nat = {"observers": args.observer, "relays": args.relay, "lab": args.lab}
    lattica.init(
        bootstrap=args.bootstrap,
        credential=args.credential,
        num_cpus=driver_cpus,
        listen=args.listen or None,
        nat=nat,
    )
    return Mesh()


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "joining an existing mesh (default: start a local one on this machine)"
    )
    group.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR")
    group.add_argument("--credential", default=os.environ.get("LATTICARAY_CREDENTIAL"))
    group.add_argument("--listen", action="append", default=[], metavar="MULTIADDR")
    group.add_argument(
        "--observer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a public node's QUIC endpoint, for NAT traversal",
    )
    group.add_argument(
        "--relay",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="a relay's /ip4/.../tcp/.../p2p/... address, for NAT traversal",
    )
    group.add_argument(
        "--lab", action="store_true", help="treat netlab's 198.18.0.0/15 addresses as public"
    )
