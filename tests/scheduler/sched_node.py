"""A scheduler node process for the multi-process tests (not a test module).

    python tests/scheduler/sched_node.py --resources '{"CPU": 2}' [--labels '{}'] \
        [--bootstrap /ip4/127.0.0.1/udp/P/quic-v1/p2p/ID] [--draining]

Starts a MeshNode on loopback QUIC, a DhtService, a SchedulerCore driven by a SchedulerDriver
(``/latticaray/sched/1``) and a CapacityAdvertiser writing ``capacity/<res>`` records. A task
started here "runs" by sleeping ``meta.sleep`` seconds. Prints one JSON line (peer id, addresses) when ready;
exits on SIGTERM or when stdin closes (so a dying test never leaves it behind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import msgpack

from latticaray.mesh.dht import DhtConfig, DhtService
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.scheduler.advertiser import AdvertiserCore, CapacityAdvertiser
from latticaray.scheduler.core import SchedulerCore, StartLocal
from latticaray.scheduler.driver import SchedulerDriver
from latticaray.scheduler.resources import ResourceLedger


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resources", required=True)
    parser.add_argument("--labels", default="{}")
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--draining", action="store_true")
    args = parser.parse_args()

    node = await MeshNode(
        MeshConfig(listen=["/ip4/127.0.0.1/udp/0/quic-v1"], transports=("quic",))
    ).start()
    dht = DhtService(node, DhtConfig(k=4, request_timeout=5.0))
    await asyncio.wait_for(dht.bootstrap([args.bootstrap] if args.bootstrap else None), 30)
    core = SchedulerCore(
        str(node.peer_id),
        ResourceLedger(json.loads(args.resources)),
        labels=json.loads(args.labels),
    )
    local = core.local
    local.accepting = not args.draining
    advertiser = CapacityAdvertiser(
        local,
        str(node.peer_id),
        node.peer_id.to_bytes(),
        dht,
        core=AdvertiserCore(str(node.peer_id), ttl=20.0, refresh_interval=2.0, min_interval=0.1),
    )
    if args.draining:
        # Model a stale ad: it advertised free capacity before it started draining.
        local.accepting = True
        await advertiser.publish_once()
        local.accepting = False
    driver: SchedulerDriver
    running: set[asyncio.Task] = set()

    async def run_task(task_key: str, meta: bytes) -> None:
        sleep = float(msgpack.unpackb(meta).get("sleep", 0.0)) if meta else 0.0
        await asyncio.sleep(min(sleep, 30.0))
        driver.finish(task_key)
        advertiser.notify_change()

    def on_action(action) -> None:
        if isinstance(action, StartLocal):
            key = action.request.task_id
            task = asyncio.ensure_future(run_task(key, driver.meta_of(key)))
            running.add(task)
            task.add_done_callback(running.discard)
            advertiser.notify_change()

    driver = SchedulerDriver(node, core, dht=dht, on_action=on_action)
    driver.start()
    if not args.draining:
        advertiser.start()
    print(
        json.dumps({"peer_id": str(node.peer_id), "addrs": [str(a) for a in node.listen_addrs]}),
        flush=True,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(
        sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(1) else None
    )
    await stop.wait()
    await advertiser.stop()
    await driver.stop()
    await dht.close()
    await node.stop()


if __name__ == "__main__":
    asyncio.run(main())
