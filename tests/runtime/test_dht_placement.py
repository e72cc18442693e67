"""Placement from the capacity nodes advertise in the DHT (`capacity/<resource>`).

Three node processes: D (sparse peering with no fill: admits peers only through its bootstrap
role, placement or when asked, not those introduced in views; the driver attaches to it), A
(joins through D, full peering), and C (joins through A, sparse, no fill, the only node with
"tpu"s). D never gets a pushed view of C, yet a task and an actor asking for a tpu land on C
because C's DHT capacity ad names it; afterwards C feeds D's
views. A request no node can take still fails with TaskUnschedulableError after the wait (an
actor's calls with ActorDiedError saying why). A fourth node E (joins through A, sparse, the only
one with "npu"s) is met by D only when a named actor asks for an npu: the actor is created there,
its name claimed with E as host, found with get_actor from a driver on another node, and the name
still refuses a second creation; a named actor no node can host fails its creation after the wait
and leaves its name free. A named actor that must wait for capacity claims its name before the
wait: of two such creations one is refused at once (as is a third from another node), get_actor
waits for the pending one, which lands on a node F started only afterwards.
The directory's bookkeeping (when to read keys, bounds, deadlines) is tested on its own.
"""

import asyncio
import collections
import dataclasses
import itertools
import json
import sys
import threading
import time
import types

import pytest
from meshutil import NodeProcess, alive_nodes, start_child, stop_child, wait_for

import latticaray as lattica
from latticaray.mesh.identity import KeyPair
from latticaray.runtime.admission import make_invite
from latticaray.runtime.errors import TaskUnschedulableError
from latticaray.runtime.local.actors import ActorHost
from latticaray.runtime.remote.capacity import DEFERRED, CapacityDirectoryCore, DhtPlacement
from latticaray.runtime.remote.names import NameService
from latticaray.runtime.remote.wire import (
    ClaimRefused,
    NameClaim,
    NameHosted,
    NameHostedReply,
    NameLookup,
    NameLookupReply,
    NamePlaced,
    NameRecord,
    NamesOk,
    decode_names_request,
)
from latticaray.scheduler.advertiser import CapacityAd
from latticaray.scheduler.policy import ClusterSnapshot, NodeView
from latticaray.state.actors import ActorState


@lattica.remote
def whereami():
    return lattica.get_runtime_context().node_id


@lattica.remote
class Accelerated:
    def where(self):
        return lattica.get_runtime_context().node_id


def bound_node(keys, bootstrap: str, *extra: str) -> NodeProcess:
    """A sparse node (no fill) with a credential bound to its own key: it needs no renewal, so
    it meets no node holding the mesh key (D) for one; D meets it only through its work."""
    key_path = keys / f"node-{len(list(keys.iterdir()))}.key"
    peer_id = str(KeyPair.load_or_create(key_path).peer_id)
    credential = make_invite(str(keys / "mesh.key"), peer_id=peer_id)
    return NodeProcess(
        bootstrap,
        credential,
        extra_args=(
            "--peering",
            "sparse",
            "--fill-neighbours",
            "0",
            "--key-path",
            str(key_path),
            *extra,
        ),
    )


