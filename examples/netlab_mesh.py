"""Run the examples across real kernel NATs on one machine, with ../shared/netlab (root).

netlab builds a small internet of network namespaces: public hosts pub1/pub2, and hostA, hostB,
hostC behind their own NAT routers (natA and natB cone, natC symmetric; `--lan-hosts N` adds
hostA2.. behind natA). `LabMesh` brings a lab up under its own prefix, starts a runtime node on
pub1 that creates the mesh and serves relay and AutoNAT, starts worker nodes inside hosts with
the NAT-traversal flags (`latticaray start --nat --observer ... --relay ...`) and the custom
resources an example places its actors by, and runs an example's run.py as the driver inside a
host with the matching flags. Everything it starts is stopped, and the lab taken down, by stop().

    sudo .venv/bin/python examples/netlab_mesh.py sharded_inference
    sudo .venv/bin/python examples/netlab_mesh.py federated_averaging
    sudo .venv/bin/python examples/netlab_mesh.py model_distribution --rate-mbit 40 -- --size-mb 1000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from localmesh import die_with_parent, read_ready_line, stop_processes  # noqa: E402

NETLAB = os.environ.get("NETLAB") or os.path.join(
    os.path.dirname(REPO), "shared", "netlab", "netlab"
)
PUB1 = "198.18.0.11"
NODE_PORT, RELAY_PORT, DRIVER_PORT = 4701, 4702, 4711
HOST_IP = {
    "pub1": PUB1,
    "pub2": "198.18.0.12",
    "hostA": "198.19.1.10",
    "hostB": "198.19.2.10",
    "hostC": "198.19.3.10",
}
HOST_IP.update({f"hostA{i}": f"198.19.1.{9 + i}" for i in range(2, 10)})


def unavailable() -> str | None:
    """Why the lab cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "netlab needs root"
    if not os.access(NETLAB, os.X_OK):
        return f"netlab not found at {NETLAB}"
    return None


