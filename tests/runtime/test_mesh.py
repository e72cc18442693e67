"""The runtime across node processes of one mesh: a driver node plus node processes on loopback.

Covers remote tasks, refs and large objects across nodes, get by CID from another peer, remote
actors (named, ordered, streaming), kill -9 of a node in the middle of a 2,000-task job, actor
restart after its node dies, and refusal of a non-member's task submission.
"""

import asyncio
import os
import pickle
import time

import msgpack
import pytest
from meshutil import NodeProcess, alive_nodes, driver_with_nodes, wait_for

import latticaray as lattica
from latticaray.mesh.errors import MeshError, RpcError
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.runtime.admission import MeshKey
from latticaray.runtime.remote.wire import ADMIT_PROTOCOL, TASK_PROTOCOL


@pytest.fixture(scope="module")
def mesh():
    with driver_with_nodes(2) as cluster:
        yield cluster


@lattica.remote
def whereami(x):
    return lattica.get_runtime_context().node_id, x


@lattica.remote
def slow_square(x):
    time.sleep(0.004)
    return x * x


@lattica.remote
def total_len(blob):
    return len(blob)


@lattica.remote
def fetch_by_cid(cid):
    return lattica.get(cid)


@lattica.remote
def nested_sum(n):
    return sum(lattica.get([slow_square.remote(i) for i in range(n)]))


def test_tasks_spread_over_three_nodes(mesh):
    results = lattica.get(
        [whereami.options(scheduling_strategy="SPREAD").remote(i) for i in range(60)], timeout=60
    )
    assert [x for _, x in results] == list(range(60))
    assert len({node for node, _ in results}) == 3
    assert lattica.cluster_resources()["CPU"] == 3


def test_node_affinity_and_nested_tasks(mesh):
    target = mesh["nodes"][0].node_id
    strategy = lattica.NodeAffinitySchedulingStrategy(target)
    node, _ = lattica.get(whereami.options(scheduling_strategy=strategy).remote(0), timeout=30)
    assert node == target
    assert lattica.get(
        nested_sum.options(scheduling_strategy=strategy).remote(10), timeout=60
    ) == sum(i * i for i in range(10))


def test_large_ref_argument_fetched_across_nodes(mesh):
    blob = os.urandom(6 << 20)
    ref = lattica.put(blob)
    strategy = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
    assert lattica.get(
        total_len.options(scheduling_strategy=strategy).remote(ref), timeout=60
    ) == len(blob)


def test_get_by_cid_from_another_peer(mesh):
    ref = lattica.put({"payload": list(range(100))})
    cid = ref.cid
    strategy = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][0].node_id)
    assert lattica.get(
        fetch_by_cid.options(scheduling_strategy=strategy).remote(cid), timeout=30
    ) == {"payload": list(range(100))}


def test_remote_result_cid(mesh):
    strategy = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
    ref = slow_square.options(scheduling_strategy=strategy).remote(12)
    assert lattica.get(str(ref), timeout=30) == 144


@lattica.remote
class Account:
    def __init__(self, balance):
        self.balance = balance

    def deposit(self, amount):
        self.balance += amount
        return self.balance

    def node(self):
        return lattica.get_runtime_context().node_id

    def history(self, n):
        for i in range(n):
            yield self.balance + i


@lattica.remote
def deposit_via_name(name, amount):
    return lattica.get(lattica.get_actor(name).deposit.remote(amount))


def test_remote_actor_state_order_and_names(mesh):
    target = mesh["nodes"][0].node_id
    account = Account.options(
        name="acct", scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(target)
    ).remote(0)
    assert lattica.get(account.node.remote(), timeout=30) == target
    refs = [account.deposit.remote(1) for _ in range(100)]
    assert lattica.get(refs, timeout=60) == list(range(1, 101))
    assert [lattica.get(r) for r in account.history.remote(3)] == [100, 101, 102]
    other = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
    assert (
        lattica.get(
            deposit_via_name.options(scheduling_strategy=other).remote("acct", 5), timeout=30
        )
        == 105
    )
    with pytest.raises(lattica.ActorNameTakenError):
        Account.options(name="acct").remote(0)


@lattica.remote
def sleepy(seconds):
    time.sleep(seconds)
    return "woke"


