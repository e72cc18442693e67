"""`latticaray up --nodes 3`, RPC among all pairs (`status --check`), then `down` leaves no process."""

import json
import os
import subprocess
import sys
import time

from latticaray.cli import build_parser, main


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "latticaray", *args], capture_output=True, text=True, timeout=timeout
    )


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_up_check_down_leaves_no_process(tmp_path):
    run_dir = tmp_path / "mesh"
    pids = []
    try:
        up = run_cli("up", "--nodes", "3", "--run-dir", str(run_dir))
        assert up.returncode == 0, up.stderr + up.stdout
        state = json.loads((run_dir / "mesh.json").read_text())
        pids = [n["pid"] for n in state["nodes"]]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        assert all(n["peer_id"].startswith("12D3KooW") for n in state["nodes"])
        assert oct((run_dir / "node0" / "identity.key").stat().st_mode & 0o777) == "0o600"

        status = run_cli("status", "--run-dir", str(run_dir), "--check")
        assert status.returncode == 0, status.stdout + status.stderr
        # every node reached both others with an RPC (ping + echo)
        assert status.stdout.count(": ok over ") == 6, status.stdout
        assert "FAILED" not in status.stdout

        # a second `up` on the same run dir is refused while the mesh runs
        again = run_cli("up", "--nodes", "1", "--run-dir", str(run_dir))
        assert again.returncode != 0 and "already running" in again.stderr + again.stdout
    finally:
        down = run_cli("down", "--run-dir", str(run_dir))
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids), "down left node processes running"
    assert "stopped 3" in down.stdout
    # down stops only what up recorded: nothing is left to stop now
    assert "stopped 0" in run_cli("down", "--run-dir", str(run_dir)).stdout


def test_node_command_shuts_down_cleanly_on_sigterm(tmp_path):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "latticaray",
            "node",
            "--identity",
            str(tmp_path / "id.key"),
            "--ready-file",
            str(ready),
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "node did not start"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid and info["listen"][0].startswith("/ip4/127.0.0.1/udp/")
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "level=info" in err and "node stopping" in err  # structured key=value logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_status_without_a_mesh(tmp_path, capsys):
    assert main(["status", "--run-dir", str(tmp_path)]) == 1
    assert "no mesh" in capsys.readouterr().out


def test_parser_has_subcommands():
    parser = build_parser()
    args = parser.parse_args(
        ["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", "/ip4/1.2.3.4/tcp/1"]
    )
    assert args.listen == ["/ip4/127.0.0.1/tcp/0"] and args.command == "node"
    assert parser.parse_args(["up", "--nodes", "5"]).nodes == 5


async def test_killed_node_process_fails_in_flight_quic_calls_promptly(tmp_path):
    import asyncio
    import signal

    from latticaray.mesh.errors import RpcError
    from latticaray.mesh.identity import PeerId
    from latticaray.mesh.node import MeshConfig, MeshNode
    from latticaray.mesh.transport.quic import QuicConfig

    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "latticaray",
            "node",
            "--ready-file",
            str(ready),
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--transports",
            "quic",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    driver = MeshNode(
        MeshConfig(
            listen=["/ip4/127.0.0.1/udp/0/quic-v1"],
            transports=("quic",),
            quic=QuicConfig(unresponsive_timeout=2.0, keepalive_interval=1.0),
        )
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        info = json.loads(ready.read_text())
        await driver.start()
        peer = await driver.connect(info["listen"][0])
        assert peer == PeerId.from_string(info["peer_id"])
        assert await driver.call(peer, "/latticaray/echo/1", b"x", timeout=10) == b"x"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        start = time.monotonic()
        # a large request keeps data in flight to the dead peer; the call must fail, not hang
        try:
            await driver.call(peer, "/latticaray/echo/1", b"y" * 200_000, timeout=60)
            raise AssertionError("call to a killed node succeeded")
        except RpcError:
            pass
        assert time.monotonic() - start < 10
        assert peer not in driver.connected_peers()
    finally:
        await driver.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