class LabMesh:
    """A netlab lab with a latticaray mesh in it (see the module docstring)."""

    def __init__(self, prefix: str, lan_hosts: int = 1, transport: str = "quic"):
        """`transport`: "quic" (NAT traversal: hole punching needs it) or "tcp" (bulk data:
        aioquic's per-packet Python work makes QUIC slow for it; no hole punching)."""
        self.prefix = prefix
        self.transport = transport
        self.processes: list[subprocess.Popen] = []
        self.env = dict(os.environ, NETLAB_PREFIX=prefix, PYTHONPATH=REPO)
        self._netlab("up", "--force", "--lan-hosts", str(lan_hosts))
        try:
            info = self._start(
                "pub1", self._node_args("pub1", "--serve-relay", str(RELAY_PORT)), timeout=60
            )
        except BaseException:
            self.stop()
            raise
        self.invite = info["invite"]
        self.bootstrap = f"{self._addr(PUB1, NODE_PORT)}/p2p/{info['node_id']}"
        self.relay = f"/ip4/{PUB1}/tcp/{RELAY_PORT}/p2p/{info['node_id']}"
        self.observer = f"{PUB1}:{NODE_PORT}"

    def _netlab(self, *args: str) -> None:
        subprocess.run(
            [NETLAB, "--prefix", self.prefix, *args],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def _addr(self, ip: str, port: int) -> str:
        return (
            f"/ip4/{ip}/udp/{port}/quic-v1" if self.transport == "quic" else f"/ip4/{ip}/tcp/{port}"
        )

    def _node_args(self, host: str, *extra: str, cpus: float = 1) -> list[str]:
        return [
            sys.executable,
            "-m",
            "latticaray",
            "start",
            "--num-cpus",
            str(cpus),
            "--lab",
            "--listen",
            f"/ip4/{HOST_IP[host]}/udp/{NODE_PORT}/quic-v1",
            *extra,
        ]

    def _start(self, host: str, args: list[str], timeout: float) -> dict:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", f"{self.prefix}-{host}", *args],
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
            preexec_fn=die_with_parent,
        )
        self.processes.append(proc)
        return read_ready_line(proc, timeout)

    def start_node(self, host: str, resources: dict, cpus: float = 1, nat: bool = True) -> dict:
        """A worker node inside `host`, behind its NAT, offering `resources`; with `nat` it
        takes part in NAT traversal (without, it only dials out and serves its own LAN)."""
        join = ["--bootstrap", self.bootstrap, "--credential", self.invite]
        traversal = ["--nat", "--observer", self.observer, "--relay", self.relay]
        if not nat:
            traversal = ["--no-nat"]
        args = [*join, "--resources", json.dumps(resources), *traversal]
        return self._start(host, self._node_args(host, *args, cpus=cpus), timeout=120)

    def driver_args(self, host: str) -> list[str]:
        """The flags that make an example's run.py a driver inside `host`."""
        args = [
            "--bootstrap",
            self.bootstrap,
            "--credential",
            self.invite,
            "--lab",
            "--listen",
            self._addr(HOST_IP[host], DRIVER_PORT),
        ]
        if not host.startswith("pub") and self.transport == "quic":
            args += ["--observer", self.observer, "--relay", self.relay]
        return args

    def run_example(self, host: str, name: str, args: list[str], timeout: float) -> dict:
        """examples/<name>/run.py as a driver inside `host`; its JSON report (exit 0 required)."""
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                f"{self.prefix}-{host}",
                sys.executable,
                os.path.join(HERE, name, "run.py"),
                *self.driver_args(host),
                *args,
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        print(proc.stdout)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def shape_uplinks(self, hosts: list[str], rate_mbit: float) -> None:
        """Every host's eth0 egress limited to `rate_mbit` (bench/objects_swarm.py's shaping)."""
        sys.path.insert(0, os.path.join(REPO, "bench"))
        from objects_swarm import shape_uplinks

        shape_uplinks(self.prefix, hosts, rate_mbit)

    def stop(self) -> None:
        stop_processes(self.processes)
        subprocess.run(
            [NETLAB, "--prefix", self.prefix, "down"],
            env=self.env,
            capture_output=True,
            timeout=120,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "example", choices=["sharded_inference", "federated_averaging", "model_distribution"]
    )
    parser.add_argument("--prefix", default=os.environ.get("NETLAB_PREFIX", "exl"))
    parser.add_argument("--peers", type=int, default=8, help="model_distribution: peers")
    parser.add_argument("--transport", choices=["quic", "tcp"], default="quic")
    parser.add_argument(
        "--rate-mbit",
        type=float,
        default=None,
        help="shape every host's uplink (model_distribution)",
    )
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []  # for the example's run.py
    args = parser.parse_args(argv[: len(argv) - len(rest) - (1 if rest else 0)])
    args.rest = rest
    if (reason := unavailable()) is not None:
        print(reason)
        return 2
    # stopped by a signal: unwind, so that the lab and its processes are stopped (finally)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.example == "model_distribution":
        # the seed (the driver) on hostA and the N peers on hostA's LAN behind natA (they reach
        # each other directly, as in bench/objects_swarm.py); the 1-peer baseline on hostB,
        # behind natB
        peers = [f"hostA{i}" for i in range(2, args.peers + 2)]
        lab = LabMesh(args.prefix, lan_hosts=len(peers) + 1, transport=args.transport)
        try:
            lab.start_node("hostB", {"ckpt_solo": 1})
            for host in peers:
                lab.start_node(host, {"ckpt_peer": 1})
            if args.rate_mbit:
                lab.shape_uplinks(["hostA", "hostB", *peers], args.rate_mbit)
            lab.run_example(
                "hostA",
                "model_distribution",
                ["--peers", str(args.peers), "--count-tx", "eth0", "--no-bars", *args.rest],
                timeout=3600,
            )
        finally:
            lab.stop()
        return 0
    # sharded inference and FedAvg: nodes on hostB (cone NAT) and hostC (symmetric NAT), the
    # driver on hostA (cone NAT)
    lab = LabMesh(args.prefix)
    try:
        for host in ("hostB", "hostC"):
            lab.start_node(host, {"lm_stage": 1, "fl_client": 4})
        extra = ["--stages", "2"] if args.example == "sharded_inference" else ["--clients", "8"]
        lab.run_example("hostA", args.example, extra + args.rest, timeout=1200)
    finally:
        lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
