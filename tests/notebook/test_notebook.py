"""examples/notebook_behind_nat.ipynb, executed by nbclient in a real ipykernel.

On loopback: two worker node processes (the first one makes the mesh and its invite), the
notebook joins with only the bootstrap address and the credential. In netlab: the driver kernel
in hostA (cone NAT), workers in hostB (cone) and hostC (symmetric), pub1 public (bootstrap and
relay). Until the zero-flag join lands, the netlab run passes today's NAT settings (observers,
relays) through LATTICARAY_NOTEBOOK_INIT and the workers get --nat --observer --relay.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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
sys.path.insert(0, str(ROOT / "tests" / "mesh" / "nat"))
from netlab_util import lab, netlab_available  # noqa: E402
from test_runtime_over_nat import (  # noqa: E402
    HOST_IPS,
    PUB1,
    QUIC_PORT,
    RELAY_PORT,
    LabProcess,
    node_args,
)

LAB_PREFIX = os.environ.get("LATTICARAY_NAT_LAB_PREFIX", f"lnb{os.getpid() % 100000}")


@pytest.mark.netlab
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_notebook_in_netlab_behind_nat(tmp_path):
    reason = netlab_available()
    if reason is not None:
        pytest.skip(reason)
    processes: list[LabProcess] = []
    with lab(LAB_PREFIX):
        try:
            pub1 = LabProcess(LAB_PREFIX, "pub1", node_args(PUB1, "--serve-relay", str(RELAY_PORT)))
            processes.append(pub1)
            info = pub1.ready_line(90)
            bootstrap = f"/ip4/{PUB1}/udp/{QUIC_PORT}/quic-v1/p2p/{info['node_id']}"
            relay = f"/ip4/{PUB1}/tcp/{RELAY_PORT}/p2p/{info['node_id']}"
            # today's NAT flags; the zero-flag join will make them unnecessary
            nat_flags = ["--nat", "--observer", f"{PUB1}:{QUIC_PORT}", "--relay", relay]
            workers = {}
            for host in ("hostB", "hostC"):
                worker = LabProcess(
                    LAB_PREFIX,
                    host,
                    node_args(
                        HOST_IPS[host],
                        "--bootstrap",
                        bootstrap,
                        "--credential",
                        info["invite"],
                        *nat_flags,
                    ),
                )
                processes.append(worker)
                workers[worker.ready_line(120)["node_id"]] = os.uname().nodename
            init_extra = {
                "listen": [f"/ip4/{HOST_IPS['hostA']}/udp/{QUIC_PORT + 10}/quic-v1"],
                "nat": {"observers": [f"{PUB1}:{QUIC_PORT}"], "relays": [relay], "lab": True},
            }
            texts = run_notebook(
                tmp_path,
                {
                    "LATTICARAY_BOOTSTRAP": bootstrap,
                    "LATTICARAY_CREDENTIAL": info["invite"],
                    "LATTICARAY_NOTEBOOK_WORKERS": "3",  # pub1 is a worker too
                    "LATTICARAY_NOTEBOOK_OBJECT_MB": "200",
                    "LATTICARAY_NOTEBOOK_INIT": json.dumps(init_extra),
                },
                prefix=["ip", "netns", "exec", f"{LAB_PREFIX}-hostA"],
                timeout=1400,
            )
            workers[info["node_id"]] = os.uname().nodename
            check_outputs(texts, workers)
        finally:
            for process in processes:
                process.stop()
