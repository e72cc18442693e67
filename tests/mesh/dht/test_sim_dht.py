"""The DHT core at small scale in the simulator: lookups converge, subkeys merge under concurrent
writers, records survive their storer's death, quotas hold over the network, providers expire."""

from __future__ import annotations

import pytest

from latticaray.mesh.dht.config import DhtConfig
from latticaray.mesh.dht.keyspace import dht_id, record_id
from latticaray.mesh.dht.lookups import FindNodeOp
from latticaray.mesh.dht.records import Record
from latticaray.mesh.sim.dht import SimDht


def _network(n: int, seed: int = 7, **config) -> SimDht:
    sim = SimDht(seed=seed, config=DhtConfig(**config))
    sim.grow(n, join_interval=0.02)
    assert len(sim.joined) == n
    return sim


def _true_closest(sim: SimDht, target: int, k: int, exclude: bytes) -> list[bytes]:
    live = [p for p in sim.live_nodes() if p != exclude]
    return sorted(live, key=lambda p: dht_id(p) ^ target)[:k]


@pytest.fixture(scope="module")
def net150() -> SimDht:
    return _network(150)


@pytest.mark.parametrize("paths", [1, 2])
def test_lookups_converge_to_the_true_k_closest(paths):
    sim = _network(150, seed=11, disjoint_paths=paths)
    ids = sorted(sim.nodes)
    exact = 0
    for i in range(30):
        origin = sim.nodes[sim.rng.choice(ids)]
        target = dht_id(b"target-%d" % i)
        op = sim.run_until_done(origin, origin.find_node(target, sim.sim.now))
        assert isinstance(op, FindNodeOp) and op.done
        found = [c.peer_id for c in op.result]
        truth = _true_closest(sim, target, sim.config.k, origin.peer_id)
        assert len(found) == sim.config.k
        # every lookup finds almost all of the true k closest; nearly all find exactly them
        assert len(set(found) & set(truth)) >= sim.config.k - 2
        exact += found == truth
    assert exact >= 27


def test_get_finds_stored_values_in_few_hops(net150):
    sim = net150
    ids = sorted(sim.nodes)
    stored = {}
    for i in range(10):
        pub = sim.rng.choice(ids)
        record = Record.create(b"k%d" % i, b"value-%d" % i, sim.sim.now + 600, sim.keypairs[pub])
        op = sim.run_until_done(sim.nodes[pub], sim.nodes[pub].put([record], sim.sim.now))
        assert op.result >= sim.config.k, "a put reaches the k closest nodes"
        stored[record.key] = record.value
    for key, value in stored.items():
        getter = sim.nodes[sim.rng.choice(ids)]
        op = sim.run_until_done(getter, getter.get_value(key, sim.sim.now))
        assert op.result[None].value == value
        assert op.hops is not None and op.hops <= 3
    quick = sim.run_until_done(getter, getter.get_value(key, sim.sim.now, quorum=1))
    assert quick.result[None].value == value and quick.holders == 1
    assert quick.messages < op.messages, "a quorum of one ends the lookup early"
    missing = sim.run_until_done(
        sim.nodes[ids[0]], sim.nodes[ids[0]].get_value(b"nope", sim.sim.now)
    )
    assert missing.result == {}


def test_fifty_concurrent_writers_under_one_key_all_survive(net150):
    sim = net150
    ids = sorted(sim.nodes)
    writers = sim.rng.sample(ids, 50)
    finished = []
    now = sim.sim.now
    for pid in writers:  # all puts start at the same instant and interleave on the network
        core = sim.nodes[pid]
        record = Record.create(
            b"capacity/gpu", b"free=%d" % len(finished), now + 600, sim.keypairs[pid], subkey=pid
        )
        sim.run_op(core, core.put([record], now), finished.append)
    sim.sim.run(until=now + 60, stop=lambda: len(finished) == 50)
    assert len(finished) == 50
    getter = sim.nodes[sim.rng.choice(ids)]
    op = sim.run_until_done(getter, getter.get_value(b"capacity/gpu", sim.sim.now))
    assert set(op.result) == set(writers)
    # and every one of the key's k closest nodes holds the merged map itself
    target = record_id(b"capacity/gpu")
    for pid in _true_closest(sim, target, sim.config.k, b""):
        held = {r.subkey for r in sim.nodes[pid].records.get(b"capacity/gpu", sim.sim.now)}
        assert held == set(writers)


def test_record_outlives_the_node_that_stored_it():
    sim = _network(80, seed=3)
    ids = sorted(sim.nodes)
    pub = ids[5]
    record = Record.create(b"precious", b"data", sim.sim.now + 600, sim.keypairs[pub])
    sim.run_until_done(sim.nodes[pub], sim.nodes[pub].put([record], sim.sim.now))
    holders = [p for p in ids if sim.nodes[p].records.get(b"precious", sim.sim.now)]
    assert len(holders) >= sim.config.k
    closest_holder = min(holders, key=lambda p: dht_id(p) ^ record_id(b"precious"))
    for dead in {pub, closest_holder}:
        sim.leave(dead)
    getter = sim.nodes[next(p for p in ids if sim.net.is_up(p))]
    op = sim.run_until_done(getter, getter.get_value(b"precious", sim.sim.now))
    assert op.result[None].value == b"data"


