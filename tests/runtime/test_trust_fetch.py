"""Every byte fetched is checked against its CID: a provider serving corrupted data, on each path.

A driver node (this process) and two node processes, A and B, both holding the same value (an
actor on each puts it: equal values, equal CIDs). The provider this node asks first is made a
liar: the bytes it sends on one fetch path are corrupted on their way in (one byte flipped in
each data frame, before the receiving code sees them). On every path the fetch completes from
the other provider with the true value, the liar is penalized (its bad-block count at this
node's exchange grows, the runtime counts a bad reply), and nothing corrupted is returned:

* `/latticaray/object/1` by CID, a small value (checked by its hash);
* `/latticaray/object/1` by CID, a store object in its store form (Bitswap out of the way: the
  manifest, then each block checked as it is written into the store);
* Bitswap (`/latticaray/bitswap/1`), the liar's corrupted manifest or blocks arriving first;
* `/latticaray/object/1` by object id from the object's owner (a small value and a store
  object): the owner's reply does not match the CID it names, so the object is fetched by that
  CID from the other holder.
"""

import asyncio
import hashlib

import pytest
from meshutil import driver_with_nodes

import latticaray as lattica
from latticaray.mesh.errors import MeshError
from latticaray.objectstore import bitswap as bs
from latticaray.runtime import api, serialization
from latticaray.runtime.local.records import OK
from latticaray.runtime.remote.wire import OBJECT_PROTOCOL

SMALL = 200 << 10  # travels inline: a raw CID over its bytes
LARGE = 4 << 20  # a store object: a manifest over 1 MiB blocks


@pytest.fixture(scope="module")
def mesh():
    # the fetch paths under test cross a connection; between nodes of one host the runtime would
    # link the holder's sealed store file instead (samehost.py: the manifest checked, the blocks
    # not, since the Unix path's SO_PEERCRED check means the peer could write our store anyway)
    with driver_with_nodes(2, node_args=("--no-same-host-path",)) as cluster:
        yield cluster


