"""Swarm policy of the Bitswap session core, simulated: one seed and N fetchers whose uplinks all
have the same limited rate (tests/objectstore/swarm_sim.py), so the seed's uplink is what limits one
fetch. With swarming the seed's share of the upload falls as N grows and the time for all N stays
near the time for one; fetchers that keep a fixed deep pipeline at the seed do much worse."""

import numpy as np
import pytest

from latticaray.objectstore import bitswap as bs
from latticaray.objectstore.manifest import build_manifest

from .swarm_sim import Swarm

KB = 1024
BLOCK = 16 * KB
RATE = 80 * KB  # one block per 0.2 s per uplink, like 1 MiB blocks on a 40 Mbit/s link


@pytest.fixture(scope="module")
def swarm_object():
    payload = np.random.default_rng(11).integers(0, 255, 160 * BLOCK, dtype=np.uint8).tobytes()
    return payload, build_manifest(payload, {"ser": "pickle5"}, chunk_size=BLOCK)


def test_seed_share_falls_with_fetchers_and_time_stays_near_one_fetch(swarm_object):
    payload, manifest = swarm_object
    ideal = len(payload) / RATE
    runs = {n: Swarm(payload, manifest, n, RATE).run() for n in (1, 2, 4, 8)}
    assert runs[1]["time"] == pytest.approx(ideal, rel=0.05)
    shares = [runs[n]["seed_share"] for n in (1, 2, 4, 8)]
    assert shares == sorted(shares, reverse=True) and shares[-1] < 0.25, shares
    assert runs[8]["time"] <= 1.5 * runs[1]["time"], runs
    # the seed sends each block about once, and no fetcher gets a block twice
    assert runs[8]["seed_copies"] <= 1.6, runs[8]
    assert all(r["sent_over_needed"] <= 1.02 for r in runs.values()), runs


def test_a_fixed_deep_pipeline_at_the_seed_does_worse(swarm_object):
    """The contrast that makes the test above mean something: fetchers that each keep 8 blocks
    queued at the seed (no rate-sized window) make it send blocks again and again."""
    payload, manifest = swarm_object
    adaptive = Swarm(payload, manifest, 8, RATE).run()
    fixed = Swarm(payload, manifest, 8, RATE, config=bs.SessionConfig(min_window=8)).run()
    assert fixed["seed_copies"] > adaptive["seed_copies"] + 0.5, (fixed, adaptive)
    assert fixed["time"] > 1.3 * adaptive["time"], (fixed, adaptive)


def test_full_holders_are_asked_for_blocks_no_fellow_fetcher_has_first():
    """Beside a partial holder, the seed, though faster, is asked first for the blocks the partial
    holder lacks (rarest first at full holders); by cost alone it would get blocks of both halves."""
    from .test_bitswap_core import Provider, run_fetch

    payload = np.random.default_rng(5).integers(0, 255, 64 * BLOCK, dtype=np.uint8).tobytes()
    manifest = build_manifest(payload, {"ser": "pickle5"}, chunk_size=BLOCK)
    n = len(manifest.blocks)
    have = bytes(1 if i < n // 2 else 0 for i in range(n))
    # The fetch order is random per session; fixed seeds keep the test deterministic (with an
    # unseeded order the contrast below fails about once in 60 sessions, by chance alone).
    for order_seed in (1, 2, 3):
        firsts = {}
        for spare in (True, False):
            partial = Provider("partial", payload, manifest, bandwidth=2e6, have=have)
            seed = Provider("seed", payload, manifest, bandwidth=8e6)
            config = bs.SessionConfig(spare_full_holders=spare, order_seed=order_seed)
            outcome, _ = run_fetch([partial, seed], manifest, config=config)
            assert isinstance(outcome["result"], bs.Completed)
            asked = [
                manifest.index_of(w.cid)
                for a in outcome["actions"]
                if isinstance(a, bs.SendRequest) and a.peer == "seed"
                for w in a.request.wants
                if w.kind == bs.WANT_BLOCK and w.cid != manifest.root
            ]
            firsts[spare] = asked[: n // 4]
        assert all(i >= n // 2 for i in firsts[True]), (order_seed, firsts[True])
        assert any(i < n // 2 for i in firsts[False]), (order_seed, firsts[False])


def test_pending_bitmaps_codec_and_serving_plan():
    import msgpack

    from latticaray.objectstore.cid import Cid
    from latticaray.objectstore.errors import CodecError

    payload = np.random.default_rng(3).integers(0, 255, 16 * 1024, dtype=np.uint8).tobytes()
    manifest = build_manifest(payload, {"ser": "pickle5"}, chunk_size=1024)
    root = manifest.root
    request = bs.Request(root, [bs.WantEntry(manifest.blocks[0])], pending=True)
    assert bs.decode_request(bs.encode_request(request)) == request
    # without the flag the encoding is what it always was (servers that predate it accept it)
    assert b"pend" not in bs.encode_request(bs.Request(root, [bs.WantEntry(manifest.blocks[0])]))
    with pytest.raises(CodecError, match="pend"):
        bs.decode_request(
            msgpack.packb({"v": 1, "root": bytes(root), "wants": [], "cancel": [], "pend": 1})
        )
    with pytest.raises(CodecError, match="presence"):
        bs.decode_response(msgpack.packb({"p": [[bytes(root), bs.PENDING, None]], "b": []}))
    n = len(manifest.blocks)
    have = bytes([1, 0] * (n // 2))
    pending = bytes([0, 1] + [0] * (n - 2))
    plan = bs.plan_response(request, manifest, have, pending)
    # a partial holder answers a block request with its bitmap, its pending blocks, then the block
    assert plan.presences == [
        (root, bs.HAVE, bs.bitmap_from_flags(have)),
        (root, bs.PENDING, bs.bitmap_from_flags(pending)),
    ]
    assert plan.blocks == [(manifest.blocks[0], 0)]
    assert (
        bs.decode_response(bs.encode_response(bs.Response(presences=plan.presences))).presences
        == plan.presences
    )
    # not asked for pending: not sent; a full holder sends no bitmap at all
    quiet = bs.Request(root, [bs.WantEntry(manifest.blocks[0])])
    assert [p[1] for p in bs.plan_response(quiet, manifest, have, pending).presences] == [bs.HAVE]
    assert bs.plan_response(request, manifest, None, None).presences == []
    unknown = bs.plan_response(
        bs.Request(Cid.of(b"other"), [bs.WantEntry(Cid.of(b"x"))], pending=True),
        manifest,
        have,
        pending,
    )
    assert [p[1] for p in unknown.presences] == [bs.DONT_HAVE]


def test_pending_bitmaps_keep_fetchers_from_asking_the_seed_for_the_same_block(swarm_object):
    """With TCP-like fair sharing at the seed, a block is long in transit; fellow fetchers that
    see it pending elsewhere do not ask the seed for it too."""
    payload, manifest = swarm_object
    shared = Swarm(payload, manifest, 8, RATE, sharing="fair").run()
    blind = Swarm(
        payload, manifest, 8, RATE, sharing="fair", config=bs.SessionConfig(share_pending=False)
    ).run()
    assert shared["seed_copies"] < blind["seed_copies"] - 0.15, (shared, blind)
    assert shared["time"] < blind["time"], (shared, blind)
    one = Swarm(payload, manifest, 1, RATE, sharing="fair").run()
    assert shared["time"] <= 1.5 * one["time"], (shared, one)
