"""Runtime node and driver processes inside netlab namespaces, for bench/lossy_wan.py and
bench/chaos.py (and their netlab tests), and the runtime's other netlab tests (over NAT, zero-flag
join, the notebook).

:class:`LabNode` starts a process with ``ip netns exec`` whose stderr goes to a log file (never a
pipe nobody reads: a chatty node would block on a full pipe), reads its JSON ready line with a
deadline, can be killed with SIGKILL and is always reaped by :meth:`LabNode.stop`. Node processes
log the runtime's membership decisions (INFO of ``latticaray.runtime.remote``), so a caller can
count "is gone" lines afterwards.
"""

from __future__ import annotations

import json
import os
import platform
import selectors
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUB1 = "198.18.0.11"
HOST_IPS = {
    "hostA": "198.19.1.10",
    "hostB": "198.19.2.10",
    "hostC": "198.19.3.10",
    "hostD": "198.18.0.31",
    "pub2": "198.18.0.12",
}
for _n in range(2, 10):
    for _site, _net in (("A", 1), ("B", 2), ("C", 3)):
        HOST_IPS[f"host{_site}{_n}"] = f"198.19.{_net}.{9 + _n}"
QUIC_PORT = 4701
RELAY_PORT = 4702

# a node process that logs the runtime's membership decisions (INFO) on stderr
LOGGING_NODE = (
    "import logging, sys; "
    "logging.basicConfig(level=logging.WARNING, stream=sys.stderr, "
    "format='%(asctime)s %(name)s %(levelname)s %(message)s'); "
    "logging.getLogger('latticaray.runtime.remote').setLevel(logging.INFO); "
    "from latticaray.runtime.node_main import main; sys.exit(main(sys.argv[1:]))"
)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies (no orphaned lab processes)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LabNode:
    """One process inside a lab namespace, its stderr in ``log_path``; :meth:`stop` reaps it."""

    def __init__(
        self,
        prefix: str,
        host: str,
        args: list[str],
        log_path: str,
        stdin: bool = False,
        env: dict | None = None,
    ):
        self.host = host
        self.args = args
        self.log_path = log_path
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([ROOT, *(p for p in sys.path if p)]),
            **(env or {}),  # may name another PYTHONPATH (bench/join_time.py --baseline)
        }
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", f"{prefix}-{host}", *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready_line(self, timeout: float) -> dict:
        """The JSON line the process prints when it is ready."""
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not selector.select(timeout):
                raise AssertionError(f"{self.host}: no ready line within {timeout} s")
        finally:
            selector.close()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"{self.host}: process exited: {self.log_tail()}")
        return json.loads(line)

    def wait_output(self, timeout: float) -> str:
        """Wait for the process to exit (killed after ``timeout``); its whole stdout."""
        assert self.proc.stdout is not None
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=30)
        return out.decode(errors="replace") if out else ""

    def kill9(self) -> None:
        """SIGKILL the node process (``ip netns exec`` execs it: the pid is the node's)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._log.close()

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def rss_mb(self) -> float | None:
        """Resident memory of the node process and its worker processes, in MB."""
        if not self.alive():
            return None
        total = 0
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        return total / 1e6


def _descendants(pid: int) -> list[int]:
    out = []
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return out
    for child in children:
        out.append(int(child))
        out.extend(_descendants(int(child)))
    return out


def node_args(
    host_ip: str, *extra: str, port: int = QUIC_PORT, cpus: float = 1, key_path: str | None = None
) -> list[str]:
    """A node process (node_main) listening on QUIC at ``host_ip``, logging membership."""
    args = [
        sys.executable,
        "-c",
        LOGGING_NODE,
        "--num-cpus",
        str(cpus),
        "--listen",
        f"/ip4/{host_ip}/udp/{port}/quic-v1",
        "--lab",
    ]
    if key_path is not None:
        args += ["--key-path", key_path]
    return [*args, *extra]


def start_pub1(prefix: str, logdir: str, cpus: float = 0) -> tuple[LabNode, dict]:
    """The bootstrap + relay + AutoNAT node on pub1; returns it and the lab's join settings."""
    node = LabNode(
        prefix,
        "pub1",
        node_args(PUB1, "--serve-relay", str(RELAY_PORT), cpus=cpus),
        os.path.join(logdir, "pub1.log"),
    )
    info = _ready(node)
    env = {
        "prefix": prefix,
        "invite": info["invite"],
        "bootstrap": f"/ip4/{PUB1}/udp/{QUIC_PORT}/quic-v1/p2p/{info['node_id']}",
        "relay": f"/ip4/{PUB1}/tcp/{RELAY_PORT}/p2p/{info['node_id']}",
        "pub1": info["node_id"],
        "logdir": logdir,
    }
    return node, env


def worker_args(env: dict, host: str, resources: dict, cpus: float = 2, **kw) -> list[str]:
    return node_args(
        HOST_IPS[host],
        "--bootstrap",
        env["bootstrap"],
        "--credential",
        env["invite"],
        "--resources",
        json.dumps(resources),
        "--nat",
        "--observer",
        f"{PUB1}:{QUIC_PORT}",
        "--relay",
        env["relay"],
        cpus=cpus,
        **kw,
    )


def start_worker(
    env: dict, host: str, resources: dict, cpus: float = 2, name: str | None = None, **kw
) -> tuple[LabNode, dict]:
    """A worker node behind ``host``'s NAT, joined through pub1; returns it and its ready line."""
    node = LabNode(
        env["prefix"],
        host,
        worker_args(env, host, resources, cpus, **kw),
        os.path.join(env["logdir"], f"{name or host}.log"),
    )
    return node, _ready(node)


def start_driver(
    env: dict, host: str, script: str, *argv: str, port: int = QUIC_PORT + 10, stdin: bool = False
) -> LabNode:
    """A driver process (``python -c script bootstrap invite relay listen *argv``)."""
    return LabNode(
        env["prefix"],
        host,
        [
            sys.executable,
            "-c",
            script,
            env["bootstrap"],
            env["invite"],
            env["relay"],
            f"/ip4/{HOST_IPS[host]}/udp/{port}/quic-v1",
            *argv,
        ],
        os.path.join(env["logdir"], f"driver-{host}.log"),
        stdin=stdin,
    )


def _ready(node: LabNode, timeout: float = 120) -> dict:
    """The node's ready line; the node is stopped if it never gives one."""
    try:
        return node.ready_line(timeout)
    except BaseException:
        node.stop()
        raise


def lab_unavailable() -> bool:
    """Whether the lab cannot run here (the reason said on stderr; a benchmark then exits 2)."""
    from netlab_util import netlab_available

    reason = netlab_available()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
    return reason is not None


def run_facts(**versions: str) -> dict:
    """The machine and versions a benchmark's JSON line reports (python, aioquic, and
    ``versions``)."""
    import aioquic

    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "aioquic": getattr(aioquic, "__version__", "?"),
            **versions,
        },
    }


def lost_lines(text: str) -> list[str]:
    """Log lines where a node declared a peer gone (not one that said it was leaving)."""
    return [
        line for line in text.splitlines() if " is gone (" in line and "(left the mesh)" not in line
    ]


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
