"""ObjectExchange between real MeshNodes over loopback: fetch, corrupt blocks, provider death,
missing objects, replication, concurrent fetchers (swarm)."""

import asyncio
import os
import time

import numpy as np
import pytest

from latticaray.mesh.errors import RpcError
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.objectstore import bitswap as bs
from latticaray.objectstore.bitswap import SessionConfig
from latticaray.objectstore.cid import Cid
from latticaray.objectstore.errors import ObjectNotFound
from latticaray.objectstore.exchange import REPLICATE_PROTOCOL_ID, ExchangeConfig, ObjectExchange

MB = 1 << 20
TRANSPORTS = {
    "quic": {"listen": ["/ip4/127.0.0.1/udp/0/quic-v1"], "transports": ("quic",)},
    "tcp": {"listen": ["/ip4/127.0.0.1/tcp/0"], "transports": ("tcp",)},
}


class Peer:
    def __init__(self, node, store, exchange):
        self.node, self.store, self.exchange = node, store, exchange


@pytest.fixture
async def mesh(make_store):
    peers = []

    async def make(
        count, transport="quic", config=None, chunk_size=MB, capacity=256 << 20, authorize=None
    ):
        for _ in range(count):
            node = MeshNode(MeshConfig(**TRANSPORTS[transport]))
            await node.start()
            store = make_store(f"n{len(peers)}", capacity_bytes=capacity, chunk_size=chunk_size)
            everyone = lambda cid, me=node: _others(peers, me)  # noqa: E731
            exchange = ObjectExchange(
                node,
                None,
                store,
                providers=everyone,
                config=config or ExchangeConfig(),
                authorize=authorize,
            )
            await exchange.start()
            peers.append(Peer(node, store, exchange))
        for a in peers:
            for b in peers:
                if a is not b:
                    a.node.add_addrs(b.node.peer_id, b.node.listen_addrs)
        return peers

    try:
        yield make
    finally:
        for peer in peers:
            await peer.exchange.stop()
            await peer.node.stop()


async def _others(peers, me):
    return [p.node.peer_id for p in peers if p.node is not me]


@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_fetch_between_two_nodes(mesh, transport):
    seed, fetcher = await mesh(2, transport)
    value = np.random.default_rng(3).standard_normal(3 * MB // 8 + 1000)
    cid = seed.store.put(value)
    await seed.exchange.provide(cid)
    seen = []
    assert (
        await fetcher.exchange.fetch(cid, timeout=30, progress=lambda d, t: seen.append((d, t)))
        == cid
    )
    result = fetcher.store.get(cid)
    np.testing.assert_array_equal(result, value)
    assert seen and seen[-1][0] == seen[-1][1] == seed.store.manifest(cid).size
    assert fetcher.exchange.ledgers.ledger(seed.node.peer_id).received >= value.nbytes
    assert seed.exchange.ledgers.ledger(fetcher.node.peer_id).sent >= value.nbytes
    assert await fetcher.exchange.fetch(cid, timeout=1) == cid  # local hit


def _held_by_a_liar_and_an_honest_peer(liar, honest, value):
    """Put ``value`` in both stores, then flip a byte in every block of the liar's shm copy: it
    serves bad blocks from now on."""
    cid = liar.store.put(value)
    assert honest.store.put(value) == cid
    path = os.path.join(liar.store.root, "objects", str(cid))
    manifest = liar.store.manifest(cid)
    with open(path, "r+b") as file:
        for i in range(len(manifest.blocks)):
            file.seek(manifest.block_range(i)[0] + 100)
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 0xFF]))
    liar.exchange._open.clear()
    return cid