def test_cancel_remote_task(mesh):
    strategy = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][0].node_id)
    ref = sleepy.options(scheduling_strategy=strategy).remote(60)
    time.sleep(0.5)
    lattica.cancel(ref)
    with pytest.raises(lattica.TaskCancelledError):
        lattica.get(ref, timeout=30)
    assert lattica.get(sleepy.options(scheduling_strategy=strategy).remote(0), timeout=30) == "woke"


def test_remote_error_carries_traceback(mesh):
    strategy = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
    with pytest.raises(TypeError) as info:
        lattica.get(slow_square.options(scheduling_strategy=strategy).remote(None), timeout=30)
    assert isinstance(info.value, lattica.TaskError)
    assert "slow_square" in info.value.remote_traceback
    assert info.value.node_id == mesh["nodes"][1].node_id


@lattica.remote
def create_named(name):
    try:
        # detached: the actor outlives this task's handle (it would be reclaimed with it)
        Account.options(name=name, lifetime="detached").remote(0)
        return "created"
    except lattica.ActorNameTakenError:
        return "taken"


def test_conflicting_names_one_wins_and_is_in_cluster_state(mesh):
    from latticaray.runtime import api

    racers = [
        create_named.options(
            scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(node.node_id)
        ).remote("race")
        for node in mesh["nodes"]
    ]
    assert sorted(lattica.get(racers, timeout=60)) == ["created", "taken"]
    winner = lattica.get_actor("race")
    assert lattica.get(winner.deposit.remote(7), timeout=30) == 7
    state = api._runtime.mesh_runtime.state
    wait_for(
        lambda: state.actors.get("default/race") is not None,
        30,
        "the name's claim to reach the driver's CRDT replica",
    )
    lattica.kill(winner)


@lattica.remote
def produce(n):
    for i in range(n):
        yield i * 10


def test_remote_streaming_generator(mesh):
    strategy = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
    gen = produce.options(scheduling_strategy=strategy).remote(50)
    assert [lattica.get(r) for r in gen] == [i * 10 for i in range(50)]


@lattica.remote
def drain(gen):
    return lattica.get_runtime_context().node_id, [lattica.get(r) for r in gen]


def test_generator_passed_to_another_node_is_iterated_there(mesh):
    """The consumer's node asks the stream's owner (the driver's node) for each item."""
    consumer = mesh["nodes"][0].node_id
    gen = produce.options(
        scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
    ).remote(20)
    where, items = lattica.get(
        drain.options(scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(consumer)).remote(
            gen
        ),
        timeout=60,
    )
    assert where == consumer and items == [i * 10 for i in range(20)]


@lattica.remote
def mark_then_sleep(path, seconds):
    open(path, "w").close()
    time.sleep(seconds)
    return "woke"


def test_kill9_node_during_2000_task_job(mesh, tmp_path):
    victim = NodeProcess(mesh["addr"], mesh["invite"])
    try:
        wait_for(lambda: victim.node_id in alive_nodes(), 30, "the extra node to join")
        started = tmp_path / "started"
        pinned = lattica.NodeAffinitySchedulingStrategy(victim.node_id)
        no_retry = mark_then_sleep.options(max_retries=0, scheduling_strategy=pinned).remote(
            str(started), 120
        )
        wait_for(started.exists, 30, "the task without retries to start on the victim")
        refs = [slow_square.options(scheduling_strategy="SPREAD").remote(i) for i in range(2000)]
        _ready, _ = lattica.wait(refs, num_returns=200, timeout=120)
        victim.kill9()
        results = lattica.get(refs, timeout=180)
        assert results == [i * i for i in range(2000)]
        with pytest.raises(lattica.NodeDiedError):
            lattica.get(no_retry, timeout=60)
        wait_for(lambda: victim.node_id not in alive_nodes(), 30, "the victim to be seen dead")
    finally:
        victim.stop()


def test_actor_restarts_after_its_node_dies(mesh):
    victim = NodeProcess(mesh["addr"], mesh["invite"])
    try:
        wait_for(lambda: victim.node_id in alive_nodes(), 30, "the extra node to join")
        strategy = lattica.NodeAffinitySchedulingStrategy(victim.node_id, soft=True)
        account = Account.options(
            max_restarts=1, max_task_retries=1, scheduling_strategy=strategy
        ).remote(1000)
        assert lattica.get(account.node.remote(), timeout=30) == victim.node_id
        assert lattica.get(account.deposit.remote(1), timeout=30) == 1001
        victim.kill9()
        new_node = lattica.get(account.node.remote(), timeout=60)
        assert new_node != victim.node_id
        assert lattica.get(account.deposit.remote(1), timeout=30) == 1001  # state rebuilt
        never = Account.options(
            scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
        ).remote(0)
        assert lattica.get(never.deposit.remote(1), timeout=30) == 1
    finally:
        victim.stop()


