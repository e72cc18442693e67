"""Fixtures of the libp2p interop tests: one js-libp2p peer for the session, a Python host each."""

from __future__ import annotations

import os

import pytest

from latticaray.mesh.libp2p.host import Libp2pHost

from .jspeer import JsPeer, node_available, release


@pytest.fixture(scope="session")
def js_peer():
    if not node_available():
        if os.environ.get("CI"):  # CI installs node: a missing one is a failure, not a skip
            pytest.fail("node is not installed: the js-libp2p / Helia interop tests need it")
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


@pytest.fixture
async def node(js_peer):
    """A latticaray MeshNode listening on QUIC and TCP (Noise + yamux), no Unix path."""
    from latticaray.mesh.node import MeshConfig, MeshNode

    n = MeshNode(
        MeshConfig(
            listen=["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"],
            transports=("tcp", "quic"),
        )
    )
    await n.start()
    try:
        yield n
    finally:
        try:
            await js_peer.call("hangup", peer=str(n.peer_id), timeout=10)
        finally:
            await n.stop()