async def test_corrupted_block_is_rejected_and_refetched_elsewhere(mesh):
    liar, honest, fetcher = await mesh(
        3, config=ExchangeConfig(session=SessionConfig(blocks_per_request=1)), chunk_size=256 * 1024
    )
    value = np.arange(3 * MB // 8, dtype=np.int64)
    cid = _held_by_a_liar_and_an_honest_peer(liar, honest, value)
    await fetcher.exchange.fetch(cid, timeout=30)
    np.testing.assert_array_equal(fetcher.store.get(cid), value)
    assert fetcher.exchange.ledgers.ledger(liar.node.peer_id).bad_blocks >= 1
    assert fetcher.exchange.ledgers.ledger(honest.node.peer_id).bad_blocks == 0


async def test_a_peer_that_sent_bad_blocks_is_asked_for_nothing_more(mesh):
    config = ExchangeConfig(
        session=SessionConfig(blocks_per_request=1), distrust_after_bad_blocks=1
    )
    liar, honest, fetcher = await mesh(3, config=config, chunk_size=256 * 1024)
    first = np.arange(3 * MB // 8, dtype=np.int64)
    await fetcher.exchange.fetch(_held_by_a_liar_and_an_honest_peer(liar, honest, first), 30)
    assert not fetcher.exchange.trusted(liar.node.peer_id)
    assert fetcher.exchange.trusted(honest.node.peer_id)
    second = first + 1
    other = liar.store.put(second)  # intact this time: the liar is still not asked
    assert honest.store.put(second) == other
    sent = liar.exchange.ledgers.ledger(fetcher.node.peer_id).sent
    assert await fetcher.exchange.fetch(other, timeout=30) == other
    np.testing.assert_array_equal(fetcher.store.get(other), second)
    assert liar.exchange.ledgers.ledger(fetcher.node.peer_id).sent == sent


async def test_provider_killed_mid_transfer_fetch_completes_from_another(mesh):
    cfg = ExchangeConfig(session=SessionConfig(window=2, blocks_per_request=1))
    victim, survivor, fetcher = await mesh(3, config=cfg, chunk_size=256 * 1024)
    value = np.random.default_rng(5).integers(
        0, 1 << 30, 2 * MB, dtype=np.int64
    )  # 16 MB, 64 blocks
    cid = victim.store.put(value)
    survivor.store.put(value)
    killed = asyncio.Event()

    def on_progress(done, total):
        if done > total // 8 and not killed.is_set():
            killed.set()
            asyncio.get_running_loop().create_task(victim.node.stop())

    await fetcher.exchange.fetch(cid, timeout=60, progress=on_progress)
    assert killed.is_set()
    np.testing.assert_array_equal(fetcher.store.get(cid), value)
    assert victim.exchange.ledgers.ledger(fetcher.node.peer_id).sent > 0
    assert survivor.exchange.ledgers.ledger(fetcher.node.peer_id).sent > 0


async def test_missing_cid_raises_object_not_found_after_its_deadline(mesh):
    _a, b = await mesh(2)
    missing = Cid.of(b"never stored anywhere")
    start = time.monotonic()
    with pytest.raises(ObjectNotFound):
        await b.exchange.fetch(missing, timeout=1.5)
    elapsed = time.monotonic() - start
    assert 1.4 <= elapsed < 15


async def test_abandoned_fetch_fails_its_waiters_and_a_later_fetch_asks_again(mesh):
    a, b = await mesh(2)
    value = np.arange(2 * MB // 8, dtype=np.int64)
    cid = a.store.put(value)
    a.store.delete(cid)  # nobody has it while b's first fetch runs
    start = time.monotonic()
    first = asyncio.ensure_future(b.exchange.fetch(cid, timeout=30))
    while not b.exchange.abandon(cid, "its source died"):  # once the run exists
        assert time.monotonic() - start < 10 and not first.done()
        await asyncio.sleep(0.01)
    with pytest.raises(ObjectNotFound, match="its source died"):
        await first
    assert time.monotonic() - start < 10  # not the run's 30 s deadline
    assert not b.exchange.abandon(cid, "no run any more")
    assert a.store.put(value) == cid  # a copy appears (a re-run made it)
    assert await b.exchange.fetch(cid, timeout=30) == cid
    np.testing.assert_array_equal(b.store.get(cid), value)


async def test_replicate_asks_peers_to_fetch_and_pin(mesh):
    origin, r1, r2, r3 = await mesh(4)
    cid = origin.store.put({"model": np.ones(MB // 4)})
    for peer in (r1, r2, r3):
        await origin.node.connect(peer.node.listen_addrs[0])
    confirmed = await origin.exchange.replicate(cid, 2, timeout=30)
    assert len(confirmed) == 2
    holders = [p for p in (r1, r2, r3) if p.store.contains(cid)]
    assert len(holders) == 2 and all(p.store.is_pinned(cid) for p in holders)
    with pytest.raises(ObjectNotFound):
        await r3.exchange.replicate(Cid.of(b"nothing"), 1)


async def test_concurrent_fetchers_form_a_swarm(mesh):
    seed, *fetchers, late = await mesh(5, chunk_size=256 * 1024)
    value = np.random.default_rng(9).integers(0, 255, 5 * MB, dtype=np.uint8)
    cid = seed.store.put(value)
    results = await asyncio.gather(*(f.exchange.fetch(cid, timeout=60) for f in fetchers))
    assert results == [cid] * 3
    for f in fetchers:
        np.testing.assert_array_equal(f.store.get(cid), value)
    # fetchers became providers: with the seed gone, a late fetcher is served by them
    await seed.exchange.stop()
    await seed.node.stop()
    assert await late.exchange.fetch(cid, timeout=60) == cid
    np.testing.assert_array_equal(late.store.get(cid), value)
    served = [f.exchange.ledgers.ledger(late.node.peer_id).sent for f in fetchers]
    assert sum(served) >= value.nbytes and sum(1 for s in served if s) >= 2


async def test_fetch_finds_providers_through_the_dht(make_store):
    from latticaray.mesh.dht.config import DhtConfig
    from latticaray.mesh.dht.service import DhtService

    nodes, dhts, exchanges = [], [], []
    try:
        for i in range(4):
            node = await MeshNode(MeshConfig(**TRANSPORTS["quic"])).start()
            dht = DhtService(node, DhtConfig(k=4))
            nodes.append(node)
            dhts.append(dht)
            # the fetcher (i == 3) may only learn providers from the DHT, not from its connections
            config = ExchangeConfig(max_connected_candidates=0 if i == 3 else 32)
            exchanges.append(ObjectExchange(node, dht, make_store(f"d{i}"), config=config))
        assert await dhts[0].bootstrap() == 0
        for dht in dhts[1:]:
            assert await asyncio.wait_for(dht.bootstrap([str(nodes[0].listen_addrs[0])]), 30) >= 1
        seed, fetcher = exchanges[2], exchanges[3]
        value = np.arange(MB, dtype=np.int32)
        cid = seed.store.put(value)
        await seed.provide(cid)
        await fetcher.fetch(cid, timeout=30)
        np.testing.assert_array_equal(fetcher.store.get(cid), value)
        assert fetcher.ledgers.ledger(nodes[2].peer_id).received >= value.nbytes
        # the fetcher announced itself: the DHT now lists both as providers
        found = {p.peer_id async for p in dhts[1].find_providers(bytes(cid))}
        assert {nodes[2].peer_id, nodes[3].peer_id} <= found
    finally:
        for exchange in exchanges:
            await exchange.stop()
        for dht in dhts:
            await dht.close()
        for node in nodes:
            await node.stop()


async def test_malformed_requests_get_clear_errors_and_the_node_keeps_serving(mesh):
    from latticaray.mesh.errors import RpcError
    from latticaray.objectstore.bitswap import PROTOCOL_ID
    from latticaray.objectstore.exchange import REPLICATE_PROTOCOL_ID

    server, client = await mesh(2)
    cid = server.store.put(np.arange(1000))
    for garbage in (b"", b"\xc1\xc1", b"\x93\x01\x02\x03", b"\x00" * 300_000):
        with pytest.raises(RpcError) as info:
            async for _ in client.node.call_stream(
                server.node.peer_id, PROTOCOL_ID, garbage, timeout=10
            ):
                pass
        assert info.value.code == "INVALID_ARGUMENT"
    for garbage in (b"", b"\x81\xa4root\xa3bad", b"\x00" * 5000):
        import msgpack

        reply = msgpack.unpackb(
            await client.node.call(server.node.peer_id, REPLICATE_PROTOCOL_ID, garbage, timeout=10)
        )
        assert reply["ok"] is False and reply["error"]
    assert await client.exchange.fetch(cid, timeout=30) == cid


def test_progress_reporter_calls_back_and_draws_a_bar_only_when_asked(capsys, monkeypatch):
    import builtins

    from latticaray.objectstore.exchange import _Progress

    seen = []
    quiet = _Progress(Cid.of(b"x"), lambda done, total: seen.append((done, total)), False, 0)
    quiet.start(10)
    quiet.advance(4)
    quiet.advance(6)
    quiet.close()
    assert seen == [(4, 10), (10, 10)] and capsys.readouterr().err == ""
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):  # the fallback when tqdm is not installed
        if name == "tqdm":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    loud = _Progress(Cid.of(b"x"), None, True, 0)
    loud.start(3 * MB)
    loud.advance(3 * MB)
    loud.close()
    assert "3/3 MiB" in capsys.readouterr().err


@pytest.mark.parametrize("transport", ["quic", "tcp"])
async def test_object_of_identical_blocks(mesh, transport):
    """Blocks with the same content share one CID: one copy received fills every place it has."""
    seed, fetcher = await mesh(2, transport)
    value = np.zeros(5 * MB // 8 + 100, dtype=np.int64)  # five identical 1 MiB blocks and a tail
    cid = seed.store.put(value)
    manifest = seed.store.manifest(cid)
    assert len(manifest.blocks) == 6 and len(set(manifest.blocks)) == 3  # header, 4 alike, tail
    await seed.exchange.provide(cid)
    assert await fetcher.exchange.fetch(cid, timeout=20) == cid
    np.testing.assert_array_equal(fetcher.store.get(cid), value)


async def test_non_members_are_refused_unread_on_bitswap_and_replicate(mesh, monkeypatch):
    members: set = set()
    owner, member, outsider = await mesh(3, authorize=lambda peer: peer in members)
    members.update({owner.node.peer_id, member.node.peer_id})
    value = np.arange(3 * MB // 8, dtype=np.int64)
    cid = owner.store.put(value)
    decoded = []
    real_decode = bs.decode_request
    monkeypatch.setattr(
        bs, "decode_request", lambda data: decoded.append(data) or real_decode(data)
    )

    want = bs.encode_request(bs.Request(cid, [bs.WantEntry(cid, bs.WANT_BLOCK, 0, True)]))
    with pytest.raises(RpcError) as refused:
        async for _ in outsider.node.call_stream(
            owner.node.peer_id, bs.PROTOCOL_ID, want, timeout=10
        ):
            pass
    assert refused.value.code == "PERMISSION_DENIED"
    assert decoded == [] and owner.exchange.refused == 1  # refused before its request was read
    with pytest.raises(ObjectNotFound):  # neither member serves it, by any path of the exchange
        await outsider.exchange.fetch(cid, timeout=2)
    assert not outsider.store.contains(cid) and decoded == []

    # an outsider cannot make a member fetch and pin anything
    stored_before = member.store.stats()["objects"]
    with pytest.raises(RpcError) as refused:
        await outsider.node.call(
            member.node.peer_id, REPLICATE_PROTOCOL_ID, b"\x81\xa4root\xc4\x00", timeout=10
        )
    assert refused.value.code == "PERMISSION_DENIED" and member.exchange.refused >= 1
    assert (
        member.store.stats()["objects"] == stored_before and member.exchange.progress(cid) is None
    )

    # members are served as before; a member never asks an outsider to replicate
    assert await member.exchange.fetch(cid, timeout=30) == cid
    np.testing.assert_array_equal(member.store.get(cid), value)
    confirmed = await owner.exchange.replicate(
        cid, 2, timeout=30, candidates=[outsider.node.peer_id, member.node.peer_id]
    )
    assert confirmed == [member.node.peer_id] and not outsider.store.contains(cid)
