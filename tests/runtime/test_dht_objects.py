"""Runtime nodes run the DHT: store objects are announced as provided and resolved by CID.

A driver node (this process) and two node processes form a mesh. The driver puts a large object;
its provider record appears in the DHT under the mesh-scoped key of its CID (not under the CID:
a DHT node cannot tell which object a record names), found by a peer that only ever talked to
another node (a plain MeshNode + DhtService bootstrapped from node B, told the mesh's public key),
and a task on node C gets the object by its CID string. Capacity ads live under the mesh's scope,
each carrying its publisher's credential.
"""

import asyncio
import os

import pytest
from meshutil import driver_with_nodes

import latticaray as lattica
from latticaray.mesh.dht.service import DhtService
from latticaray.mesh.identity import PeerId
from latticaray.mesh.node import MeshConfig, NodeThread
from latticaray.objectstore.cid import Cid
from latticaray.runtime import api
from latticaray.runtime.meshdht import provider_key, scope_prefix, unseal


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(2) as cluster:
        yield cluster


@lattica.remote
def length_by_cid(cid):
    value = lattica.get(cid)
    return len(value), value[:16]


def _mesh_public() -> bytes:
    return api._runtime.mesh_runtime.admission.mesh_public


def _providers_seen_from(
    bootstrap_addr: str, cid: str, want: str, timeout: float
) -> tuple[list[str], list[str]]:
    """Provider peer IDs of `cid` as a stranger bootstrapped from one node sees them: under the
    mesh-scoped key (the stranger is told the mesh's public key), and under the bare CID."""
    stranger = NodeThread(MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"])).start()
    scoped = provider_key(_mesh_public(), bytes(Cid.coerce(cid)))
    try:
        dht = DhtService(stranger.node)

        async def lookup() -> tuple[list[str], list[str]]:
            await dht.bootstrap([bootstrap_addr])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            found: list[str] = []
            while loop.time() < deadline:
                found = [str(p.peer_id) async for p in dht.find_providers(scoped)]
                if want in found:
                    break
                await asyncio.sleep(0.2)
            bare = [str(p.peer_id) async for p in dht.find_providers(bytes(Cid.coerce(cid)))]
            await dht.close()
            return found, bare

        return stranger.run(lookup(), timeout + 20)
    finally:
        stranger.stop()


def test_put_object_is_provided_in_the_dht(mesh):
    blob = os.urandom(3 << 20)
    ref = lattica.put(blob)
    cid = ref.cid
    assert cid.startswith("baf")
    node_b = mesh["nodes"][0]
    providers, bare = _providers_seen_from(node_b.info["addrs"][0], cid, mesh["driver"], timeout=20)
    assert mesh["driver"] in providers
    assert bare == []  # nothing in the DHT names the object by its CID


def test_get_by_cid_on_another_node_resolves_the_object(mesh):
    blob = os.urandom(2 << 20)
    ref = lattica.put(blob)
    strategy = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
    size, head = lattica.get(
        length_by_cid.options(scheduling_strategy=strategy).remote(ref.cid), timeout=60
    )
    assert (size, head) == (len(blob), blob[:16])


def test_object_put_on_a_node_process_is_provided_by_that_node(mesh):
    node_c = mesh["nodes"][1]
    strategy = lattica.NodeAffinitySchedulingStrategy(node_c.node_id)
    holder = Holder.options(scheduling_strategy=strategy).remote(2 << 20)
    cid = lattica.get(holder.cid.remote(), timeout=60)
    assert cid.startswith("bafy")
    providers, bare = _providers_seen_from(
        mesh["nodes"][0].info["addrs"][0], cid, node_c.node_id, timeout=20
    )
    assert node_c.node_id in providers
    assert bare == []
    lattica.kill(holder)


@lattica.remote
class Holder:
    def __init__(self, n):
        self.ref = lattica.put(bytes(range(256)) * (n // 256))

    def cid(self):
        return self.ref.cid


def test_capacity_of_every_node_is_advertised_in_the_dht(mesh):
    from latticaray.scheduler.advertiser import capacity_key, views_from_dht

    expected = {mesh["driver"], *(node.node_id for node in mesh["nodes"])}
    stranger = NodeThread(MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"])).start()
    key = scope_prefix(_mesh_public()) + capacity_key("CPU")
    admission = api._runtime.mesh_runtime.admission

    def opened(found):
        """The records' values out of their envelopes, each credential checked."""
        out = {}
        for subkey, record in (found or {}).items():
            credential, value = unseal(record.value)
            publisher = str(PeerId.from_bytes(record.publisher))
            assert admission.check(publisher, credential).role == "member"
            out[subkey] = type("Ad", (), {"value": value, "publisher": record.publisher})()
        return out

    try:
        dht = DhtService(stranger.node)

        async def read_ads():
            await dht.bootstrap([mesh["nodes"][0].info["addrs"][0]])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            views = []
            while loop.time() < deadline:
                views, problems = views_from_dht(opened(await dht.get(key)), loop.time())
                assert not problems, problems
                if {v.node_id for v in views} >= expected:
                    break
                await asyncio.sleep(0.3)
            bare = await dht.get(capacity_key("CPU"))
            await dht.close()
            return views, bare

        views, bare = stranger.run(read_ads(), 60)
    finally:
        stranger.stop()
    assert bare is None  # capacity ads are only under the mesh's scope
    by_node = {v.node_id: v for v in views}
    assert set(by_node) >= expected, sorted(by_node)
    for node_id in expected:
        assert by_node[node_id].total["CPU"] == 1
