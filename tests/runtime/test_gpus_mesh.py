"""GPUs end to end: a `latticaray start` node's GPUs (declared with --num-gpus, or found in its
CUDA_VISIBLE_DEVICES) are handed to tasks and actors one device id each, set as their worker's
CUDA_VISIBLE_DEVICES and returned by `latticaray.get_gpu_ids()`. No GPU hardware is needed."""

from __future__ import annotations

import os

import pytest

import latticaray as lattica
from tests.runtime.meshutil import wait_for
from tests.runtime.test_placement_groups_mesh import LOOPBACK, StartedNode

pytestmark = pytest.mark.timeout(180)


@lattica.remote(num_gpus=1, num_cpus=0)
def one_gpu():
    return os.environ.get("CUDA_VISIBLE_DEVICES"), lattica.get_gpu_ids()


@lattica.remote(num_cpus=0)
def no_gpu():
    return os.environ.get("CUDA_VISIBLE_DEVICES"), lattica.get_gpu_ids()


@lattica.remote(num_gpus=1, num_cpus=0)
class GpuHolder:
    def ids(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES"), lattica.get_gpu_ids()


@pytest.fixture(scope="module")
def gpu_nodes():
    declared = StartedNode("--num-cpus", "2", "--num-gpus", "2")
    nodes = [declared]
    try:
        invite = declared.info["invite"]
        env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"  # the second node's devices, by its env
        try:
            nodes.append(
                StartedNode("--num-cpus", "1", "--bootstrap", declared.addr, "--credential", invite)
            )
        finally:
            if env_before is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = env_before
        lattica.init(
            bootstrap=[declared.addr], credential=invite, num_cpus=0, num_gpus=0, listen=[LOOPBACK]
        )
        wait_for(
            lambda: (
                sum(n.get("Resources", {}).get("GPU", 0) for n in lattica.nodes() if n["Alive"])
                >= 4
            ),
            60,
            "both nodes' GPUs",
        )
        yield nodes
    finally:
        lattica.shutdown()
        for node in nodes:
            node.stop()


def test_each_gpu_actor_sees_exactly_its_own_device(gpu_nodes):
    declared, by_env = gpu_nodes
    on = lattica.NodeAffinitySchedulingStrategy
    holders = [GpuHolder.options(scheduling_strategy=on(declared.node_id)).remote() for _ in "ab"]
    seen = lattica.get([h.ids.remote() for h in holders], timeout=60)
    assert sorted(seen) == [("0", ["0"]), ("1", ["1"])]
    # the node's two GPUs are held: a third GPU actor there is refused (actors do not queue)
    third = GpuHolder.options(scheduling_strategy=on(declared.node_id)).remote()
    with pytest.raises(lattica.LatticaError, match="not enough resources"):
        lattica.get(third.ids.remote(), timeout=60)
    lattica.kill(holders[0])

    def gpus_free() -> float:
        return next(
            n["Available"].get("GPU", 0) for n in lattica.nodes() if n["NodeID"] == declared.node_id
        )

    wait_for(lambda: gpus_free() >= 1, 30, "the killed actor's GPU back")
    third = GpuHolder.options(scheduling_strategy=on(declared.node_id)).remote()
    assert lattica.get(third.ids.remote(), timeout=60) == seen[0]  # the device it gave back
    for actor in (holders[1], third):
        lattica.kill(actor)
    # the node whose CUDA_VISIBLE_DEVICES was 3,5 hands out those ids
    ids = lattica.get(
        [one_gpu.options(scheduling_strategy=on(by_env.node_id)).remote() for _ in range(4)],
        timeout=60,
    )
    assert {i[0] for i in ids} <= {"3", "5"} and all(i[1] == [i[0]] for i in ids)


def test_fractional_gpus_share_a_device_and_cpu_tasks_see_none(gpu_nodes):
    declared, _ = gpu_nodes
    on = lattica.NodeAffinitySchedulingStrategy(declared.node_id)
    halves = [GpuHolder.options(num_gpus=0.5, scheduling_strategy=on).remote() for _ in range(2)]
    seen = lattica.get([h.ids.remote() for h in halves], timeout=60)
    assert seen[0] == seen[1] and len(seen[0][1]) == 1  # both halves on one device
    assert lattica.get(no_gpu.options(scheduling_strategy=on).remote(), timeout=60) == ("", [])
    for actor in halves:
        lattica.kill(actor)
    with pytest.raises(ValueError, match="whole numbers"):
        one_gpu.options(num_gpus=1.5).remote()