def test_republish_moves_records_to_new_closest_nodes():
    sim = _network(40, seed=5, republish_interval=100.0, refresh_interval=10_000.0)
    ids = sorted(sim.nodes)
    pub = ids[0]
    record = Record.create(b"moving", b"v", sim.sim.now + 3000, sim.keypairs[pub])
    sim.run_until_done(sim.nodes[pub], sim.nodes[pub].put([record], sim.sim.now))
    sim.grow(40, join_interval=0.02)
    sim.run_for(101)
    for core in list(sim.nodes.values()):
        for op in core.maintenance(sim.sim.now):
            sim.run_op(core, op)
    sim.run_for(30)
    target = record_id(b"moving")
    truth = _true_closest(sim, target, sim.config.k, b"")
    holding = [p for p in truth if sim.nodes[p].records.get(b"moving", sim.sim.now)]
    assert len(holding) == len(truth), "after republishing, the current k closest all hold it"


def test_quota_and_bad_records_rejected_over_the_network():
    sim = _network(30, seed=9, per_publisher_records=3)
    ids = sorted(sim.nodes)
    pub, core = ids[0], sim.nodes[ids[0]]
    ok = [
        Record.create(b"q", b"v", sim.sim.now + 600, sim.keypairs[pub], subkey=b"%d" % i)
        for i in range(3)
    ]
    op = sim.run_until_done(core, core.put(ok, sim.sim.now))
    assert op.result >= sim.config.k and not op.errors
    more = [Record.create(b"q", b"v", sim.sim.now + 600, sim.keypairs[pub], subkey=b"x")]
    op = sim.run_until_done(core, core.put(more, sim.sim.now))
    assert op.errors.get("quota", 0) >= sim.config.k - 1
    assert op.result <= 1
    # a forged record sent straight to a peer is refused, not stored
    forged = Record(b"f", None, b"v", sim.sim.now + 600, pub, b"\x00" * 64)
    target = sim.nodes[ids[1]]
    resp = target.handle_request(
        core.contact, core.request("put_value", records=[forged]), sim.sim.now
    )
    assert resp == {"results": ["bad_signature"]}
    assert target.records.get(b"f", sim.sim.now) == []


def test_provider_records_are_found_and_expire():
    sim = _network(60, seed=13, provider_ttl=50.0, reprovide_interval=10_000.0)
    ids = sorted(sim.nodes)
    providers = ids[:3]
    for pid in providers:
        op = sim.run_until_done(
            sim.nodes[pid], sim.nodes[pid].add_provider(b"bafkcid", sim.sim.now)
        )
        assert op.result >= sim.config.k
    seeker = sim.nodes[ids[-1]]
    op = sim.run_until_done(seeker, seeker.get_providers(b"bafkcid", 2, sim.sim.now))
    assert len(op.result) == 2 and {c.peer_id for c in op.result} <= set(providers)
    op = sim.run_until_done(seeker, seeker.get_providers(b"bafkcid", 20, sim.sim.now))
    assert {c.peer_id for c in op.result} == set(providers)
    sim.run_for(51)
    op = sim.run_until_done(seeker, seeker.get_providers(b"bafkcid", 20, sim.sim.now))
    assert op.result == []
    for core in sim.nodes.values():
        core.maintenance(sim.sim.now)
        assert len(core.providers) == 0, "expiry sweeps drop provider records"


def test_lookups_survive_loss_and_dead_peers():
    sim = SimDht(seed=21, loss=0.05, config=DhtConfig(request_timeout=1.0, stall_timeout=0.3))
    sim.grow(100, join_interval=0.02)
    ids = sorted(sim.nodes)
    pub = ids[0]
    record = Record.create(b"lossy", b"v", sim.sim.now + 600, sim.keypairs[pub])
    sim.run_until_done(sim.nodes[pub], sim.nodes[pub].put([record], sim.sim.now))
    for pid in sim.rng.sample(ids[1:], 20):
        sim.leave(pid)
    live = [p for p in ids if sim.net.is_up(p)]
    found = 0
    for _i in range(20):
        getter = sim.nodes[sim.rng.choice(live)]
        op = sim.run_until_done(getter, getter.get_value(b"lossy", sim.sim.now))
        found += None in op.result
    assert found >= 19


def test_client_mode_nodes_query_but_never_enter_routing_tables(net150):
    sim = net150
    client = sim.new_node()
    client.config = DhtConfig(server_mode=False)
    ids = sorted(p for p in sim.nodes if p != client.peer_id)
    sim.run_until_done(client, client.bootstrap([sim.contacts[ids[0]]], sim.sim.now))
    assert len(client.routing) >= sim.config.k, "a client still learns the servers it talks to"
    op = sim.run_until_done(client, client.find_node(dht_id(b"anything"), sim.sim.now))
    assert len(op.result) == sim.config.k
    assert not any(client.peer_id in sim.nodes[p].routing for p in ids)


def test_simulation_is_deterministic_from_its_seed():
    def run(seed: int) -> tuple:
        sim = _network(40, seed=seed)
        core = sim.nodes[sorted(sim.nodes)[3]]
        op = sim.run_until_done(core, core.find_node(dht_id(b"t"), sim.sim.now))
        return (
            sim.net.stats.messages_sent,
            sim.sim.now,
            [c.peer_id for c in op.result],
            sorted((p, len(c.routing)) for p, c in sim.nodes.items()),
        )

    assert run(4) == run(4)
    assert run(4) != run(5)
