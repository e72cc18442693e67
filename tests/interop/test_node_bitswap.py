"""Bitswap 1.2.0 between the product (a latticaray node, its object store, IpfsBlocks) and Helia.

A shared latticaray object is fetched by Helia by CID: its root (the DAG-CBOR manifest) and each
raw block, also a block asked for without its root; an object that was not shared is not served.
The other way, the node gets a block only Helia holds, and a second node that never met the first
fetches the whole object from Helia alone (latticaray -> IPFS -> latticaray); a block is found
by a DHT provider lookup routed through js; 1 MiB and 100 MiB go each way (MB/s printed). Every
test runs over QUIC and TCP + Noise + yamux, with the node dialing js and js dialing the node."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import tempfile
import time

import pytest

from latticaray.mesh.dht.service import DhtService
from latticaray.mesh.libp2p.bitswap import BITSWAP_PROTOCOL
from latticaray.mesh.node import MeshNode
from latticaray.objectstore.cid import BLAKE3, SHA2_256, Cid, blake3_available
from latticaray.objectstore.errors import ObjectNotFound
from latticaray.objectstore.ipfs import IpfsBlocks, ipfs_view
from latticaray.objectstore.store import LocalStore

from .test_node import drop_node, node_joined_to_js

MB = 1 << 20


async def wait_for_js_sees(js_peer, node, protocol: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while protocol not in (await js_peer.call("peerStore", peer=str(node.peer_id)))["protocols"]:
        assert time.monotonic() < deadline, f"js never learnt that the node speaks {protocol}"
        await asyncio.sleep(0.05)


@pytest.fixture
def make_store():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    shm = tempfile.mkdtemp(prefix="latticaray-test-", dir=base)
    spill = tempfile.mkdtemp(prefix="latticaray-test-spill-")
    made = []

    def make(name: str, **kwargs) -> LocalStore:
        kwargs.setdefault("hash_code", SHA2_256)
        kwargs.setdefault("capacity_bytes", 64 * MB)
        store = LocalStore(
            os.path.join(shm, name),
            spill_dir=os.path.join(spill, name),
            **kwargs,
        )
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            store.destroy()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)


@pytest.fixture
async def make_node(js_peer):
    made = []

    async def make(transport: str, direction: str) -> MeshNode:
        node, _ = await node_joined_to_js(js_peer, transport, direction)
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            await drop_node(js_peer, node)


@pytest.mark.parametrize("direction", ["we-dial", "js-dials"])
@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_object_goes_to_helia_and_back_to_another_node(
    js_peer, make_node, make_store, transport, direction
):
    store_a = make_store("a")
    a = await make_node(transport, direction)
    ipfs_a = IpfsBlocks(a, store_a, timeout=20)  # after identify: js learns it by a push
    await wait_for_js_sees(js_peer, a, BITSWAP_PROTOCOL)
    value = os.urandom(3 * MB + 12345)  # four 1 MiB blocks, the last one short
    root = store_a.put(value)
    manifest = ipfs_a.share(root)
    assert len(manifest.blocks) == 4 and root.hash_code == SHA2_256
    secret = store_a.put(b"not shared " + os.urandom(16))
    secret_block = store_a.manifest(secret).blocks[0]

    # Helia wants one block by its own CID (no root named): served through the index
    block = await js_peer.call("blockGet", cid=str(manifest.blocks[2]))
    assert base64.b64decode(block["data"]) == bytes(store_a.get_object(root).block(2))
    # then the root (the manifest, DAG-CBOR) and every block
    got = await js_peer.call("blockGet", cid=str(root))
    assert base64.b64decode(got["data"]) == manifest.encoded
    many = await js_peer.call("blockGetMany", cids=[str(c) for c in manifest.blocks])
    assert many["bytes"] == manifest.size
    # what was not shared is not served (the same engine answers Helia's wants)
    assert ipfs_a.bitswap.get_block(bytes(secret_block)) is None
    assert ipfs_a.bitswap.get_block(bytes(secret)) is None
    assert not await js_peer.call("blockHas", cid=str(secret_block))

    # a node that never met a fetches the object from Helia alone
    store_b = make_store("b")
    b = await make_node(transport, direction)
    assert a.peer_id not in b.connected_peers()
    ipfs_b = IpfsBlocks(b, store_b, timeout=20)
    assert await ipfs_b.fetch_object(root) == root
    assert store_b.get(root) == value


BOTH_WAYS = pytest.mark.parametrize("direction", ["we-dial", "js-dials"])
OVER_BOTH = pytest.mark.parametrize("transport", ["quic", "tcp"])


@OVER_BOTH
@BOTH_WAYS
async def test_we_get_a_block_only_helia_holds(
    js_peer, make_node, make_store, transport, direction
):
    a = await make_node(transport, direction)
    ipfs = IpfsBlocks(a, make_store("a"), timeout=10)
    data = b"held by helia only " + os.urandom(16)
    cid = Cid.parse(await js_peer.call("blockPut", data=base64.b64encode(data).decode()))
    assert await ipfs.get_block(cid) == data
    # a block nobody holds: Helia answers DONT_HAVE (asked with send_dont_have), so the miss
    # is known long before the deadline
    started = time.monotonic()
    with pytest.raises(ObjectNotFound):
        await ipfs.get_block(Cid.of(os.urandom(32)), timeout=20.0)
    assert time.monotonic() - started < 10.0


@OVER_BOTH
@BOTH_WAYS
async def test_a_block_found_through_the_dht(js_peer, make_node, make_store, transport, direction):
    """c knows only js, which lacks the block (DONT_HAVE); the DHT, routed through js, names b
    as its provider, and c fetches it from b."""
    b = await make_node(transport, direction)
    dht_b = DhtService(b)
    await dht_b.bootstrap([])
    store_b = make_store("b")
    ipfs_b = IpfsBlocks(b, store_b, dht=dht_b, timeout=10)
    root = store_b.put(b"provided by b " + os.urandom(16))
    ipfs_b.share(root)
    assert await dht_b.provide(bytes(root)) >= 1
    c = await make_node(transport, direction)
    dht_c = DhtService(c)
    ipfs_c = IpfsBlocks(c, make_store("c"), dht=dht_c, timeout=10)
    assert b.peer_id not in c.connected_peers()
    try:
        assert await ipfs_c.fetch_object(root) == root
        assert b.peer_id in c.connected_peers()
        assert not await js_peer.call("blockHas", cid=str(root))
    finally:
        await dht_c.close()
        await dht_b.close()


@OVER_BOTH
@BOTH_WAYS
async def test_one_and_a_hundred_megabytes_each_way(
    js_peer, make_node, make_store, transport, direction
):
    """The node's Bitswap (IpfsBlocks over its libp2p connection to js), 1 MiB then 100 MiB each
    way: Helia fetches the blocks of a shared object, the node fetches blocks only Helia holds.
    Prints MB/s (the figures of docs/protocol/libp2p.md's matrix)."""
    store = make_store("a", capacity_bytes=256 * MB)
    a = await make_node(transport, direction)
    ipfs = IpfsBlocks(a, store, timeout=120)
    await wait_for_js_sees(js_peer, a, BITSWAP_PROTOCOL)
    figures = []
    for count in (1, 100):
        value = os.urandom(count * MB - 64)  # pickled, it fills ``count`` blocks
        root = store.put(value)
        manifest = ipfs.share(root)
        assert len(manifest.blocks) == count
        got = await js_peer.call(
            "blockGetMany", cids=[str(c) for c in manifest.blocks], timeout=150
        )
        assert got["bytes"] == manifest.size > (count - 1) * MB
        payload = bytes(store.get_object(root).payload)
        assert got["sha256"] == hashlib.sha256(payload).hexdigest()
        helia_from_us = got["bytes"] / got["ms"] / 1000

        theirs = [
            Cid.parse(c) for c in await js_peer.call("blockMake", count=count, size=MB, timeout=120)
        ]
        started = time.monotonic()
        blocks = await ipfs.get_many(theirs, timeout=120)
        us_from_helia = count * MB / (time.monotonic() - started) / 1e6
        assert [len(b) for b in blocks] == [MB] * count  # get_many verified each against its CID
        figures.append(
            f"{count} MiB: Helia from the node {helia_from_us:.1f} MB/s, "
            f"the node from Helia {us_from_helia:.1f} MB/s"
        )
        ipfs.unshare(root)
        store.delete(root)
        await js_peer.call("blockDelete", cids=[str(c) for c in [*manifest.blocks, *theirs]])
    print(f"\nnode bitswap over {transport}, {direction}: " + "; ".join(figures))


@pytest.mark.skipif(not blake3_available(), reason="blake3 is not installed")
def test_a_blake3_object_is_shared_under_its_sha2_view(make_store):
    """IPFS nodes verify sha2-256: an object the store named with BLAKE3 (as the runtime's
    stores do) is served under the same blocks named with sha2-256, read from the stored one."""
    store = make_store("b3", hash_code=BLAKE3)

    class _Node:  # only the stream router is used before a fetch
        from latticaray.mesh.libp2p.stream import ProtocolRouter

        streams = ProtocolRouter()

    ipfs = IpfsBlocks(_Node(), store)
    value = os.urandom(2 * MB + 5)
    root = store.put(value)
    view = ipfs.share(root)
    source = store.manifest(root)
    assert root.hash_code == BLAKE3 and view.root.hash_code == SHA2_256
    assert (view.size, view.sizes, view.meta) == (source.size, source.sizes, source.meta)
    assert ipfs.shared(view.root) and not ipfs.shared(root)
    assert ipfs.bitswap.get_block(bytes(view.root)) == view.encoded
    payload = bytes(store.get_object(root).payload)
    for i, block in enumerate(view.blocks):
        data = ipfs.bitswap.get_block(bytes(block))
        assert data is not None and block.verify(data)
        assert data == payload[i * MB : (i + 1) * MB]
    assert ipfs.bitswap.get_block(bytes(root)) is None  # its BLAKE3 names are not served
    assert ipfs.bitswap.get_block(bytes(source.blocks[0])) is None
    ipfs.unshare(view.root)
    assert ipfs.bitswap.get_block(bytes(view.blocks[0])) is None
    with pytest.raises(ValueError, match="does not describe"):
        ipfs.share(root, view=ipfs_view(store, store.put(b"another object " * 10)))
