"""Actor lifetimes: an actor ends with the driver that created it unless it is detached.

A driver (the mesh's first node) creates named actors on node processes, shuts down, and a new
driver joins through one of the remaining nodes: the detached actor is still running with its
state and is found by name; the others' worker processes are gone. The same for a driver
attached to a node process over its Unix socket. `kill` ends a detached actor.
"""

import os

import pytest
from meshutil import NodeProcess, alive_nodes, wait_for

import latticaray as lattica


@lattica.remote
class Counter:
    def __init__(self):
        self.n = 0

    def add(self, k):
        self.n += k
        return self.n

    def pid(self):
        return os.getpid()

    def node(self):
        return lattica.get_runtime_context().get_node_id()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def find_actor(name: str):
    found = []

    def lookup():
        try:
            found.append(lattica.get_actor(name))
            return True
        except ValueError:
            return False

    wait_for(lookup, 30, f"actor {name!r} to be found by name")
    return found[0]


def name_is_gone(name: str) -> bool:
    try:
        actor = lattica.get_actor(name)
    except ValueError:
        return True
    try:
        lattica.get(actor.pid.remote(), timeout=10)
    except lattica.ActorDiedError:
        return True
    return False


def test_detached_actor_outlives_its_driver_and_others_die_with_it():
    lattica.init(_mesh=True, num_cpus=1, listen=["/ip4/127.0.0.1/udp/0/quic-v1"])
    nodes = []
    try:
        invite = lattica.invite()
        addr = lattica.mesh_info()["address"][0]
        nodes = [NodeProcess(addr, invite) for _ in range(2)]
        wait_for(lambda: len(alive_nodes()) >= 3, 30, "3 alive nodes")
        first, second = (n.node_id for n in nodes)
        keeper = Counter.options(
            name="keeper",
            lifetime="detached",
            scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(first),
        ).remote()
        plain = Counter.options(
            name="plain", scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(first)
        ).remote()
        anonymous = Counter.options(
            scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(second)
        ).remote()
        assert lattica.get(keeper.add.remote(5), timeout=60) == 5
        keeper_pid = lattica.get(keeper.pid.remote(), timeout=30)
        plain_pid = lattica.get(plain.pid.remote(), timeout=60)
        anonymous_pid = lattica.get(anonymous.pid.remote(), timeout=60)
        del keeper, plain, anonymous
        lattica.shutdown()

        wait_for(
            lambda: not process_alive(plain_pid) and not process_alive(anonymous_pid),
            30,
            "the creator's non-detached actors to be killed",
        )
        assert process_alive(keeper_pid)

        lattica.init(bootstrap=[nodes[1].info["addrs"][0]], credential=invite, num_cpus=1)
        wait_for(lambda: len(alive_nodes()) >= 3, 30, "the new driver to see both nodes")
        keeper = find_actor("keeper")
        assert lattica.get(keeper.add.remote(1), timeout=30) == 6
        assert lattica.get(keeper.pid.remote(), timeout=30) == keeper_pid
        wait_for(lambda: name_is_gone("plain"), 30, "the non-detached actor's name to go")
        lattica.kill(keeper)
        wait_for(lambda: not process_alive(keeper_pid), 30, "kill() to end the detached actor")
        wait_for(lambda: name_is_gone("keeper"), 30, "the killed actor's name to go")
    finally:
        for node in nodes:
            node.stop()
        lattica.shutdown()


def test_attached_driver_disconnect_ends_its_non_detached_actors():
    node = NodeProcess(None, None)
    try:
        lattica.init(address=node.info["driver_address"])
        kept = Counter.options(name="kept", lifetime="detached").remote()
        temp = Counter.options(name="temp").remote()
        assert lattica.get(kept.add.remote(2), timeout=60) == 2
        kept_pid = lattica.get(kept.pid.remote(), timeout=30)
        temp_pid = lattica.get(temp.pid.remote(), timeout=60)
        del kept, temp
        lattica.shutdown()
        wait_for(lambda: not process_alive(temp_pid), 30, "the non-detached actor to be killed")
        assert process_alive(kept_pid)

        lattica.init(address=node.info["driver_address"])
        kept = find_actor("kept")
        assert lattica.get(kept.add.remote(3), timeout=30) == 5
        with pytest.raises(ValueError):
            lattica.get_actor("temp")
        lattica.kill(kept)
        wait_for(lambda: not process_alive(kept_pid), 30, "kill() to end the detached actor")
    finally:
        lattica.shutdown()
        node.stop()


def test_detached_actor_without_a_strategy_leaves_the_drivers_embedded_node():
    """A driver's embedded node ends with the driver: a detached actor created without a
    strategy goes to another node that can host it (a plain one stays on the driver's node),
    so it outlives the driver and is found by a later driver."""
    lattica.init(_mesh=True, num_cpus=1, listen=["/ip4/127.0.0.1/udp/0/quic-v1"])
    node = None
    try:
        driver_node = lattica.get_runtime_context().get_node_id()
        invite = lattica.invite()
        node = NodeProcess(lattica.mesh_info()["address"][0], invite)
        wait_for(lambda: len(alive_nodes()) >= 2, 30, "2 alive nodes")
        kept = Counter.options(name="roamer", lifetime="detached").remote()
        plain = Counter.remote()
        assert lattica.get(kept.node.remote(), timeout=60) == node.node_id
        assert lattica.get(plain.node.remote(), timeout=60) == driver_node
        assert lattica.get(kept.add.remote(4), timeout=30) == 4
        kept_pid = lattica.get(kept.pid.remote(), timeout=30)
        del kept, plain
        lattica.shutdown()
        assert process_alive(kept_pid)

        lattica.init(bootstrap=[node.info["addrs"][0]], credential=invite, num_cpus=1)
        kept = find_actor("roamer")
        assert lattica.get(kept.add.remote(1), timeout=30) == 5
        lattica.kill(kept)
        wait_for(lambda: not process_alive(kept_pid), 30, "kill() to end the detached actor")
    finally:
        lattica.shutdown()
        if node is not None:
            node.stop()


def test_attached_driver_dropping_its_handle_reclaims_the_actor():
    """The node process owns the actors its attached driver creates and counts their handles:
    one whose handles the driver dropped ends while the driver stays connected."""
    node = NodeProcess(None, None)
    try:
        lattica.init(address=node.info["driver_address"])
        temp = Counter.remote()
        kept = Counter.remote()
        temp_pid = lattica.get(temp.pid.remote(), timeout=60)
        kept_pid = lattica.get(kept.pid.remote(), timeout=60)
        del temp
        wait_for(lambda: not process_alive(temp_pid), 30, "the dropped actor to be reclaimed")
        assert lattica.get(kept.add.remote(1), timeout=30) == 1
        assert process_alive(kept_pid)
        del kept
        wait_for(lambda: not process_alive(kept_pid), 30, "the second one to be reclaimed")
    finally:
        lattica.shutdown()
        node.stop()
