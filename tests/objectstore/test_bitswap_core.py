"""The sans-I/O Bitswap core in the discrete-event simulator: sessions, serving plans, ledgers, codec."""

import dataclasses

import numpy as np
import pytest

from latticaray.mesh.sim import Simulator
from latticaray.objectstore import bitswap as bs
from latticaray.objectstore.cid import Cid
from latticaray.objectstore.errors import BlockVerificationError, CodecError, ObjectNotFound
from latticaray.objectstore.manifest import MAX_BLOCK_SIZE, build_manifest

KB = 1024


class MemorySink:
    def __init__(self, manifest):
        self.manifest = manifest
        self.data = bytearray(manifest.size)
        self.flags = bytearray(len(manifest.blocks))

    def has_block(self, index):
        return bool(self.flags[index])

    def write_block(self, index, data):
        if self.flags[index]:
            return False
        if not self.manifest.blocks[index].verify(data):
            raise BlockVerificationError(self.manifest.blocks[index])
        start, end = self.manifest.block_range(index)
        self.data[start:end] = data
        self.flags[index] = 1
        return True


class Provider:
    def __init__(
        self,
        name,
        payload,
        manifest,
        latency=0.01,
        bandwidth=10e6,
        have=None,
        corrupt=(),
        dies_at=None,
        hangs=False,
    ):
        self.name, self.payload, self.manifest = name, payload, manifest
        self.latency, self.bandwidth, self.have = latency, bandwidth, have
        self.corrupt, self.dies_at, self.hangs = set(corrupt), dies_at, hangs
        self.blocks_served = 0

    def alive(self, now):
        return self.dies_at is None or now < self.dies_at

    def block(self, index):
        if index == -1:  # the manifest (root block); corrupt=[-1] corrupts it
            data = bytes(self.manifest.encoded)
        else:
            start, end = self.manifest.block_range(index)
            data = bytes(self.payload[start:end])
        if index in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data


def run_fetch(
    providers, payload_manifest, timeout=30.0, config=None, known=None, seed=1, stall_timeout=None
):
    sim = Simulator(seed=seed)
    manifest = payload_manifest
    config = config or bs.SessionConfig()
    if config.random_order and config.order_seed is None:
        # a simulated fetch is deterministic: its block order is seeded like the simulator
        config = dataclasses.replace(config, order_seed=seed)
    session = bs.FetchSession(
        manifest.root, deadline=timeout, config=config, stall_timeout=stall_timeout
    )
    by_name = {p.name: p for p in providers}
    outcome = {"actions": [], "sink": None}
    cancelled = set()
    timer = {"handle": None}

    def rearm():
        if timer["handle"] is not None:
            timer["handle"].cancel()
        when = session.next_timer()
        if when != float("inf"):
            timer["handle"] = sim.call_at(when, lambda: feed(session.on_timer(sim.now)))

    def feed(actions):
        for action in actions:
            outcome["actions"].append(action)
            if isinstance(action, bs.SendRequest):
                serve(action)
            elif isinstance(action, bs.CancelRequest):
                cancelled.add(action.request_id)
            elif isinstance(action, bs.FindProviders):
                names = [p.name for p in providers if known is None or p.name in known]
                sim.call_later(0.05, lambda n=names: feed(session.add_peers(n, sim.now)))
            elif isinstance(action, bs.ManifestReady):
                outcome["sink"] = MemorySink(action.manifest)
                sim.call_later(0, lambda: feed(session.attach_sink(outcome["sink"], sim.now)))
            elif isinstance(action, (bs.Completed, bs.Failed)):
                outcome["result"] = action
                outcome["time"] = sim.now
        rearm()

    def serve(action):
        provider = by_name[action.peer]
        rid = action.request_id
        request = bs.decode_request(bs.encode_request(action.request))
        if not provider.alive(sim.now) or provider.hangs:
            if not provider.alive(sim.now):
                sim.call_later(
                    provider.latency,
                    lambda: (
                        rid in cancelled
                        or feed(
                            session.on_request_failed(provider.name, rid, "unreachable", sim.now)
                        )
                    ),
                )
            return
        plan = bs.plan_response(request, provider.manifest, provider.have)
        t = sim.now + provider.latency
        state = {"failed": False}

        def deliver(response):
            if rid in cancelled or state["failed"]:
                return
            if not provider.alive(sim.now):
                state["failed"] = True
                feed(session.on_request_failed(provider.name, rid, "connection lost", sim.now))
                return
            feed(
                session.on_response(
                    provider.name, rid, bs.decode_response(bs.encode_response(response)), sim.now
                )
            )

        if plan.presences:
            sim.call_at(t, deliver, bs.Response(presences=plan.presences))
        for cid, index in plan.blocks:
            data = provider.block(index)
            t += len(data) / provider.bandwidth
            provider.blocks_served += 1
            sim.call_at(t, deliver, bs.Response(blocks=[(cid, data)]))

        def done():
            if rid in cancelled or state["failed"]:
                return
            if not provider.alive(sim.now):
                feed(session.on_request_failed(provider.name, rid, "connection lost", sim.now))
            else:
                feed(session.on_request_done(provider.name, rid, sim.now))

        sim.call_at(t, done)

    feed(session.start(sim.now))
    sim.run(until=timeout + 5, max_events=200_000, stop=lambda: "result" in outcome)
    return outcome, session