class _CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_non_member_submission_refused_and_never_deserialized(mesh, tmp_path):
    marker = tmp_path / "unpickled"
    poison = pickle.dumps(_CreatesFileWhenUnpickled(str(marker)))
    forged = MeshKey.generate().issue()
    task = {
        "k": "task",
        "m": {
            "tid": os.urandom(16),
            "fn": b"f" * 16,
            "blob": poison,
            "name": "evil",
            "nret": 1,
            "args": ["b", poison],
            "opts": {},
        },
    }

    async def attempt():
        stranger = MeshNode(MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"]))
        await stranger.start()
        outcomes = {}
        try:
            peer = await stranger.connect(mesh["addr"], timeout=10)
            try:
                await stranger.call(
                    peer, ADMIT_PROTOCOL, msgpack.packb({"cred": forged}), timeout=10
                )
                outcomes["admit"] = "accepted"
            except RpcError as exc:
                outcomes["admit"] = exc.code
            call = await stranger.open_bidi(peer, TASK_PROTOCOL, timeout=10)
            try:
                await call.send(msgpack.packb(task, use_bin_type=True))
                async for _reply in call:
                    outcomes["task"] = "answered"
                    break
                else:
                    outcomes["task"] = "closed"
            except RpcError as exc:
                outcomes["task"] = exc.code
            except MeshError as exc:
                outcomes["task"] = type(exc).__name__
        finally:
            await stranger.stop()
        return outcomes

    outcomes = asyncio.run(attempt())
    assert outcomes["admit"] == "PERMISSION_DENIED"
    assert outcomes["task"] == "PERMISSION_DENIED"
    time.sleep(0.5)
    assert not marker.exists()


@lattica.remote
def big_array(n):
    import numpy as np

    return np.arange(n, dtype=np.float64)


def test_large_result_from_remote_node_lands_in_local_store(mesh):
    strategy = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
    ref = big_array.options(scheduling_strategy=strategy).remote(1 << 20)
    array = lattica.get(ref, timeout=60)
    assert array[-1] == (1 << 20) - 1
    assert array.flags.writeable is False  # a view of this node's shared-memory store
    pid = mesh["nodes"][1].proc.pid
    pattern = f"/dev/shm/latticaray-{os.getuid()}/store-{pid}-*/objects/{ref.cid}"
    import glob

    wait_for(lambda: not glob.glob(pattern), 30, "the executor to drop its copy of the result")


JOINING_DRIVER = """
import sys, time
import latticaray as lattica
try:
    lattica.init(bootstrap=[sys.argv[1]], credential="lrc1.junk.junk")
except lattica.CredentialError as exc:
    print("refused:", exc)
lattica.init(bootstrap=[sys.argv[1]], credential=sys.argv[2], num_cpus=1,
             listen=["/ip4/127.0.0.1/udp/0/quic-v1"])
deadline = time.monotonic() + 30
while len([n for n in lattica.nodes() if n["Alive"] and n["Resources"]]) < 4:
    assert time.monotonic() < deadline, lattica.nodes()
    time.sleep(0.05)

@lattica.remote
def where(i):
    return lattica.get_runtime_context().node_id

nodes = set(lattica.get([where.options(scheduling_strategy="SPREAD").remote(i)
                         for i in range(40)], timeout=60))
print("nodes used:", len(nodes))
lattica.shutdown()
"""


def test_driver_joins_with_init_bootstrap_and_credential(mesh):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", JOINING_DRIVER, mesh["addr"], mesh["invite"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: credential is not decodable" in proc.stdout
    used = int(proc.stdout.split("nodes used:")[1].split()[0])
    assert used >= 3


@lattica.remote
class RemoteHolder:
    def __init__(self, blob):
        self.blob = blob

    def where_and_size(self):
        return lattica.get_runtime_context().node_id, len(self.blob)


def test_remote_actor_constructor_takes_a_ref(mesh):
    node = mesh["nodes"][0].node_id
    blob = lattica.put(b"z" * (3 << 20))
    holder = RemoteHolder.options(
        scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(node)
    ).remote(blob)
    assert lattica.get(holder.where_and_size.remote(), timeout=60) == (node, 3 << 20)


@lattica.remote
def named_account_from_here(name):
    handle = lattica.get_actor(name)
    return lattica.get(handle.node.remote(), timeout=30), lattica.get(
        handle.deposit.remote(5), timeout=30
    )


def test_named_actor_restarted_after_its_node_died_is_found_at_its_new_node(mesh):
    """After the restart, a lookup of the name from another node finds the new host (the
    name's arbiter record and CRDT claim moved with it) and calls reach the rebuilt actor."""
    victim = NodeProcess(mesh["addr"], mesh["invite"])
    try:
        wait_for(lambda: victim.node_id in alive_nodes(), 30, "the extra node to join")
        strategy = lattica.NodeAffinitySchedulingStrategy(victim.node_id, soft=True)
        account = Account.options(
            name="moving-account", max_restarts=1, max_task_retries=1, scheduling_strategy=strategy
        ).remote(1000)
        assert lattica.get(account.node.remote(), timeout=30) == victim.node_id
        assert lattica.get(account.deposit.remote(1), timeout=30) == 1001
        victim.kill9()
        new_node = lattica.get(account.node.remote(), timeout=60)
        assert new_node != victim.node_id
        elsewhere = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
        # the new host reaches other nodes' views by an RPC to the name's arbiter and by CRDT
        # gossip, both already under way: allow a few lookups while they land, bounded
        deadline, failures = time.monotonic() + 30, []
        while True:
            try:
                found = lattica.get(
                    named_account_from_here.options(scheduling_strategy=elsewhere).remote(
                        "moving-account"
                    ),
                    timeout=60,
                )
                break
            except lattica.ActorDiedError as exc:
                failures.append(str(exc))
                assert time.monotonic() < deadline and len(failures) < 20, failures
                time.sleep(0.2)
        assert tuple(found) == (new_node, 1005), (found, failures)
        lattica.kill(account)
    finally:
        victim.stop()


def test_objects_between_nodes_on_this_host_are_copied_store_to_store(mesh):
    # the node processes and this driver's node share /dev/shm: a store object moves as one
    # copy between the stores (every block checked), not as blocks over a socket
    from latticaray.runtime import api

    remote = api._runtime.mesh_runtime.remote
    copies = remote.objects.same_host
    before = copies.copied
    strategy = lattica.NodeAffinitySchedulingStrategy(mesh["nodes"][1].node_id)
    array = lattica.get(big_array.options(scheduling_strategy=strategy).remote(3 << 20), timeout=60)
    assert array[-1] == (3 << 20) - 1 and array.sum() == sum(range(3 << 20))
    assert copies.copied == before + 1 and copies.copied_bytes >= 3 << 23
    assert copies.linked >= 1  # one store, one filesystem: the sealed file is shared
    # the place of an object is told only to peers on the same-host path
    held = lattica.put(os.urandom(2 << 20))
    store_cid = held.cid
    assert copies.place("unix", store_cid).to_wire() == {"root": remote.node.store.root}
    assert "missing" in copies.place("quic", store_cid).to_wire()
    assert "missing" in copies.place("unix", "bafyr4i" + "a" * 52).to_wire()


def test_a_quic_bootstrap_address_needs_a_quic_listen_address(mesh):
    # a node listening on TCP only cannot dial QUIC (it dials from its listening UDP socket):
    # it says so at start instead of dying in the join with a traceback
    import subprocess
    import sys

    from latticaray.mesh.identity import KeyPair
    from latticaray.runtime.mesh_runtime import MeshRuntime

    quic = f"/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{KeyPair.generate().peer_id}"
    with pytest.raises(ValueError, match="listens on no QUIC address"):
        MeshRuntime(KeyPair.generate(), [quic], None, ["/ip4/127.0.0.1/tcp/0"])
    MeshRuntime(KeyPair.generate(), [quic], None, ["/ip4/127.0.0.1/udp/0/quic-v1"])  # fine
    args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", quic, "--credential", mesh["invite"]]
    proc = subprocess.run(
        [sys.executable, "-m", "latticaray.runtime.node_main", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "listens on no QUIC address" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
