"""`latticaray put FILE` and `latticaray get CID -o FILE` against `latticaray start` nodes.

A file put through one node is got through another (by CID, over the mesh), byte for byte, with
progress bars (forced on, no delay); the object outlives the `put` process; bad input is a clear
error.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from meshutil import NodeProcess

CLI = [sys.executable, "-m", "latticaray"]


@pytest.fixture(scope="module")
def two_nodes():
    first = NodeProcess(None, None)
    nodes = [first]
    try:
        bootstrap = next(a for a in first.info["addrs"] if "/udp/" in a)
        nodes.append(NodeProcess(bootstrap, first.info["invite"]))
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def cli(*args, timeout=300, progress=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("LATTICARAY_ADDRESS", None)
    if progress:
        env.update(LATTICARAY_PROGRESS="1", LATTICARAY_PROGRESS_DELAY="0")
    else:
        env.pop("LATTICARAY_PROGRESS", None)
    return subprocess.run([*CLI, *args], capture_output=True, timeout=timeout, env=env)


def test_put_on_one_node_get_on_another_with_progress(two_nodes, tmp_path):
    source = tmp_path / "weights.bin"
    data = os.urandom(24 << 20)
    source.write_bytes(data)
    a, b = two_nodes
    put = cli("put", str(source), "--address", a.info["driver_address"])
    assert put.returncode == 0, put.stderr.decode()[-3000:]
    cid = put.stdout.decode().strip()
    assert cid.startswith("bafy"), put.stdout
    err = put.stderr.decode()
    assert "put weights.bin" in err and "100%" in err and "24.0M" in err
    # the put process is gone: the node holds the object; the other node fetches it by CID
    target = tmp_path / "copy.bin"
    got = cli("get", cid, "-o", str(target), "--address", b.info["driver_address"])
    assert got.returncode == 0, got.stderr.decode()[-3000:]
    assert target.read_bytes() == data
    err = got.stderr.decode()
    assert "write copy.bin" in err and "100%" in err and f"{cid} -> {target}" in err
    assert not (tmp_path / "copy.bin.part").exists()
    # not interactive: no bars at all; to stdout
    quiet = cli("get", cid, "-o", "-", "--address", a.info["driver_address"], progress=False)
    assert quiet.returncode == 0 and quiet.stdout == data
    assert b"%" not in quiet.stderr


def test_bad_input_is_a_clear_error(two_nodes, tmp_path):
    address = two_nodes[0].info["driver_address"]
    missing = cli("put", str(tmp_path / "nope.bin"), "--address", address)
    assert missing.returncode == 1 and b"cannot read" in missing.stderr
    bad = cli("get", "not-a-cid", "-o", str(tmp_path / "x"), "--address", address)
    assert bad.returncode == 1 and b"is not a CID" in bad.stderr
    absent = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    gone = cli("get", absent, "-o", str(tmp_path / "x"), "--address", address, "--timeout", "3")
    assert gone.returncode == 1 and b"could not get" in gone.stderr, gone.stderr
    assert not (tmp_path / "x").exists()
