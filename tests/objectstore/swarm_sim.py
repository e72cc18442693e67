"""A swarm in the discrete-event simulator: one seed and N fetchers, each running a FetchSession,
every node serving with ``plan_response`` through an uplink of limited rate.

Uplinks: ``sharing="fifo"`` sends one block at a time, first come first served; ``"fair"``
sends up to ``slots`` blocks at once (the exchange's upload slots, 8), sharing the rate equally, as
TCP connections share a bottleneck; further blocks wait for a slot in arrival order. Cancelled
requests leave the queue. Presences are small and go out at once. A fetcher serves what its sink
holds (have-bitmaps) once it has the manifest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from latticaray.mesh.sim import Simulator
from latticaray.objectstore import bitswap as bs
from latticaray.objectstore.errors import BlockVerificationError


class MemorySink:
    def __init__(self, manifest):
        self.manifest = manifest
        self.flags = bytearray(len(manifest.blocks))
        self.written = 0

    def has_block(self, index):
        return bool(self.flags[index])

    def write_block(self, index, data):
        if self.flags[index]:
            return False
        if not self.manifest.blocks[index].verify(data):
            raise BlockVerificationError(self.manifest.blocks[index])
        self.flags[index] = 1
        self.written += 1
        return True


@dataclass
class SimNode:
    name: str
    rate: float  # uplink bytes/s
    manifest: object = None  # known manifest (seed: from the start)
    sink: MemorySink | None = None  # None on the seed: it holds everything
    session: bs.FetchSession | None = None
    queue: deque = field(default_factory=deque)
    busy: bool = False
    active: list = field(default_factory=list)  # fair sharing: [remaining bytes, entry, data]
    clock: float = 0.0  # fair sharing: when ``active`` was last advanced
    wakeup: object = None
    uploaded: int = 0
    done_at: float | None = None
    timer: object = None


class Swarm:
    def __init__(
        self,
        payload: bytes,
        manifest,
        fetchers: int,
        rate: float,
        latency: float = 0.002,
        config: bs.SessionConfig | None = None,
        seed_rate: float | None = None,
        fetcher_rates: list[float] | None = None,
        sim_seed: int = 1,
        timeout: float = 600.0,
        sharing: str = "fifo",
        slots: int = 8,
    ):
        self.sharing, self.slots = sharing, slots
        self.sim = Simulator(seed=sim_seed)
        self.payload, self.manifest, self.latency = payload, manifest, latency
        self.seed = SimNode("seed", seed_rate or rate, manifest=manifest)
        rates = fetcher_rates or [rate] * fetchers
        self.fetchers = [SimNode(f"f{i}", rates[i]) for i in range(fetchers)]
        self.nodes = {n.name: n for n in [self.seed] + self.fetchers}
        self.cancelled: set[tuple[str, int]] = set()
        base = config or bs.SessionConfig()
        for i, node in enumerate(self.fetchers):
            cfg = bs.SessionConfig(**{**base.__dict__, "order_seed": 1000 + i})
            node.session = bs.FetchSession(manifest.root, timeout, cfg)
        self.timeout = timeout

    # --- serving -------------------------------------------------------------------------------
    def _block(self, index):
        if index == -1:
            return self.manifest.encoded
        start, end = self.manifest.block_range(index)
        return self.payload[start:end]

    def _serve(self, client: SimNode, server: SimNode, action: bs.SendRequest) -> None:
        rid = action.request_id
        request = bs.decode_request(bs.encode_request(action.request))
        flags = None if server.sink is None else bytes(server.sink.flags)
        pending = (
            None
            if server.session is None or server.sink is None
            else server.session.pending_flags()
        )
        plan = bs.plan_response(request, server.manifest, flags, pending)
        key = (client.name, rid)
        if plan.presences:
            response = bs.decode_response(bs.encode_response(bs.Response(presences=plan.presences)))
            self.sim.call_later(self.latency, self._deliver, client, server, rid, response)
        if not plan.blocks:
            self.sim.call_later(self.latency, self._finish, client, server, rid)
            return
        for n, (cid, index) in enumerate(plan.blocks):
            server.queue.append((key, client, cid, index, n == len(plan.blocks) - 1))
        self._pump(server)

    def _pump(self, server: SimNode) -> None:
        if self.sharing == "fair":
            self._pump_fair(server)
            return
        while server.queue and not server.busy:
            key, client, cid, index, last = server.queue.popleft()
            if key in self.cancelled:
                continue
            data = self._block(index)
            server.busy = True
            server.uploaded += len(data) if index != -1 else 0
            self.sim.call_later(
                len(data) / server.rate, self._sent, server, key, client, cid, data, last
            )

    def _pump_fair(self, server: SimNode) -> None:
        now = self.sim.now
        if server.active:  # advance every active transfer by its share of the elapsed time
            done = (now - server.clock) * server.rate / len(server.active)
            for transfer in server.active:
                transfer[0] -= done
        server.clock = now
        for transfer in [t for t in server.active if t[1][0] in self.cancelled]:
            server.active.remove(transfer)
        finished = [t for t in server.active if t[0] <= 1e-9]
        for transfer in finished:
            server.active.remove(transfer)
        while server.queue and len(server.active) < self.slots:
            entry = server.queue.popleft()
            if entry[0] in self.cancelled:
                continue
            data = self._block(entry[3])
            server.uploaded += len(data) if entry[3] != -1 else 0
            server.active.append([float(len(data)), entry, data])
        if server.wakeup is not None:
            server.wakeup.cancel()
            server.wakeup = None
        if server.active:
            delay = min(t[0] for t in server.active) * len(server.active) / server.rate
            server.wakeup = self.sim.call_later(delay, self._pump, server)
        for _, (key, client, cid, _index, last), data in finished:
            self.sim.call_later(
                self.latency,
                self._deliver,
                client,
                server,
                key[1],
                bs.Response(blocks=[(cid, data)]),
            )
            if last:
                self.sim.call_later(self.latency, self._finish, client, server, key[1])

    def _sent(self, server, key, client, cid, data, last) -> None:
        server.busy = False
        rid = key[1]
        response = bs.Response(blocks=[(cid, data)])
        self.sim.call_later(self.latency, self._deliver, client, server, rid, response)
        if last:
            self.sim.call_later(self.latency, self._finish, client, server, rid)
        self._pump(server)

    def _deliver(self, client, server, rid, response) -> None:
        if (client.name, rid) in self.cancelled or client.done_at is not None:
            return
        self._feed(client, client.session.on_response(server.name, rid, response, self.sim.now))

    def _finish(self, client, server, rid) -> None:
        if (client.name, rid) in self.cancelled or client.done_at is not None:
            return
        self._feed(client, client.session.on_request_done(server.name, rid, self.sim.now))

    # --- fetchers ------------------------------------------------------------------------------
    def _feed(self, node: SimNode, actions) -> None:
        for action in actions:
            if isinstance(action, bs.SendRequest):
                self._serve(node, self.nodes[action.peer], action)
            elif isinstance(action, bs.CancelRequest):
                self.cancelled.add((node.name, action.request_id))
                if self.sharing == "fair":
                    server = self.nodes[action.peer]
                    self.sim.call_later(0, self._pump, server)
            elif isinstance(action, bs.FindProviders):
                others = [n for n in self.nodes if n != node.name]
                self.sim.call_later(
                    0.01,
                    lambda n=node, o=others: self._feed(n, n.session.add_peers(o, self.sim.now)),
                )
            elif isinstance(action, bs.ManifestReady):
                node.manifest = action.manifest
                node.sink = MemorySink(action.manifest)
                self.sim.call_later(
                    0, lambda n=node: self._feed(n, n.session.attach_sink(n.sink, self.sim.now))
                )
            elif isinstance(action, bs.Completed):
                node.done_at = self.sim.now
            elif isinstance(action, bs.Failed):
                raise AssertionError(f"{node.name} failed: {action.error}")
        self._rearm(node)

    def _rearm(self, node: SimNode) -> None:
        if node.timer is not None:
            node.timer.cancel()
            node.timer = None
        when = node.session.next_timer()
        if when != float("inf") and node.done_at is None:
            node.timer = self.sim.call_at(
                max(when, self.sim.now),
                lambda: self._feed(node, node.session.on_timer(self.sim.now)),
            )

    def run(self) -> dict:
        for node in self.fetchers:
            self._feed(node, node.session.start(self.sim.now))
        self.sim.run(
            until=self.timeout + 5,
            max_events=5_000_000,
            stop=lambda: all(n.done_at is not None for n in self.fetchers),
        )
        assert all(n.done_at is not None for n in self.fetchers), [
            n.session.describe() for n in self.fetchers
        ]
        for node in self.fetchers:
            assert all(node.sink.flags), node.name
        total = sum(n.uploaded for n in self.nodes.values())
        return {
            "time": max(n.done_at for n in self.fetchers),
            "seed_share": self.seed.uploaded / total,
            "seed_copies": self.seed.uploaded / self.manifest.size,
            "sent_over_needed": total / (len(self.fetchers) * self.manifest.size),
            "duplicates": sum(n.session.duplicate_blocks for n in self.fetchers),
        }
