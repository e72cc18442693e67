"""Scheduler across real node processes on loopback QUIC: DHT capacity ads, placement, spillback.

Three scheduler node processes (tests/scheduler/sched_node.py) advertise their capacity in the DHT;
a driver node in the test process (no resources of its own) places tasks with its
SchedulerCore and SchedulerDriver, learning the nodes from the DHT's capacity ads:
* tasks needing a custom resource land only on the node that has it;
* CPU tasks spread across the nodes;
* a node whose (stale) ad says it is free but which rejects causes spillback, not failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter

import msgpack
import pytest

from latticaray.mesh.dht import DhtConfig, DhtService
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.scheduler.advertiser import capacity_key
from latticaray.scheduler.core import SchedulerConfig, SchedulerCore
from latticaray.scheduler.driver import SchedulerDriver
from latticaray.scheduler.errors import UnschedulableError
from latticaray.scheduler.local import AdmissionKind
from latticaray.scheduler.policy import PlacementRequest
from latticaray.scheduler.resources import ResourceLedger

NODE_SCRIPT = os.path.join(os.path.dirname(__file__), "sched_node.py")


class SchedNode:
    def __init__(
        self, resources: dict, bootstrap: str | None = None, draining: bool = False
    ) -> None:
        args = [sys.executable, NODE_SCRIPT, "--resources", json.dumps(resources)]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        if draining:
            args.append("--draining")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info: dict | None = None

    async def ready(self, timeout: float = 60.0) -> SchedNode:
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line:
            raise RuntimeError("scheduler node process exited before it was ready")
        self.info = json.loads(line)
        return self

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def addr(self) -> str:
        return self.info["addrs"][0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe:
                pipe.close()


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
async def mesh():
    procs: list[SchedNode] = []
    driver = dht = client = None
    try:
        first = SchedNode({"CPU": 2})
        procs.append(first)
        await first.ready()
        procs.append(SchedNode({"CPU": 2, "special": 2}, bootstrap=first.addr))
        procs.append(SchedNode({"CPU": 8}, bootstrap=first.addr, draining=True))
        for p in procs[1:]:
            await p.ready()
        driver = await MeshNode(
            MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"], transports=("quic",))
        ).start()
        dht = DhtService(driver, DhtConfig(k=4, request_timeout=5.0))
        await asyncio.wait_for(dht.bootstrap([first.addr]), 30)
        for p in procs:
            await driver.connect(p.addr, timeout=10)

        async def all_advertised() -> bool:
            got = await dht.get(capacity_key("CPU"))
            return isinstance(got, dict) and len(got) == 3

        await wait_until(all_advertised, 30, "three capacity/CPU ads in the DHT")
        core = SchedulerCore(
            str(driver.peer_id),
            ResourceLedger({}),
            config=SchedulerConfig(capacity_wait=2.0, retry_interval=0.2, directory_ttl=0.3),
            seed=7,
        )
        client = SchedulerDriver(driver, core, dht=dht)
        client.start()
        yield procs, client
    finally:
        if client is not None:
            await client.stop()
        if dht is not None:
            await dht.close()
        if driver is not None:
            await driver.stop()
        for p in procs:
            p.stop()


def task(i: int, resources: dict, sleep: float) -> tuple[PlacementRequest, bytes]:
    return PlacementRequest(f"t{i}", resources, "driver"), msgpack.packb({"sleep": sleep})


async def test_custom_resource_spread_and_spillback_across_processes(mesh):
    procs, client = mesh
    plain, special, draining = procs

    # Tasks needing the custom resource land only on the node that has it.
    results = await asyncio.gather(
        *(client.place(*task(i, {"CPU": 0.1, "special": 1}, 0.2), timeout=60) for i in range(6))
    )
    assert {r.node_id for r in results} == {special.peer_id}

    # CPU tasks spread over the nodes that accept work; the draining node's stale ad draws offers
    # that it rejects, and those tasks spill over instead of failing.
    results = await asyncio.gather(
        *(client.place(*task(100 + i, {"CPU": 1}, 1.0), timeout=60) for i in range(12))
    )
    per_node = Counter(r.node_id for r in results)
    assert draining.peer_id not in per_node
    assert per_node[plain.peer_id] >= 3 and per_node[special.peer_id] >= 3
    assert all(r.admission.kind in (AdmissionKind.STARTED, AdmissionKind.QUEUED) for r in results)
    assert client.core.submitter.rejections >= 1
    assert any(r.attempts > 1 for r in results)

    # No node can ever run this: UnschedulableError naming what is missing.
    with pytest.raises(UnschedulableError, match="TPU"):
        await client.place(*task(999, {"TPU": 1}, 0.0), timeout=30)
