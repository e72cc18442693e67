"""Helpers for multi-process mesh tests: start node processes, wait for them, stop them."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import latticaray as lattica


def _die_with_parent() -> None:
    """Children of a test never outlive it, even if the test process is killed."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class NodeProcess:
    """A `python -m latticaray.runtime.node_main` child; stop() always reaps it."""

    def __init__(
        self,
        bootstrap: str | None,
        credential: str | None,
        num_cpus: float = 1,
        extra_args: tuple[str, ...] = (),
    ):
        args = [
            sys.executable,
            "-m",
            "latticaray.runtime.node_main",
            "--num-cpus",
            str(num_cpus),
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            *extra_args,
        ]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        if credential:
            args += ["--credential", credential]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=_die_with_parent
        )
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError("node process exited before it was ready")
        self.info = json.loads(line)
        self.node_id = self.info["node_id"]

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """A node killed with -9 cannot remove its shared-memory store: do it for it."""
        pid = self.proc.pid
        for root in glob.glob(f"/dev/shm/latticaray-{os.getuid()}/store-{pid}-*") + glob.glob(
            os.path.join(tempfile.gettempdir(), f"latticaray-spill-{os.getuid()}", f"store-{pid}-*")
        ):
            shutil.rmtree(root, ignore_errors=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._remove_leftovers()


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in lattica.nodes() if n["Alive"] and n.get("Resources")}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def driver_with_nodes(count: int = 2, node_args: tuple[str, ...] = (), peering: str | None = None):
    """This process as the mesh's first node (embedded driver) plus ``count`` node processes
    (started with ``node_args`` too; ``peering``: every one of them, default the product's)."""
    if peering is not None:
        node_args = ("--peering", peering, *node_args)
    lattica.init(_mesh=True, num_cpus=1, listen=["/ip4/127.0.0.1/udp/0/quic-v1"], peering=peering)
    nodes = []
    try:
        info = lattica.mesh_info()
        invite = lattica.invite()
        for _ in range(count):
            nodes.append(NodeProcess(info["address"][0], invite, extra_args=node_args))
        wait_for(lambda: len(alive_nodes()) >= count + 1, 30, f"{count + 1} alive nodes")
        yield {
            "addr": info["address"][0],
            "invite": invite,
            "nodes": nodes,
            "driver": info["node_id"],
        }
    finally:
        for node in nodes:
            node.stop()
        lattica.shutdown()


# The start of a driver script run as a child process by the task-session tests: a deadline wait,
# the nodes offering a resource, and a task that records its run in a file it creates exclusively
# (a second execution fails loudly) and, with `hold`, waits until told to go.
SESSION_DRIVER_HELPERS = r"""
import asyncio, json, os, sys, time
import latticaray as lattica
from latticaray.runtime import api

def wait_for(cond, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)

def nodes_offering(resource):
    return [n["NodeID"] for n in lattica.nodes()
            if n["Alive"] and n.get("Resources", {}).get(resource)]

def join_mesh(bootstrap, credential):
    # this driver joins the node's mesh (QUIC on loopback, no NAT probing); its MeshRuntime
    lattica.init(bootstrap=[bootstrap], credential=credential, num_cpus=1,
                 listen=["/ip4/127.0.0.1/udp/0/quic-v1"],
                 nat={"lab": True, "auto_configure": False})
    return api._runtime.mesh_runtime

def reconnect_then_break(bootstrap, sessions):
    # a fresh QUIC connection to the node (answered over: the node has it too, so this driver
    # stays connected), then the path the task session runs on breaks: the session reopens
    from latticaray.mesh.identify import PING_PROTOCOL
    from latticaray.mesh.multiaddr import Multiaddr
    mesh = api._runtime.mesh_runtime.mesh
    async def run():
        quic = await mesh.connections.dial_addr(Multiaddr.parse(bootstrap), 10, force_new=True)
        await quic.session.call(PING_PROTOCOL, os.urandom(32), timeout=10)
        sessions.session.conn.close("test: the session's path breaks")
    asyncio.run_coroutine_threadsafe(run(), api._runtime.loop).result(30)

def task_sessions_to(node_id):
    # this driver's task sessions to a node (caller.PeerSessions), read on the node's loop
    async def link():
        return api._runtime.mesh_runtime.remote.caller.link_to(node_id)
    return asyncio.run_coroutine_threadsafe(link(), api._runtime.loop).result(30)

@lattica.remote
def step(i, workdir, hold):
    import os, time
    fd = os.open(os.path.join(workdir, f"run-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    deadline = time.monotonic() + 60
    while hold and not os.path.exists(os.path.join(workdir, "go")):
        if time.monotonic() > deadline:
            raise TimeoutError("never told to go")
        time.sleep(0.02)
    return lattica.get_runtime_context().node_id, i * i
"""


def start_child(args: list[str]) -> subprocess.Popen:
    """A child process with this test's import path, stdout and stderr piped; see stop_child."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_die_with_parent,
    )


def stop_child(proc: subprocess.Popen) -> tuple[str, str]:
    """Terminate (then kill) a child of start_child; its remaining (stdout, stderr)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=10)


def run_session_driver(
    driver: str, tmp_path, resources: dict, num_cpus: int, *extra: str
) -> tuple[dict, dict]:
    """Start a node process (QUIC on loopback, ``resources``), run ``driver`` (a script built on
    SESSION_DRIVER_HELPERS) against it with argv ``bootstrap invite workdir *extra``, stop both;
    the node's start-up info and the JSON report the driver printed last."""
    node = start_child(
        [
            sys.executable,
            "-m",
            "latticaray.runtime.node_main",
            "--num-cpus",
            str(num_cpus),
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--resources",
            json.dumps(resources),
        ]
    )
    driver_proc = None
    try:
        info = json.loads(node.stdout.readline() or "{}")
        assert "node_id" in info, stop_child(node)[1][-3000:]
        bootstrap = next(a for a in info["addrs"] if "/quic-v1" in a)
        workdir = tmp_path / "runs"
        workdir.mkdir()
        driver_proc = start_child(
            [sys.executable, "-c", driver, bootstrap, info["invite"], str(workdir), *extra]
        )
        out, err = driver_proc.communicate(timeout=180)
        assert driver_proc.returncode == 0, err[-4000:]
        return info, json.loads(out.strip().splitlines()[-1])
    finally:
        if driver_proc is not None:
            stop_child(driver_proc)
        stop_child(node)


class FakeRemoteClient:
    """What CallerTasks and the executor's re-send handling use of a RemoteClient
    (runtime/remote/executor.py): the frames it was given."""

    def __init__(self, node_id: str = "caller"):
        self.node_id = node_id
        self.frames: list = []
        self.closed = False

    def send(self, message: dict) -> None:
        self.frames.append(message)

    send_settled = send

    def send_parts(self, tid: bytes, slot, pieces: list) -> None:
        from latticaray.runtime.remote.wire import ValuePart

        # parts are queued as one item each (here: the frame they make)
        self.frames.append(ValuePart(tid, slot, b"".join(pieces)))
