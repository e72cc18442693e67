"""Runtime nodes run the DHT: store objects are announced as provided and resolved by CID.

A driver node (this process) and two node processes form a mesh. The driver puts a large object;
its CID appears as a provider record in the DHT, found by a peer that only ever talked to another
node (a plain MeshNode + DhtService bootstrapped from node B), and a task on node C gets the
object by its CID string.
"""

import asyncio
import os

import pytest
from meshutil import driver_with_nodes

import latticaray as lattica
from latticaray.mesh.dht.service import DhtService
from latticaray.mesh.node import MeshConfig, NodeThread
from latticaray.objectstore.cid import Cid


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(2) as cluster:
        yield cluster


@lattica.remote
def length_by_cid(cid):
    value = lattica.get(cid)
    return len(value), value[:16]


def _providers_seen_from(bootstrap_addr: str, cid: str, want: str, timeout: float) -> list[str]:
    """Provider peer IDs of `cid` as a stranger bootstrapped from one node sees them."""
    stranger = NodeThread(MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"])).start()
    try:
        dht = DhtService(stranger.node)

        async def lookup() -> list[str]:
            await dht.bootstrap([bootstrap_addr])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            found: list[str] = []
            while loop.time() < deadline:
                found = [str(p.peer_id) async for p in dht.find_providers(bytes(Cid.coerce(cid)))]
                if want in found:
                    break
                await asyncio.sleep(0.2)
            await dht.close()
            return found

        return stranger.run(lookup(), timeout + 20)
    finally:
        stranger.stop()


def test_put_object_is_provided_in_the_dht(mesh):
    blob = os.urandom(3 << 20)
    ref = lattica.put(blob)
    cid = ref.cid
    assert cid.startswith("baf")
    node_b = mesh["nodes"][0]
    providers = _providers_seen_from(node_b.info["addrs"][0], cid, mesh["driver"], timeout=20)
    assert mesh["driver"] in providers


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
    providers = _providers_seen_from(
        mesh["nodes"][0].info["addrs"][0], cid, node_c.node_id, timeout=20
    )
    assert node_c.node_id in providers
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
    try:
        dht = DhtService(stranger.node)

        async def read_ads():
            await dht.bootstrap([mesh["nodes"][0].info["addrs"][0]])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            views = []
            while loop.time() < deadline:
                views, problems = views_from_dht(await dht.get(capacity_key("CPU")), loop.time())
                assert not problems, problems
                if {v.node_id for v in views} >= expected:
                    break
                await asyncio.sleep(0.3)
            await dht.close()
            return views

        views = stranger.run(read_ads(), 60)
    finally:
        stranger.stop()
    by_node = {v.node_id: v for v in views}
    assert set(by_node) >= expected, sorted(by_node)
    for node_id in expected:
        assert by_node[node_id].total["CPU"] == 1
