"""Bitswap 1.2.0 between our service over TCP+Noise+yamux and Helia's bitswap block broker."""

from __future__ import annotations

import base64
import os
import time

import pytest

from latticaray.mesh.libp2p.bitswap import BitswapService
from latticaray.objectstore.cid import Cid

from .jspeer import connected_host, release


async def _bitswap_host(js_peer, blocks):
    def setup(h):
        h.bitswap = BitswapService(h.router, blocks.get)

    return await connected_host(js_peer, setup)


async def test_helia_fetches_a_block_we_serve(js_peer):
    data = b"served by latticaray " + os.urandom(16)
    cid = Cid.of(data)
    h, _ = await _bitswap_host(js_peer, {bytes(cid): data})
    try:
        # the raw-leaf CID is the same in both worlds
        assert not await js_peer.call("blockHas", cid=str(cid))
        got = await js_peer.call("blockGet", cid=str(cid))
        assert base64.b64decode(got["data"]) == data
    finally:
        await release(h, js_peer)


async def test_we_fetch_a_block_helia_holds(js_peer):
    data = b"held by helia " + os.urandom(16)
    cid_text = await js_peer.call("blockPut", data=base64.b64encode(data).decode())
    cid = Cid.parse(cid_text)
    assert cid == Cid.of(data)
    h, conn = await _bitswap_host(js_peer, {})
    try:
        got = await h.bitswap.fetch(conn, bytes(cid), timeout=10)
        assert got == data
    finally:
        await release(h, js_peer)


async def test_one_megabyte_block_each_way(js_peer):
    data = os.urandom(1024 * 1024)
    cid = Cid.of(data)
    h, conn = await _bitswap_host(js_peer, {bytes(cid): data})
    try:
        got = await js_peer.call("blockGetSize", cid=str(cid))
        assert got["size"] == len(data)
        other = os.urandom(1024 * 1024)
        other_cid = await js_peer.call("blockPut", data=base64.b64encode(other).decode())
        assert await h.bitswap.fetch(conn, bytes(Cid.parse(other_cid)), timeout=10) == other
    finally:
        await release(h, js_peer)


@pytest.mark.slow
async def test_hundred_megabytes_each_way(js_peer):
    """100 blocks of 1 MiB each way; prints MB/s (the README matrix's figure)."""
    count, size = 100, 1024 * 1024
    ours = {}
    for i in range(count):
        data = os.urandom(65536) + bytes(size - 65536 - 4) + i.to_bytes(4, "big")
        ours[bytes(Cid.of(data))] = data
    h, conn = await _bitswap_host(js_peer, ours)
    try:
        got = await js_peer.call(
            "blockGetMany", cids=[str(Cid.decode(c)) for c in ours], timeout=180
        )
        assert got["bytes"] == count * size
        helia_from_us = got["bytes"] / got["ms"] / 1000

        theirs = await js_peer.call("blockMake", count=count, size=size, timeout=120)
        start = time.monotonic()
        blocks = await h.bitswap.fetch_many(
            conn, [bytes(Cid.parse(c)) for c in theirs], timeout=120
        )
        us_from_helia = count * size / (time.monotonic() - start) / 1e6
        assert all(Cid.of(b) == Cid.parse(c) for b, c in zip(blocks, theirs))
        print(
            f"\nbitswap 100 MiB: Helia from latticaray {helia_from_us:.1f} MB/s, "
            f"latticaray from Helia {us_from_helia:.1f} MB/s"
        )
    finally:
        await release(h, js_peer)
