"""Bitswap 1.2.0 between our service over TCP+Noise+yamux and Helia's bitswap block broker."""

from __future__ import annotations

import base64
import os

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