@pytest.fixture(scope="module")
def object_data():
    payload = (
        np.random.default_rng(7).integers(0, 255, 40 * 64 * KB + 123, dtype=np.uint8).tobytes()
    )
    manifest = build_manifest(payload, {"ser": "pickle5"}, chunk_size=64 * KB)
    return payload, manifest


def _assert_complete(outcome, payload):
    assert isinstance(outcome["result"], bs.Completed), outcome.get("result")
    assert bytes(outcome["sink"].data) == payload


def test_fetch_spreads_blocks_across_providers(object_data):
    payload, manifest = object_data
    providers = [Provider(f"p{i}", payload, manifest) for i in range(3)]
    outcome, session = run_fetch(providers, manifest)
    _assert_complete(outcome, payload)
    assert all(p.blocks_served >= 5 for p in providers), [p.blocks_served for p in providers]
    assert session.duplicate_blocks == 0


def test_block_requests_ask_for_a_receive_window_that_holds_their_blocks(object_data):
    payload, manifest = object_data
    outcome, _ = run_fetch([Provider("p1", payload, manifest)], manifest)
    _assert_complete(outcome, payload)
    requests = [a for a in outcome["actions"] if isinstance(a, bs.SendRequest)]
    blocks = [r for r in requests if r.request.wants[0].cid != manifest.root]
    assert blocks and all(r.window == 0 for r in requests if r not in blocks)
    for request in blocks:
        sizes = [manifest.sizes[manifest.index_of(w.cid)] for w in request.request.wants]
        assert sum(sizes) < request.window <= sum(sizes) + 1024 * len(sizes)


def test_corrupt_blocks_are_rejected_penalized_and_refetched(object_data):
    payload, manifest = object_data
    liar = Provider("liar", payload, manifest, corrupt=range(len(manifest.blocks)))
    honest = Provider("honest", payload, manifest, bandwidth=2e6)
    outcome, session = run_fetch([liar, honest], manifest)
    _assert_complete(outcome, payload)
    penalties = [a for a in outcome["actions"] if isinstance(a, bs.Penalize)]
    assert penalties and all(a.peer == "liar" for a in penalties)
    assert session.peers["liar"].dropped


def test_a_corrupt_manifest_drops_its_sender_and_the_fetch_completes_elsewhere(object_data):
    payload, manifest = object_data
    liar = Provider("liar", payload, manifest, corrupt=[-1], bandwidth=50e6)
    honest = Provider("honest", payload, manifest, bandwidth=2e6)
    outcome, session = run_fetch([liar, honest], manifest)
    _assert_complete(outcome, payload)
    penalties = [a for a in outcome["actions"] if isinstance(a, bs.Penalize)]
    assert penalties and all(a.peer == "liar" for a in penalties)
    assert session.peers["liar"].dropped and liar.blocks_served <= 1