@pytest.fixture(scope="module")
def sparse_mesh(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    nodes = []
    try:
        d = NodeProcess(
            None,
            None,
            extra_args=(
                "--peering",
                "sparse",
                "--fill-neighbours",
                "0",
                "--capacity-wait",
                "30",
                "--mesh-key-path",
                str(keys / "mesh.key"),
            ),
        )
        nodes.append(d)
        invite = d.info["invite"]
        a = NodeProcess(
            d.info["addrs"][0], invite, extra_args=("--peering", "full", "--capacity-wait", "3")
        )
        nodes.append(a)
        c = bound_node(keys, a.info["addrs"][0], "--resources", '{"tpu": 2}')
        nodes.append(c)
        e = bound_node(keys, a.info["addrs"][0], "--resources", '{"npu": 1}')
        nodes.append(e)
        yield {"d": d, "a": a, "c": c, "e": e, "keys": keys}
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def attach():
    def attach_to(node: NodeProcess):
        lattica.init(address=node.info["driver_address"])

    yield attach_to
    if lattica.is_initialized():
        lattica.shutdown()


def test_task_lands_on_node_found_only_through_dht_capacity(sparse_mesh, attach):
    d, a, c = sparse_mesh["d"], sparse_mesh["a"], sparse_mesh["c"]
    attach(d)
    wait_for(lambda: a.node_id in alive_nodes(), 30, "D to see A")
    assert c.node_id not in {n["NodeID"] for n in lattica.nodes()}, "D already knows C"
    assert lattica.cluster_resources().get("tpu", 0) == 0
    actor = Accelerated.options(resources={"tpu": 1}).remote()
    calls = [actor.where.remote() for _ in range(3)]  # wait with the actor for its placement
    node = lattica.get(whereami.options(resources={"tpu": 1}).remote(), timeout=60)
    assert node == c.node_id
    assert lattica.get(calls, timeout=60) == [c.node_id] * 3
    # the advertiser is now a peer like any other: its pushed views reach D
    wait_for(lambda: c.node_id in alive_nodes(), 30, "C's view at D")
    assert lattica.cluster_resources().get("tpu") == 2
    # once admitted, C takes tpu work at once (no DHT wait)
    started = time.monotonic()
    assert (
        lattica.get([whereami.options(resources={"tpu": 1}).remote() for _ in range(3)], timeout=60)
        == [c.node_id] * 3
    )  # one tpu left beside the actor's
    assert time.monotonic() - started < 10


def test_unschedulable_request_fails_after_its_wait(sparse_mesh, attach):
    attach(sparse_mesh["a"])  # A waits 3 s for capacity
    started = time.monotonic()
    ref = whereami.options(resources={"quantum": 1}).remote()
    with pytest.raises(lattica.TaskUnschedulableError, match="quantum"):
        lattica.get(ref, timeout=60)
    waited = time.monotonic() - started
    assert 3.0 <= waited < 20, waited
    actor = Accelerated.options(resources={"quantum": 1}).remote()
    with pytest.raises(lattica.ActorDiedError, match=r"cannot be scheduled.*quantum"):
        lattica.get(actor.where.remote(), timeout=60)


def test_named_actor_lands_on_node_found_only_through_dht_capacity(sparse_mesh, attach):
    d, a, e = sparse_mesh["d"], sparse_mesh["a"], sparse_mesh["e"]
    attach(d)
    wait_for(lambda: a.node_id in alive_nodes(), 30, "D to see A")
    assert e.node_id not in {n["NodeID"] for n in lattica.nodes()}, "D already knows E"
    actor = Accelerated.options(
        name="npu-holder", namespace="dht", lifetime="detached", resources={"npu": 1}
    ).remote()
    try:
        assert lattica.get(actor.where.remote(), timeout=60) == e.node_id
        assert lattica.get_actor("npu-holder", namespace="dht")._node == e.node_id
        lattica.shutdown()
        attach(a)  # another driver, on another node
        found = lattica.get_actor("npu-holder", namespace="dht")
        assert lattica.get([found.where.remote() for _ in range(3)], timeout=60) == [e.node_id] * 3
        with pytest.raises(lattica.ActorNameTakenError, match="npu-holder"):
            Accelerated.options(
                name="npu-holder", namespace="dht", lifetime="detached", resources={"npu": 1}
            ).remote()
        again = Accelerated.options(
            name="npu-holder", namespace="dht", get_if_exists=True, resources={"npu": 1}
        ).remote()
        assert lattica.get(again.where.remote(), timeout=60) == e.node_id
    finally:
        lattica.kill(lattica.get_actor("npu-holder", namespace="dht"))


def test_unschedulable_named_actor_fails_after_its_wait_and_frees_its_name(sparse_mesh, attach):
    attach(sparse_mesh["a"])  # A waits 3 s for capacity
    started = time.monotonic()
    with pytest.raises(lattica.TaskUnschedulableError, match="capacity/quantum"):
        Accelerated.options(
            name="quantum-holder", namespace="dht", resources={"quantum": 1}
        ).remote()
    waited = time.monotonic() - started
    assert 3.0 <= waited < 20, waited
    with pytest.raises(ValueError):
        lattica.get_actor("quantum-holder", namespace="dht")
    actor = Accelerated.options(name="quantum-holder", namespace="dht").remote()
    assert lattica.get(actor.where.remote(), timeout=60) == sparse_mesh["a"].node_id


# a driver on another node: "create" tries to create the name (printing how that ended and how
# long it took), "find" looks it up and calls it
OTHER_DRIVER = r"""
import json, sys, time
import latticaray as lattica

@lattica.remote
class Accelerated:
    def where(self):
        return lattica.get_runtime_context().node_id

lattica.init(address=sys.argv[1])
if sys.argv[2] == "create":
    started = time.monotonic()
    try:
        Accelerated.options(name="xpu-holder", namespace="dht", lifetime="detached",
                            resources={"xpu": 1}).remote()
        outcome = "created"
    except Exception as exc:
        outcome = type(exc).__name__ + ": " + str(exc)
    print(json.dumps({"outcome": outcome, "elapsed": time.monotonic() - started}))
else:
    found = lattica.get_actor("xpu-holder", namespace="dht")
    print(json.dumps({"where": lattica.get(found.where.remote(), timeout=60)}))
lattica.shutdown()
"""


def _other_driver(node: NodeProcess, mode: str) -> dict:
    child = start_child([sys.executable, "-c", OTHER_DRIVER, node.info["driver_address"], mode])
    try:
        out, err = child.communicate(timeout=90)
    finally:
        stop_child(child)
    assert child.returncode == 0, err
    return json.loads(out)


def test_named_actor_claims_its_name_before_waiting_for_placement(sparse_mesh, attach):
    d, a = sparse_mesh["d"], sparse_mesh["a"]
    wait = 30.0  # D's --capacity-wait: no xpu node exists until F is started below
    attach(d)
    wait_for(lambda: a.node_id in alive_nodes(), 30, "D to see A")
    outcomes: dict[str, tuple] = {}

    def create(tag):
        started = time.monotonic()
        try:
            handle = Accelerated.options(
                name="xpu-holder", namespace="dht", lifetime="detached", resources={"xpu": 1}
            ).remote()
            outcomes[tag] = (handle, time.monotonic() - started)
        except Exception as exc:
            outcomes[tag] = (exc, time.monotonic() - started)

    def look_up():
        started = time.monotonic()
        outcomes["get_actor"] = (
            lattica.get_actor("xpu-holder", namespace="dht"),
            time.monotonic() - started,
        )

    f = None
    threads = [threading.Thread(target=create, args=(tag,), daemon=True) for tag in "xy"]
    try:
        for thread in threads:
            thread.start()
        # both must wait for xpu capacity: the one whose claim came second is refused at once
        wait_for(lambda: outcomes, wait / 3, "one creation refused well before the wait ends")
        [(loser, (error, elapsed))] = outcomes.items()
        winner = "y" if loser == "x" else "x"
        assert isinstance(error, lattica.ActorNameTakenError), error
        assert "xpu-holder" in str(error) and elapsed < wait / 3, elapsed
        # a creation from a driver on another node (which waits only 3 s for capacity itself)
        # is refused for the name, not failed as unschedulable after its own wait
        result = _other_driver(a, "create")
        assert result["outcome"].startswith("ActorNameTakenError"), result
        assert result["elapsed"] < 3.0, result
        # get_actor on the pending actor waits for its placement
        lookup = threading.Thread(target=look_up, daemon=True)
        lookup.start()
        assert winner not in outcomes and "get_actor" not in outcomes
        f = bound_node(sparse_mesh["keys"], a.info["addrs"][0], "--resources", '{"xpu": 1}')
        for thread in threads + [lookup]:
            thread.join(wait + 15)
        handle, _ = outcomes[winner]
        assert isinstance(handle, lattica.ActorHandle), handle
        assert lattica.get(handle.where.remote(), timeout=60) == f.node_id
        found, _ = outcomes["get_actor"]
        assert found._actor_id == handle._actor_id and found._node == f.node_id
        # a driver on another node finds it through the name
        assert _other_driver(a, "find") == {"where": f.node_id}
    finally:
        if any(isinstance(h, lattica.ActorHandle) for h, _ in outcomes.values()):
            lattica.kill(lattica.get_actor("xpu-holder", namespace="dht"))
        if f is not None:
            f.stop()


def _membership(node_id, peers):
    """What the name service uses of a Membership: ``peers`` by node id (alive or not)."""
    return types.SimpleNamespace(
        node_id=node_id,
        peers=peers,
        alive_peers=lambda: [n for n, p in peers.items() if p.alive],
        is_alive=lambda n: n in peers and peers[n].alive,
    )


def _names(node_id, peers, actors=None):
    """A NameService of node ``node_id`` whose peers are ``peers`` (no mesh)."""
    remote = types.SimpleNamespace(
        node_id=node_id,
        stats=collections.Counter(),
        membership=_membership(node_id, peers),
        node=types.SimpleNamespace(actors=actors),
        state=None,
        spawn=lambda coro: coro.close(),
    )
    return NameService(remote)


def _arbiter(node_id, peers):
    return _names(node_id, peers).arbiter


def test_name_arbiter_keeps_a_detached_claim_whose_host_it_never_met():
    """In a sparse mesh the name's arbiter may not know the node a named actor was placed on
    through the DHT: the claim then lives as long as its owner, which the arbiter does know."""
    peers = {"owner": types.SimpleNamespace(alive=True)}
    arbiter = _arbiter("arbiter", peers)
    claim = NameClaim("dht", "x", b"1", "owner", "unmet-host", None, False, detached=True)
    assert arbiter.handle(claim, "owner") == NamesOk()
    second = arbiter.handle(dataclasses.replace(claim, aid=b"2", owner="other"), "other")
    assert isinstance(second, ClaimRefused) and second.existing.node == "unmet-host"
    peers["unmet-host"] = types.SimpleNamespace(alive=True)
    peers["owner"].alive = False  # once met, the host alone keeps a detached name
    assert arbiter.handle(NameLookup("dht", "x"), "c").existing
    peers["unmet-host"].alive = False
    assert arbiter.handle(NameLookup("dht", "x"), "c") == NameLookupReply(None)


def test_pending_name_claim_refuses_others_until_placed_and_yields_to_an_earlier_claim():
    """A pending claim (no host yet) holds the name at its arbiter, is answered as pending to
    lookups (placed once the CRDT says so, before the arbiter heard), and a creation whose
    pending claim loses a CRDT merge fails with the name error."""
    arbiter = _arbiter("arbiter", {"owner": types.SimpleNamespace(alive=True)})
    claim = NameClaim(
        "dht", "x", b"1", "owner", None, None, False, False, pending=True, wait_s=30.0
    )
    assert arbiter.handle(claim, "owner") == NamesOk()
    second = arbiter.handle(dataclasses.replace(claim, aid=b"2", owner="other"), "other")
    assert isinstance(second, ClaimRefused) and second.existing.node is None
    assert second.existing.pending and second.existing.wait_s == 30.0
    # not the claimant's actor: ignored
    arbiter.handle(NamePlaced("dht", "x", b"2", "host"), "other")
    assert arbiter.records[("dht", "x")].pending
    arbiter.handle(NamePlaced("dht", "x", b"1", "host"), "owner")
    record = arbiter.handle(NameLookup("dht", "x"), "c").existing
    assert record.node == "host" and not record.pending

    async def lookup(crdt_state):
        node = _names("me", {})
        node.arbiter.records = {
            ("dht", "x"): NameRecord(b"\x01", None, "me", None, False, pending=True, wait_s=30.0)
        }
        host = KeyPair.generate().peer_id
        node.remote.state = types.SimpleNamespace(
            actors=types.SimpleNamespace(
                get=lambda key: types.SimpleNamespace(actor_id="01", host=host, state=crdt_state)
            )
        )
        return await node._lookup("dht", "x"), str(host)

    found, _ = asyncio.run(lookup(ActorState.PENDING))
    assert found["pending"] and found["node"] is None and found["wait_s"] == 30.0
    found, host = asyncio.run(lookup(ActorState.ALIVE))
    assert not found["pending"] and found["node"] == host

    node = _names("me", {})
    settled = []
    node.pending = {"dht/x": (b"\x01", settled.append)}
    ours = types.SimpleNamespace(actor_id="01", host="me")
    node.on_claim_lost("dht/x", ours, types.SimpleNamespace(owner="winner"))
    [error] = settled
    assert isinstance(error, lattica.ActorNameTakenError) and "winner" in str(error)


def test_get_if_exists_answers_from_the_cluster_state_when_the_arbiter_did_not():
    holder, host = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    record = types.SimpleNamespace(
        actor_id="aa" * 8, host=host, owner=holder, state=ActorState.ALIVE
    )
    node = _names("me", {})
    node.remote.state = types.SimpleNamespace(
        actors=types.SimpleNamespace(
            claim=lambda *args, **kwargs: types.SimpleNamespace(won=False, record=record)
        )
    )
    message = {
        "aid": b"\x01" * 8,
        "host": str(KeyPair.generate().peer_id),
        "opts": {"get_if_exists": True},
    }
    assert node.claim_in_crdt("dht", "x", message) == {
        "aid": b"\xaa" * 8,
        "node": str(host),
        "meta": None,
        "existing": True,
        "pending": False,
    }
    message["opts"] = {}
    assert "error" in node.claim_in_crdt("dht", "x", message)


# the sans-I/O directory ---------------------------------------------------------------------


def _view(node_id, **total):
    return NodeView(node_id, dict(total), dict(total))


def test_urgent_lookups_rate_limited_and_back_off_when_dht_is_empty():
    core = CapacityDirectoryCore(
        min_gap=1.0, refresh_interval=4.0, idle_backoff_max=32.0, wait_timeout=100.0
    )
    assert core.wait("t1", {"tpu": 1.0, "CPU": 1.0}, "no tpu", now=0.0)
    assert core.due(0.0) == ["tpu"]
    starts = []
    now = 0.0
    while now < 40.0:
        for resource in core.due(now):
            core.lookup_started(resource, now)
            starts.append(now)
            core.lookup_done(resource, [], now)
        wake = core.next_wakeup(now)
        assert wake is not None and wake > now
        now = min(wake, 40.0) if wake < 40.0 else 40.0
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 1 s, doubled per further empty answer, capped at refresh_interval
    assert gaps[:4] == [1.0, 2.0, 4.0, 4.0] and all(g == 4.0 for g in gaps[2:])
    # an answer naming a node resets the gap
    core.lookup_started("tpu", 50.0)
    assert core.lookup_done("tpu", [_view("n1", tpu=1)], 50.0) == [_view("n1", tpu=1)]
    assert not core.lookup_due("tpu", 50.5, urgent=True)
    assert core.lookup_due("tpu", 51.0, urgent=True)


def test_background_refresh_only_for_recent_demand_and_quiet_when_empty():
    core = CapacityDirectoryCore(
        min_gap=1.0, refresh_interval=5.0, idle_backoff_max=40.0, interest_window=100.0
    )
    core.demand("CPU", 0.0)
    starts = []
    now = 0.0
    while True:
        for resource in core.due(now):
            core.lookup_started(resource, now)
            starts.append(now)
            core.lookup_done(resource, [], now)
        wake = core.next_wakeup(now)
        if wake is None:
            break
        now = wake
    # gaps 5, 10, 20, 40 (doubling while empty, at most 40) until the demand is 100 s old
    assert starts == [0.0, 5.0, 15.0, 35.0, 75.0]
    assert core.next_wakeup(200.0) is None


def test_bounds_sample_keys_and_waiting():
    core = CapacityDirectoryCore(max_keys=3, sample_size=4, max_waiting=2, seed=1)
    for i, resource in enumerate(["a", "b", "c", "d"]):
        core.demand(resource, float(i))
    assert list(core.keys) == ["b", "c", "d"]
    core.lookup_started("d", 5.0)
    views = [_view(f"n{i}", d=1) for i in range(10)] + [_view("me", d=1)]
    kept = core.lookup_done("d", views, 5.0, own_node="me")
    assert len(kept) == 4 and all(v.node_id != "me" for v in kept)
    assert core.cached("d", 5.0 + core.ttl) == kept and core.cached("d", 6.0 + core.ttl) == []
    assert core.wait("t1", {"x": 1}, "r", 0.0) and core.wait("t2", {"x": 1}, "r", 0.0)
    assert not core.wait("t3", {"x": 1}, "r", 0.0)


def test_waiting_keeps_its_first_deadline_and_dialing_holds_off():
    core = CapacityDirectoryCore(wait_timeout=10.0, redial_after=20.0)
    assert core.wait("t1", {"tpu": 1}, "no tpu", 0.0)
    assert core.wait("t1", {"tpu": 1}, "still no tpu", 6.0)  # retried: same deadline
    assert core.expired(9.9) == []
    [entry] = core.expired(10.0)
    assert entry.request_id == "t1" and entry.reason == "still no tpu" and core.waiting == {}
    core.hold_off("n1", 0.0)
    assert not core.may_dial("n1", 19.9) and core.may_dial("n1", 20.0)


# the asyncio driver over a fake DHT and cluster ------------------------------------------------


class FakeDht:
    """`capacity/<resource>` answers from CapacityAds; counts the gets."""

    def __init__(self, ads):
        self.ads = ads
        self.gets = collections.Counter()

    async def get(self, key):
        self.gets[key] += 1
        records = {
            ad.node.encode(): types.SimpleNamespace(value=ad.encode(), publisher=ad.node)
            for ad in self.ads
            if key[len(b"capacity/") :].decode() in ad.total
        }
        return records or None

    async def find_peer(self, peer):
        return []


class FakeMembership:
    """What DhtPlacement uses of a Membership; admission succeeds for ``reachable`` nodes."""

    def __init__(self, reachable):
        self.node_id = str(KeyPair.generate().peer_id)
        self.reachable = set(reachable)
        self.peers = {}
        self.snapshot = ClusterSnapshot(local_node=self.node_id)
        self.mesh = types.SimpleNamespace(connection_to=lambda peer: object())
        self.dialled = collections.Counter()
        self.tasks = set()
        self.node = types.SimpleNamespace()

    def spawn(self, coro):
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def admit_with(self, peer):
        self.dialled[str(peer)] += 1
        if str(peer) in self.reachable:
            self.peers[str(peer)] = types.SimpleNamespace(alive=True, view={})

    async def stop(self):
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _ads(count, **total):
    return [
        CapacityAd(str(KeyPair.generate().peer_id), 1, 0.0, dict(total), dict(total))
        for _ in range(count)
    ]


async def _until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def _placement(ads, reachable, **core):
    cluster = FakeMembership(reachable)
    core = CapacityDirectoryCore(
        **{"min_gap": 0.05, "refresh_interval": 0.2, "idle_backoff_max": 0.8, **core}
    )
    return cluster, DhtPlacement(cluster, FakeDht(ads), core)


def test_background_refresh_meets_only_a_few_advertisers():
    async def run():
        ads = _ads(20, CPU=4.0)
        cluster, placement = _placement(ads, {ad.node for ad in ads})
        placement.start()
        placement.note_demand({"CPU": 1.0})
        await _until(lambda: placement.dht.gets[b"capacity/CPU"] >= 3, 5, "three refreshes")
        await _until(lambda: not placement._admitting, 5, "admissions to finish")
        # 8 met (background_peers), the ads stand in for their views until views arrive
        assert len(cluster.peers) == 8 and sum(cluster.dialled.values()) == 8
        assert set(cluster.snapshot.nodes) == set(cluster.peers)
        await cluster.stop()

    asyncio.run(run())


def test_waiting_request_meets_only_fitting_advertisers_and_is_retried():
    async def run():
        small, big = _ads(12, CPU=1.0, tpu=1.0), _ads(3, CPU=1.0, tpu=4.0)
        unreachable = big[0].node
        cluster, placement = _placement(small + big, {ad.node for ad in small + big[1:]})
        placement.start()
        retried = []

        def retry():  # what MeshCluster.place_task does: place, or wait on
            if any(v.total.get("tpu", 0) >= 2 for v in cluster.snapshot.nodes.values()):
                retried.append(True)
            else:
                placement.defer(
                    "t1",
                    {"tpu": 2.0},
                    "no tpu",
                    retry=retry,
                    fail=failed.append,
                    settled=lambda: False,
                )

        failed = []
        assert (
            placement.defer(
                "t1", {"tpu": 2.0}, "no tpu", retry=retry, fail=failed.append, settled=lambda: False
            )
            is DEFERRED
        )
        await _until(lambda: retried, 5, "the request placed again")
        await _until(lambda: not placement._admitting, 5, "admissions to finish")
        assert set(cluster.dialled) == {ad.node for ad in big}  # no 1-tpu node was dialled
        assert set(cluster.peers) == {ad.node for ad in big[1:]}
        assert not failed and not placement.core.waiting
        # the unreachable one is held off: later lookups do not dial it again
        gets = placement.dht.gets[b"capacity/tpu"]
        placement.defer(
            "t2",
            {"tpu": 3.0},
            "no tpu",
            retry=lambda: None,
            fail=failed.append,
            settled=lambda: False,
        )
        await _until(lambda: placement.dht.gets[b"capacity/tpu"] >= gets + 2, 5, "two lookups")
        assert cluster.dialled[unreachable] == 1
        await cluster.stop()

    asyncio.run(run())


def test_request_nothing_can_take_fails_at_its_deadline_with_few_lookups():
    async def run():
        cluster, placement = _placement(_ads(5, CPU=2.0), set(), wait_timeout=0.6)
        placement.start()
        failed = []
        started = time.monotonic()
        placement.defer(
            "t1",
            {"quantum": 1.0},
            "no quantum",
            retry=lambda: None,
            fail=failed.append,
            settled=lambda: False,
        )
        await _until(lambda: failed, 5, "the request to fail")
        waited = time.monotonic() - started
        [error] = failed
        assert isinstance(error, TaskUnschedulableError) and "capacity/quantum" in str(error)
        assert 0.6 <= waited < 2.0
        # 0.6 s at a 0.05 s gap doubling per empty answer up to 0.2 s: a handful, not 12
        assert 2 <= placement.dht.gets[b"capacity/quantum"] <= 6
        assert not cluster.dialled
        await cluster.stop()

    asyncio.run(run())


def test_a_lookup_answered_by_the_crdt_gets_the_method_table_from_the_host():
    """The CRDT claim carries no method table; the actor's host gives it (names/1 `hosted`), so
    the handle get_actor builds knows the actor's methods and their options."""
    meta = {"methods": {"incr": 1, "pair": 2}, "is_async": False, "cname": "Counter"}
    host_peer = KeyPair.generate().peer_id
    actor = types.SimpleNamespace(aid=b"\x01" * 16, state=ActorState.ALIVE, opts={"meta": meta})
    actors = ActorHost(None)
    actors.named, actors.hosted = {("dht", "x"): actor.aid}, {actor.aid: actor}
    host = _names(str(host_peer), {}, actors).arbiter
    assert host.handle(NameHosted("dht", "x", actor.aid), "asker") == NameHostedReply(meta)
    assert host.handle(NameHosted("dht", "x", b"\x02" * 16), "asker") == NameHostedReply(None)
    assert host.handle(NameHosted("dht", "y", actor.aid), "asker") == NameHostedReply(None)

    asker = _names("asker", {str(host_peer): types.SimpleNamespace(alive=True, peer_id=host_peer)})
    asked = []

    async def call(peer_id, protocol, payload, timeout=None):
        request = decode_names_request(payload)
        asked.append((peer_id, protocol, request.OP))
        if not isinstance(request, NameHosted):
            return NameLookupReply(None).encode()  # the arbiter has not heard of the name
        return host.handle(request, "asker").encode()

    asker.remote.mesh = types.SimpleNamespace(call=call)
    asker.arbiter_of = lambda namespace, name: str(host_peer)
    asker.remote.state = types.SimpleNamespace(
        actors=types.SimpleNamespace(
            get=lambda key: types.SimpleNamespace(
                actor_id=actor.aid.hex(), host=host_peer, state=ActorState.ALIVE
            )
        )
    )
    found = asyncio.run(asker.lookup("dht", "x"))
    assert found == {"aid": actor.aid, "node": str(host_peer), "meta": meta}
    assert (host_peer, "/latticaray/names/1", "hosted") in asked
    actor.state = ActorState.DEAD
    assert asyncio.run(asker.lookup("dht", "x"))["meta"] is None