def value(size: int, seed: int) -> bytes:
    """Equal on every node for equal arguments (so both holders have the same CID)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return (block * (size // len(block) + 1))[:size]


@lattica.remote
class Holder:
    def __init__(self, size, seed):
        self.ref = lattica.put(value(size, seed))

    def cid(self):
        return self.ref.cid

    def refs(self):
        return [self.ref]


def _remote():
    return api._runtime.mesh_runtime.remote


def _on_loop(coro, timeout=120):
    return asyncio.run_coroutine_threadsafe(coro, api._runtime.loop).result(timeout)


def _holders(mesh, size, seed):
    """An actor holding the value on each node process, the liar's first: (liar's node id, the
    honest node's id, the CID, the liar's actor)."""
    remote = _remote()
    order = remote.membership.alive_peers()
    nodes = {n.node_id for n in mesh["nodes"]}
    asked_first = [n for n in order if n in nodes]
    liar, honest = asked_first[0], asked_first[1]
    actors = {
        node_id: Holder.options(
            scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(node_id)
        ).remote(size, seed)
        for node_id in (liar, honest)
    }
    cids = {n: lattica.get(a.cid.remote(), timeout=60) for n, a in actors.items()}
    assert cids[liar] == cids[honest]
    return liar, honest, cids[liar], actors


def _flip(data) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


class Liar:
    """Corrupts what one peer sends this node on one protocol (installed on this node's mesh,
    which the runtime and its exchange both fetch through)."""

    def __init__(self, monkeypatch, liar: str, protocol: str, fail_bitswap=False):
        mesh = _remote().mesh
        self.real = mesh.call_stream
        self.liar = liar
        self.protocol = protocol
        self.fail_bitswap = fail_bitswap
        self.sent_bad = 0
        self.asked = []
        self.liar_spoke: asyncio.Event | None = None
        monkeypatch.setattr(mesh, "call_stream", self.call_stream)

    def corrupt(self, frame, first: bool):
        if self.protocol == OBJECT_PROTOCOL:
            return frame if first else _flip(frame)  # the header stays; the data does not
        response = bs.decode_response(frame)
        if not response.blocks:
            return frame
        ((cid, data),) = response.blocks
        return bs.encode_block_response(cid, _flip(data))

    async def call_stream(self, peer_id, service, payload=b"", timeout=None, window=None):
        if self.liar_spoke is None:
            self.liar_spoke = asyncio.Event()
        node_id = str(peer_id)
        self.asked.append((node_id, service))
        if service == bs.PROTOCOL_ID and self.fail_bitswap:
            raise MeshError("test: Bitswap is out of the way")
        lying = node_id == self.liar and service == self.protocol
        if service == self.protocol and not lying and service == bs.PROTOCOL_ID:
            # the honest provider answers once the liar has: its bad blocks arrive first
            await asyncio.wait_for(self.liar_spoke.wait(), 10)
        first = True
        async for frame in self.real(peer_id, service, payload, timeout, window):
            if lying:
                changed = self.corrupt(frame, first)
                if changed is not frame:
                    self.sent_bad += 1
                    self.liar_spoke.set()
                frame = changed
            first = False
            yield frame


def _penalties(liar: str) -> tuple[int, int]:
    remote = _remote()
    peer = remote.membership.peers[liar].peer_id
    return remote.exchange.ledgers.bad_blocks(peer), remote.stats["bad_object_replies"]


@pytest.fixture
def lenient(monkeypatch):
    """The liar stays askable across these tests (each shows one path's penalty)."""
    monkeypatch.setattr(_remote().exchange.config, "distrust_after_bad_blocks", 1 << 30)


def _check(found, expected: bytes, cid: str):
    assert found is not None
    status, data = found
    assert status == OK
    got = serialization.deserialize(data)
    assert bytes(got) == expected, "a corrupted value was returned"
    assert serialization.cid_of(data) == cid or serialization.store_cid(data) == cid


def test_corrupt_small_value_by_cid_comes_from_the_other_provider(mesh, monkeypatch, lenient):
    liar, honest, cid, _actors = _holders(mesh, SMALL, 1)
    assert not cid.startswith("bafy")
    before = _penalties(liar)
    spy = Liar(monkeypatch, liar, OBJECT_PROTOCOL)
    found = _on_loop(_remote().objects.fetch_by_cid(cid, 30))
    _check(found, value(SMALL, 1), cid)
    assert spy.sent_bad >= 1
    assert [n for n, s in spy.asked if s == OBJECT_PROTOCOL] == [liar, honest]
    after = _penalties(liar)
    assert after[0] > before[0] and after[1] > before[1]


def test_corrupt_store_object_over_object_1_comes_from_the_other_provider(
    mesh, monkeypatch, lenient
):
    liar, honest, cid, _actors = _holders(mesh, LARGE, 2)
    assert cid.startswith("bafy")
    store = api._runtime.node.store
    assert not store.contains(cid)
    before = _penalties(liar)
    spy = Liar(monkeypatch, liar, OBJECT_PROTOCOL, fail_bitswap=True)
    found = _on_loop(_remote().objects.fetch_by_cid(cid, 30))
    _check(found, value(LARGE, 2), cid)
    assert serialization.is_store_ref(found[1]) and store.contains(cid)
    assert spy.sent_bad >= 1
    assert [n for n, s in spy.asked if s == OBJECT_PROTOCOL] == [liar, honest]
    after = _penalties(liar)
    assert after[0] > before[0] and after[1] > before[1]


def test_corrupt_bitswap_blocks_come_from_the_other_provider(mesh, monkeypatch, lenient):
    liar, _honest, cid, _actors = _holders(mesh, LARGE, 3)
    store = api._runtime.node.store
    assert not store.contains(cid)
    before = _penalties(liar)
    spy = Liar(monkeypatch, liar, bs.PROTOCOL_ID)
    found = _on_loop(_remote().objects.fetch_by_cid(cid, 60))
    _check(found, value(LARGE, 3), cid)
    assert spy.sent_bad >= 1
    assert not any(s == OBJECT_PROTOCOL for _, s in spy.asked)  # Bitswap alone did it
    after = _penalties(liar)
    assert after[0] > before[0]


@pytest.mark.parametrize("size, seed", [(SMALL, 4), (LARGE, 5)], ids=["small", "store"])
def test_corrupt_reply_by_object_id_is_fetched_by_its_cid_elsewhere(
    mesh, monkeypatch, lenient, size, seed
):
    liar, _honest, _cid, actors = _holders(mesh, size, seed)
    (ref,) = lattica.get(actors[liar].refs.remote(), timeout=60)  # owned by the liar
    assert ref.owner == liar
    before = _penalties(liar)
    spy = Liar(monkeypatch, liar, OBJECT_PROTOCOL)
    got = lattica.get(ref, timeout=60)
    assert bytes(got) == value(size, seed)
    assert spy.sent_bad >= 1
    by_object = [n for n, s in spy.asked if s == OBJECT_PROTOCOL]
    assert by_object[0] == liar
    after = _penalties(liar)
    assert after[0] > before[0] and after[1] > before[1]
