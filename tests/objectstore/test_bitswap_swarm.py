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
    firsts = {}
    for spare in (True, False):
        partial = Provider("partial", payload, manifest, bandwidth=2e6, have=have)
        seed = Provider("seed", payload, manifest, bandwidth=8e6)
        outcome, _ = run_fetch([partial, seed], manifest, config=bs.SessionConfig(spare_full_holders=spare))
        assert isinstance(outcome["result"], bs.Completed)
        asked = [manifest.index_of(w.cid) for a in outcome["actions"]
                 if isinstance(a, bs.SendRequest) and a.peer == "seed" for w in a.request.wants
                 if w.kind == bs.WANT_BLOCK and w.cid != manifest.root]
        firsts[spare] = asked[:n // 4]
    assert all(i >= n // 2 for i in firsts[True]), firsts[True]
    assert any(i < n // 2 for i in firsts[False]), firsts[False]