def test_provider_killed_mid_transfer_fetch_completes_from_another(object_data):
    payload, manifest = object_data
    dying = Provider("dying", payload, manifest, bandwidth=20e6, dies_at=0.1)
    slow = Provider("slow", payload, manifest, bandwidth=2e6)
    outcome, _ = run_fetch([dying, slow], manifest)
    _assert_complete(outcome, payload)
    assert dying.blocks_served > 0 and slow.blocks_served > 0


def test_hung_provider_requests_time_out_and_move(object_data):
    payload, manifest = object_data
    cfg = bs.SessionConfig(request_timeout_base=0.5, request_timeout_per_block=0.1)
    outcome, _ = run_fetch(
        [Provider("hung", payload, manifest, hangs=True), Provider("ok", payload, manifest)],
        manifest,
        config=cfg,
    )
    _assert_complete(outcome, payload)
    assert any(isinstance(a, bs.CancelRequest) and a.peer == "hung" for a in outcome["actions"])


def test_partial_holder_serves_the_blocks_it_has(object_data):
    payload, manifest = object_data
    n = len(manifest.blocks)
    have = bytes(1 if i < n // 2 else 0 for i in range(n))
    partial = Provider("partial", payload, manifest, bandwidth=50e6, have=have)
    seed = Provider("seed", payload, manifest, bandwidth=5e6)
    outcome, _ = run_fetch([partial, seed], manifest)
    _assert_complete(outcome, payload)
    assert partial.blocks_served >= n // 4


def test_missing_object_fails_with_object_not_found_at_deadline():
    missing = build_manifest(b"nobody has this", {"ser": "pickle5"})
    nobody = Provider("nobody", b"", build_manifest(b"something else", {"ser": "pickle5"}))
    outcome, _ = run_fetch([nobody], missing, timeout=3.0)
    assert isinstance(outcome["result"], bs.Failed)
    assert isinstance(outcome["result"].error, ObjectNotFound)
    assert outcome["time"] == pytest.approx(3.0)
    finds = [a for a in outcome["actions"] if isinstance(a, bs.FindProviders)]
    assert len(finds) >= 2  # it kept looking for providers until the deadline


def test_plan_response_answers_have_dont_have_and_blocks(object_data):
    _payload, manifest = object_data
    root, b0, b1 = manifest.root, manifest.blocks[0], manifest.blocks[1]
    other = Cid.of(b"other")
    request = bs.Request(
        root,
        [
            bs.WantEntry(root, bs.WANT_HAVE, 5),
            bs.WantEntry(b0, bs.WANT_BLOCK, 1),
            bs.WantEntry(b1, bs.WANT_BLOCK, 9),
            bs.WantEntry(other, bs.WANT_HAVE, 0),
        ],
    )
    plan = bs.plan_response(request, manifest, None)
    assert (
        plan.presences[0] == (root, bs.HAVE, None) and (other, bs.DONT_HAVE, None) in plan.presences
    )
    assert plan.blocks == [(b1, 1), (b0, 0)]  # priority order
    flags = bytes([1] + [0] * (len(manifest.blocks) - 1))
    partial = bs.plan_response(request, manifest, flags)
    assert (root, bs.HAVE, bs.bitmap_from_flags(flags)) in partial.presences
    assert (b1, bs.DONT_HAVE, None) in partial.presences and partial.blocks == [(b0, 0)]
    unknown = bs.plan_response(request, None, None)
    assert not unknown.blocks and all(kind == bs.DONT_HAVE for _, kind, _ in unknown.presences)
    cancelled = bs.plan_response(bs.Request(root, request.wants, cancels=[b1]), manifest, None)
    assert cancelled.blocks == [(b0, 0)]


def test_ledgers_serve_contributors_before_free_riders():
    ledgers = bs.Ledgers(upload_slots=1, free_allowance=100, max_debt_ratio=2.0)
    ledgers.record_sent("leech", 10_000)
    ledgers.record_sent("friend", 10_000)
    ledgers.record_received("friend", 9_000)
    assert ledgers.is_free_rider("leech") and not ledgers.is_free_rider("friend")
    assert ledgers.request_slot("x", "t0")
    assert not ledgers.request_slot("leech", "t-leech")
    assert not ledgers.request_slot("friend", "t-friend")
    assert ledgers.release_slot("t0") == ["t-friend"]
    assert ledgers.release_slot("t-friend") == ["t-leech"]  # served when nobody else waits
    assert ledgers.release_slot("t-leech") == [] and ledgers.waiting == 0


def test_codec_round_trip_and_bounds():
    root = Cid.of(b"r")
    request = bs.Request(root, [bs.WantEntry(Cid.of(b"a"), bs.WANT_HAVE, 3, False)], [Cid.of(b"c")])
    back = bs.decode_request(bs.encode_request(request))
    assert back == request
    response = bs.Response([(root, bs.HAVE, b"\x01")], [(Cid.of(b"a"), b"a")])
    assert bs.decode_response(bs.encode_response(response)) == response
    block_cid = Cid.of(b"block")
    for size in (5, 300, 70_000):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        assert bs.encode_block_response(block_cid, memoryview(data)) == bs.encode_response(
            bs.Response(blocks=[(block_cid, data)])
        )
    with pytest.raises(CodecError):
        bs.decode_request(b"\xc1garbage")
    with pytest.raises(CodecError, match="exceeds"):
        bs.decode_request(b"\x00" * (bs.MAX_REQUEST_BYTES + 1))
    import msgpack

    with pytest.raises(CodecError, match="want-list"):
        bs.decode_request(
            msgpack.packb({"v": 1, "root": None, "wants": [[bytes(root), 7, 0, True]]})
        )
    with pytest.raises(CodecError, match="CID"):
        bs.decode_response(msgpack.packb({"p": [], "b": [[b"notacid", b"x"]]}))


def test_one_block_responses_decode_without_copying_the_block():
    block_cid = Cid.of(b"block")
    for size in (0, 5, 300, 70_000, MAX_BLOCK_SIZE):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        message = bs.encode_block_response(block_cid, data)
        ((cid, block),) = bs.decode_response(message).blocks
        assert cid == block_cid and block == data
        assert isinstance(block, memoryview) and block.obj is message  # a view, not a copy
    message = bs.encode_block_response(block_cid, b"y" * 1000)
    for broken in (message[:-1], message + b"\x00", message[:20]):
        with pytest.raises(CodecError):
            bs.decode_response(broken)
    oversize = (
        bs.BLOCK_RESPONSE_PREFIX + b"\xc4" + bytes([len(bytes(block_cid))]) + bytes(block_cid)
    )
    oversize += b"\xc6" + (MAX_BLOCK_SIZE + 1).to_bytes(4, "big") + b"\x00" * (MAX_BLOCK_SIZE + 1)
    with pytest.raises(CodecError, match="exceeds"):
        bs.decode_response(oversize)
    with pytest.raises(CodecError, match="CID"):
        bs.decode_response(bs.BLOCK_RESPONSE_PREFIX + b"\xc4\x07notacid\xc4\x01x")


def test_end_game_duplicates_blocks_stuck_at_a_slow_provider(object_data):
    payload, manifest = object_data
    times = {}
    for endgame in (False, True):
        providers = [
            Provider("snail", payload, manifest, bandwidth=20e3),
            Provider("fast", payload, manifest, bandwidth=20e6),
        ]
        cfg = bs.SessionConfig(
            endgame=endgame, request_timeout_base=60, request_timeout_per_block=60
        )
        outcome, _ = run_fetch(providers, manifest, timeout=50, config=cfg)
        _assert_complete(outcome, payload)
        times[endgame] = outcome["time"]
    # without the end game the fetch waits for the snail's blocks (64 KiB at 20 KB/s each)
    assert times[True] < times[False] / 2, times
