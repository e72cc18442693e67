"""Fixtures of the libp2p interop tests: one js-libp2p peer for the session, a Python host each."""

from __future__ import annotations

import pytest

from latticaray.mesh.libp2p.host import Libp2pHost

from .jspeer import JsPeer, node_available, release


@pytest.fixture(scope="session")
def js_peer():
    if not node_available():
        pytest.skip("node is not installed on this machine")
    peer = JsPeer()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
async def host(js_peer):
    h = Libp2pHost()
    await h.listen("127.0.0.1", 0)
    try:
        yield h
    finally:
        await release(h, js_peer)
