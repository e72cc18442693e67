"""examples/notebook_behind_nat.ipynb, executed by nbclient in a real ipykernel.

On loopback: two worker node processes (the first one makes the mesh and its invite), the
notebook joins with only the bootstrap address and the credential. In netlab, the zero-flag
path: the driver kernel in hostA (cone NAT) calls only ``init(bootstrap=[pub1], credential=...)``,
the workers in hostB (cone) and hostC (symmetric) get only ``--bootstrap`` and ``--credential``,
pub1 is public (the bootstrap, serving relay and AutoNAT). Every process has ``LATTICARAY_LAB=1``
(the lab's 198.18.0.0/15 counts as public), nothing else. The large fetch shows its progress bar
in the cell output (``LATTICARAY_PROGRESS_DELAY=0``: shown at once), and ``latticaray status``
attached to the hostB worker shows pub1 direct and hostC over a relayed or hole-punched path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nbcheck import cell_texts, marker, tasks_result, worker_lines

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "notebook_behind_nat.ipynb"
RUNNER = Path(__file__).resolve().parent / "run_notebook.py"

sys.path.insert(0, str(ROOT / "tests" / "runtime"))
from meshutil import NodeProcess  # noqa: E402


def run_notebook(tmp_path, env_extra: dict, prefix: list[str] | None = None, timeout=900):
    out = tmp_path / "executed.ipynb"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **env_extra)
    env.pop("LATTICARAY_PROGRESS", None)
    proc = subprocess.run(
        [
            *(prefix or []),
            sys.executable,
            str(RUNNER),
            str(NOTEBOOK),
            str(out),
            "--timeout",
            "600",
            "--cwd",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    texts = cell_texts(out) if out.exists() else []
    assert proc.returncode == 0, proc.stderr[-4000:] + "\n---\n" + "\n---\n".join(texts)
    return texts


def check_outputs(texts: list[str], workers: dict[str, str]) -> None:
    """``workers``: node ID -> the host name its tasks print."""
    results = tasks_result(texts)
    assert sorted(r[0] for r in results) == sorted(workers)
    assert marker(texts, "ACTOR_OK") == "[1, 2, 3, 4, 5]"
    assert marker(texts, "FETCH_OK").startswith("bafy")
    assert marker(texts, "PUT_OK").startswith("bafy")
    assert int(marker(texts, "STATE_OK")) >= len(workers) + 1
    everything = "\n".join(texts)
    printed = worker_lines(everything)
    # one hello line per worker; lines that differ only in numbers are deduplicated (as Ray
    # does), and then counted in the "[repeated Nx across cluster]" line that follows
    hello = [line for name, _pid, _node, line in printed if name == "hello"]
    shown = [line for line in hello if "[repeated" not in line]
    repeated = sum(int(m[1]) for m in (re.search(r"\[repeated (\d+)x", x) for x in hello) if m)
    assert len(shown) + repeated == len(workers), printed
    assert all(re.fullmatch(r"hello \d+ from \S+", line) for line in shown), shown
    counter = [line for name, _, _, line in printed if name == "Counter"]
    assert "counter at 5" in counter, printed
    assert any(line.startswith("read ") and "MiB by CID" in line for *_, line in printed)


@pytest.mark.timeout(900)
def test_notebook_on_loopback(tmp_path):
    first = NodeProcess(None, None)
    nodes = [first]
    try:
        bootstrap = next(a for a in first.info["addrs"] if "/udp/" in a)
        invite = first.info["invite"]
        nodes.append(NodeProcess(bootstrap, invite))
        host = os.uname().nodename
        texts = run_notebook(
            tmp_path,
            {
                "LATTICARAY_BOOTSTRAP": bootstrap,
                "LATTICARAY_CREDENTIAL": invite,
                "LATTICARAY_NOTEBOOK_WORKERS": "2",
                "LATTICARAY_NOTEBOOK_OBJECT_MB": "64",
            },
        )
        check_outputs(texts, {n.node_id: host for n in nodes})
    finally:
        for node in nodes:
            node.stop()


# --- netlab: driver behind a cone NAT, workers behind a cone and a symmetric NAT ---------------

sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from netlab_nodes import PUB1, LabNode  # noqa: E402
from netlab_util import lab, netlab_available  # noqa: E402

LAB_PREFIX = os.environ.get("LATTICARAY_NAT_LAB_PREFIX", f"lnb{os.getpid() % 100000}")
LAB_ENV = {"LATTICARAY_LAB": "1"}
QUIC_PORT = 4811
RELAY_PORT = 4812


def start_args(*extra: str) -> list[str]:
    """`latticaray start` as a worker runs it: no listen address, no NAT option."""
    return [sys.executable, "-m", "latticaray", "start", "--num-cpus", "1", *extra]


def status_paths(prefix: str, host: str, address: str) -> tuple[str, dict[str, str]]:
    """`latticaray status` run inside ``host``: its text and the PATH column by node row."""
    proc = subprocess.run(
        ["ip", "netns", "exec", f"{prefix}-{host}", sys.executable, "-m", "latticaray", "status",
         "--address", address, "--timeout", "20"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
    )  # fmt: skip
    paths = {}
    lines = proc.stdout.splitlines()
    head = next((i for i, x in enumerate(lines) if x.startswith("NODE ")), None)
    if head is not None:
        start = lines[head].index("PATH")
        for row in lines[head + 1 :]:
            if not row.strip():
                break
            paths[row.split()[0].rstrip("…")] = row[start:].split()[0]
    return proc.stdout + proc.stderr, paths


def path_of(paths: dict[str, str], node_id: str) -> str | None:
    return next((p for short, p in paths.items() if node_id.startswith(short)), None)


@pytest.mark.netlab
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_notebook_in_netlab_behind_nat(tmp_path):
    reason = netlab_available()
    if reason is not None:
        pytest.skip(reason)
    processes: list[LabNode] = []
    logdir = tmp_path / "logs"
    logdir.mkdir()
    # a WAN with 20 ms round trips between sites, as between a laptop and the peers it joins
    # (on a bare veth the 200 MB fetch could end within the progress bar's first poll)
    with lab(LAB_PREFIX, "--wan-delay-ms", "10"):
        try:
            pub1 = LabNode(
                LAB_PREFIX,
                "pub1",
                start_args(
                    "--listen",
                    f"/ip4/{PUB1}/udp/{QUIC_PORT}/quic-v1",
                    "--serve-relay",
                    str(RELAY_PORT),
                ),
                str(logdir / "pub1.log"),
                env=LAB_ENV,
            )
            processes.append(pub1)
            info = pub1.ready_line(90)
            bootstrap = f"/ip4/{PUB1}/udp/{QUIC_PORT}/quic-v1/p2p/{info['node_id']}"
            workers, ready = {}, {}
            for host in ("hostB", "hostC"):
                worker = LabNode(
                    LAB_PREFIX,
                    host,
                    start_args("--bootstrap", bootstrap, "--credential", info["invite"]),
                    str(logdir / f"{host}.log"),
                    env=LAB_ENV,
                )
                processes.append(worker)
                ready[host] = worker.ready_line(120)
                workers[ready[host]["node_id"]] = os.uname().nodename
            texts = run_notebook(
                tmp_path,
                {
                    "LATTICARAY_BOOTSTRAP": bootstrap,
                    "LATTICARAY_CREDENTIAL": info["invite"],
                    "LATTICARAY_NOTEBOOK_WORKERS": "3",  # pub1 is a worker too
                    "LATTICARAY_NOTEBOOK_OBJECT_MB": "200",
                    "LATTICARAY_PROGRESS_DELAY": "0",
                    **LAB_ENV,
                },
                prefix=["ip", "netns", "exec", f"{LAB_PREFIX}-hostA"],
                timeout=1400,
            )
            workers[info["node_id"]] = os.uname().nodename
            check_outputs(texts, workers)
            # the 200 MB fetch by CID drew its bar in the cell (tqdm's text bar on stderr)
            fetch_cell = next(t for t in texts if "FETCH_OK" in t)
            assert re.search(r"get bafy\S*: +\d+%", fetch_cell), fetch_cell[-2000:]
            assert "100%" in fetch_cell, fetch_cell[-2000:]
            # `latticaray status` at hostB: pub1 is direct; hostC (symmetric NAT) is reached
            # through the relay or a hole punch once the status request has connected them
            address = ready["hostB"]["driver_address"]
            hostc = ready["hostC"]["node_id"]
            deadline = time.monotonic() + 120
            while True:
                text, paths = status_paths(LAB_PREFIX, "hostB", address)
                if path_of(paths, hostc) in ("relayed", "punched"):
                    break
                assert time.monotonic() < deadline, text
                time.sleep(1.0)
            assert path_of(paths, info["node_id"]) == "direct", text
            assert path_of(paths, ready["hostB"]["node_id"]) == "self", text
            print(f"\nlatticaray status at hostB:\n{text}")
        finally:
            for process in processes:
                process.stop()
