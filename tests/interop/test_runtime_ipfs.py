"""The product with Helia: a runtime node started with ``latticaray.init(ipfs=True)`` (or
``latticaray start --ipfs``) puts objects, shares one with ``latticaray.util.ipfs.share``, and the
js Helia peer fetches it by the returned CID over Bitswap 1.2.0 (the DAG-CBOR manifest, then
every raw block, each verified by Helia against its sha2-256 CID) and finds the node as its
provider in the DHT. What was not shared, large or small, is not served to Helia; nor is a shared
object once unshared. Without ``ipfs=True`` the calls are refused."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time

import pytest

import latticaray as lattica
from latticaray.objectstore.cid import SHA2_256, Cid
from latticaray.objectstore.ipfs import ipfs_view
from latticaray.objectstore.manifest import Manifest, block_spans, build_manifest
from latticaray.objectstore.serialization import serialize
from latticaray.runtime import serialization
from latticaray.util import ipfs

from .jspeer import JsPeerError

MB = 1 << 20
NOT_SERVED_MS = 2000  # how long Helia tries for a block the node must not serve


def tcp_addr(addrs: list[str]) -> str:
    return next(a for a in addrs if "/tcp/" in a)


def helia_lacks(js_peer, cid: Cid | str) -> bool:
    """Helia asked its peers for ``cid`` and got nothing within NOT_SERVED_MS."""
    try:
        js_peer.call_sync("blockGet", cid=str(cid), timeoutMs=NOT_SERVED_MS)
    except JsPeerError:
        return True
    return False


def helia_fetches_object(js_peer, cid: str, value: bytes) -> Manifest:
    """Helia fetches the shared object ``cid``: the manifest, then every block; the bytes it
    holds are ``value``'s payload. Returns the manifest."""
    root = Cid.parse(cid)
    assert root.hash_code == SHA2_256
    got = js_peer.call_sync("blockGet", cid=cid)
    manifest = Manifest.decode(root, base64.b64decode(got["data"]))  # verified against root
    ser = serialize(value)
    assert manifest.size == ser.nbytes and len(manifest.blocks) == -(-ser.nbytes // MB)
    many = js_peer.call_sync("blockGetMany", cids=[str(c) for c in manifest.blocks])
    assert many["bytes"] == manifest.size
    assert many["sha256"] == hashlib.sha256(ser.to_bytes()).hexdigest()
    return manifest


@pytest.fixture
def ipfs_runtime(js_peer):
    """An embedded runtime node with ipfs=True (loopback QUIC and TCP), dialed by js."""
    lattica.init(ipfs=True, num_cpus=1, _max_workers=1)
    node_id = lattica.mesh_info()["node_id"]
    try:
        js_peer.call_sync("dial", addr=tcp_addr(lattica.mesh_info()["address"]))
        yield node_id
    finally:
        try:
            lattica.shutdown()  # first: the node closes its connections before its loop ends
        finally:
            js_peer.call_sync("hangup", peer=node_id, timeout=10)  # js forgets it


def test_init_ipfs_shares_only_what_it_is_told(js_peer, ipfs_runtime):
    node_id = ipfs_runtime
    value = os.urandom(3 * MB + 12345)  # four blocks, the last one short
    ref = lattica.put(value)
    secret_value = os.urandom(2 * MB)
    secret = lattica.put(secret_value)
    small_secret = lattica.put(b"small secret " + os.urandom(8))

    cid = ipfs.share(ref)
    assert cid != ref.cid  # the runtime names it with BLAKE3, IPFS with sha2-256
    assert ipfs.shared() == [cid]
    manifest = helia_fetches_object(js_peer, cid, value)
    # the manifest carries the serializer's metadata: the blocks read back as the value
    payload = serialization.get_store().get_object(ref.cid).payload
    assert manifest.meta == serialization.get_store().manifest(ref.cid).meta
    assert bytes(payload) == serialize(value).to_bytes()
    # an IPFS node that is not connected finds the node through the DHT
    providers = js_peer.call_sync("kadFindProviders", cid=cid, limit=1)
    assert [p["id"] for p in providers] == [node_id]

    # a small value is one raw block, already named by a raw sha2-256 CID: its pickle bytes
    small = lattica.put({"answer": 42})
    small_cid = ipfs.share(small)
    assert small_cid == small.cid and Cid.parse(small_cid).hash_code == SHA2_256
    got = js_peer.call_sync("blockGet", cid=small_cid)
    assert pickle.loads(base64.b64decode(got["data"])) == {"answer": 42}

    # not shared, not served: a large object's IPFS view (root and a block) and a small value
    secret_view = ipfs_view(serialization.get_store(), secret.cid)
    assert helia_lacks(js_peer, secret_view.root)
    assert helia_lacks(js_peer, secret_view.blocks[1])
    assert helia_lacks(js_peer, small_secret.cid)
    # nor once unshared (a block Helia has not fetched yet)
    other = lattica.put(os.urandom(2 * MB + 1))
    other_cid = ipfs.share(other)
    other_view = ipfs_view(serialization.get_store(), other.cid)
    assert str(other_view.root) == other_cid
    ipfs.unshare(other_cid)
    assert other_cid not in ipfs.shared()
    assert helia_lacks(js_peer, other_view.blocks[0])
    with pytest.raises(LookupError, match="not shared"):
        ipfs.unshare(other_cid)
    # a shared object outlives its refs (the node pins it until unshare); an unshared one not
    kept_value, gone_value = os.urandom(MB + 11), os.urandom(MB + 13)
    kept, gone = lattica.put(kept_value), lattica.put(gone_value)
    kept_cid, kept_store_cid, gone_store_cid = ipfs.share(kept), kept.cid, gone.cid
    store = serialization.get_store()
    del kept, gone
    deadline = time.monotonic() + 10
    while store.contains(gone_store_cid):
        assert time.monotonic() < deadline, "the released object stayed in the store"
        time.sleep(0.05)
    assert store.contains(kept_store_cid)
    helia_fetches_object(js_peer, kept_cid, kept_value)  # blocks Helia had not fetched before
    assert ipfs.shared() == sorted([cid, small_cid, kept_cid])
    ipfs.unshare(kept_cid)  # its last pin: now it goes
    while store.contains(kept_store_cid):
        assert time.monotonic() < deadline, "an unshared object nothing holds stayed in the store"
        time.sleep(0.05)


def test_get_reads_what_only_helia_holds(js_peer, ipfs_runtime):
    """The other way: bytes only Helia holds, a raw block and a latticaray object's payload
    (its manifest and blocks put into Helia), verified, returned as bytes (never unpickled)."""
    data = b"held by helia only " + os.urandom(16)
    raw = js_peer.call_sync("blockPut", data=base64.b64encode(data).decode())
    assert ipfs.get(raw) == data

    value = {"weights": os.urandom(MB + 3)}  # a pickled value: get must not unpickle it
    ser = serialize(value)
    manifest = build_manifest(ser.to_bytes(), ser.meta, hash_code=SHA2_256)
    for block, (a, b) in zip(manifest.blocks, block_spans(manifest.size, manifest.chunk_size)):
        put = js_peer.call_sync("blockPut", data=base64.b64encode(ser.to_bytes()[a:b]).decode())
        assert put == str(block)
    js_peer.call_sync(
        "blockPutAs", cid=str(manifest.root), data=base64.b64encode(manifest.encoded).decode()
    )
    got = ipfs.get(str(manifest.root))
    assert isinstance(got, bytes) and got == ser.to_bytes()
    with pytest.raises(ValueError, match="max_bytes"):
        ipfs.get(str(manifest.root), max_bytes=MB)
    with pytest.raises(ValueError, match="timeout"):
        ipfs.get(raw, timeout=0)

    # what Helia lacks (it answers DONT_HAVE) and what it holds wrongly (fails verification)
    with pytest.raises(LookupError):
        ipfs.get(str(Cid.of(os.urandom(32))), timeout=10)
    forged = Cid.of(b"the real bytes " + os.urandom(8))
    js_peer.call_sync("blockPutAs", cid=str(forged), data=base64.b64encode(b"forged").decode())
    with pytest.raises(LookupError):
        ipfs.get(str(forged), timeout=3)


def test_the_node_dials_an_ipfs_peer(js_peer):
    """``ipfs.connect``: the node dials Helia (it did not know us), which then fetches what the
    node shares and finds it as a provider; a bad address is refused clearly."""
    lattica.init(ipfs=True, num_cpus=1, _max_workers=1)
    node_id = lattica.mesh_info()["node_id"]
    try:
        js_addr = next(a for a in js_peer.addrs if "/tcp/" in a)
        js_addr = js_addr if "/p2p/" in js_addr else f"{js_addr}/p2p/{js_peer.peer_id}"
        assert ipfs.connect(js_addr) == js_peer.peer_id
        mine = [c for c in js_peer.call_sync("connections") if c["remotePeer"] == node_id]
        assert [c["direction"] for c in mine] == ["inbound"]
        value = os.urandom(MB + 99)
        cid = ipfs.share(lattica.put(value))
        helia_fetches_object(js_peer, cid, value)
        providers = js_peer.call_sync("kadFindProviders", cid=cid, limit=1)
        assert [p["id"] for p in providers] == [node_id]
        with pytest.raises(ValueError, match="/p2p/"):
            ipfs.connect(js_addr.split("/p2p/")[0])
        with pytest.raises(ValueError):
            ipfs.connect("/not/a/multiaddr")
    finally:
        try:
            lattica.shutdown()
        finally:
            js_peer.call_sync("hangup", peer=node_id, timeout=10)


def test_sharing_is_refused_without_ipfs():
    lattica.init(num_cpus=1, _max_workers=1, _mesh=True)
    try:
        ref = lattica.put(b"x" * (2 * MB))
        for call in (
            lambda: ipfs.share(ref),
            lambda: ipfs.get(str(Cid.of(b"x"))),
            lambda: ipfs.connect("/ip4/127.0.0.1/tcp/1/p2p/" + lattica.mesh_info()["node_id"]),
            ipfs.shared,
        ):
            with pytest.raises(RuntimeError, match=r"init\(ipfs=True\)"):
                call()
        with pytest.raises(TypeError, match="ObjectRef"):
            ipfs.share(b"a value")  # type: ignore[arg-type]
    finally:
        lattica.shutdown()
    with pytest.raises(ValueError, match="latticaray start --ipfs"):
        lattica.init(address="unix:/nonexistent", ipfs=True)


def start_node(*args: str, timeout: float = 60.0) -> tuple[subprocess.Popen, dict]:
    """A ``latticaray start`` process and its ready line (read within ``timeout``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "latticaray", "start", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
    )
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        line = reader.submit(proc.stdout.readline)  # type: ignore[union-attr]
        try:
            return proc, json.loads(line.result(timeout) or "{}")
        except BaseException:
            stop_node(proc)  # its stdout closes: the reader's readline returns
            raise


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def test_latticaray_start_ipfs_process(js_peer, tmp_path):
    """``latticaray start --ipfs``: a driver attached to it puts and shares, Helia fetches (over
    QUIC here; the embedded node's tests go over TCP)."""
    proc, ready = start_node(
        "--ipfs",
        "--num-cpus",
        "1",
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--driver-socket",
        str(tmp_path / "node.sock"),
    )
    try:
        assert ready.get("node_id"), ready
        quic = next(a for a in ready["addrs"] if "/quic-v1/" in a)
        assert js_peer.call_sync("dial", addr=quic)["remoteAddr"].startswith(quic.split("/p2p/")[0])
        lattica.init(address=ready["driver_address"])
        try:
            value = os.urandom(MB + 7)
            cid = ipfs.share(lattica.put(value))
            helia_fetches_object(js_peer, cid, value)
            assert helia_lacks(js_peer, lattica.put(b"kept " + os.urandom(8)).cid)
        finally:
            lattica.shutdown()
            js_peer.call_sync("hangup", peer=ready["node_id"], timeout=10)
    finally:
        stop_node(proc)


@lattica.remote(resources={"far": 1})
def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def test_sharing_an_object_another_member_holds(js_peer, tmp_path):
    """The result of a task that ran on another member lives in that member's store: sharing
    it from this node (ipfs=True) copies it here first, and Helia fetches it from this node."""
    lattica.init(
        ipfs=True,
        num_cpus=1,
        _max_workers=1,
        listen=["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"],
    )
    node_id = lattica.mesh_info()["node_id"]
    proc = None
    try:
        addrs = lattica.mesh_info()["address"]
        quic = next(a for a in addrs if "/quic-v1/" in a)
        proc, ready = start_node(
            "--bootstrap",
            quic,
            "--credential",
            lattica.invite(),
            "--num-cpus",
            "1",
            "--resources",
            json.dumps({"far": 1}),
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--driver-socket",
            str(tmp_path / "far.sock"),
        )
        assert ready.get("node_id"), ready
        js_peer.call_sync("dial", addr=tcp_addr(addrs))
        ref = random_bytes.remote(2 * MB + 1)
        lattica.wait([ref], timeout=60)
        store = serialization.get_store()
        assert not store.contains(ref.cid)  # it is on the other member
        cid = ipfs.share(ref)
        assert store.contains(ref.cid)
        value = lattica.get(ref)
        helia_fetches_object(js_peer, cid, value)
    finally:
        try:
            lattica.shutdown()
        finally:
            js_peer.call_sync("hangup", peer=node_id, timeout=10)
            if proc is not None:
                stop_node(proc)
