"""Run many :class:`~latticaray.state.core.StateCore` replicas on the mesh simulator.

:class:`SimCluster` wires N sans-I/O state cores to a :class:`~latticaray.mesh.sim.VirtualNetwork`
(virtual clock, latency, loss, partitions): every message a core emits is delivered as bytes to
the destination core, RPC-style replies travel back the same way, and each core's timer is
scheduled at its :meth:`~latticaray.state.replication.Replica.next_deadline`. Used by the tests
and by ``bench/crdt.py``; keys are derived from the seed so runs are reproducible.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable

from ..mesh.identity import KeyPair, PeerId
from ..mesh.sim import Simulator, TimerHandle, VirtualNetwork
from .atoms import Atom
from .core import StateCore
from .errors import StateError
from .replication import ReplicationConfig

__all__ = ["SimCluster", "deterministic_key"]

EPOCH = 1_700_000_000.0


def deterministic_key(seed: int, index: int) -> KeyPair:
    return KeyPair.from_private_bytes(hashlib.sha256(f"state-sim/{seed}/{index}".encode()).digest())


class SimCluster:
    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        latency: float = 0.02,
        loss: float = 0.0,
        config: ReplicationConfig | None = None,
        is_member: Callable[[PeerId], bool] | None = None,
        setup: Callable[[StateCore], None] | None = None,
    ) -> None:
        self.sim = Simulator(seed)
        self.net = VirtualNetwork(self.sim, latency=latency, loss=loss)
        self.config = config or ReplicationConfig()
        self.cores: dict[PeerId, StateCore] = {}
        self.ids: list[PeerId] = []
        self._timers: dict[PeerId, tuple[float, TimerHandle]] = {}
        self.errors: list[tuple[PeerId, StateError]] = []
        for index in range(n):
            key = deterministic_key(seed, index)
            core = StateCore(
                key,
                wall_clock=self.wall_clock,
                config=self.config,
                is_member=is_member,
                rng=random.Random(seed * 100_003 + index),
            )
            if setup is not None:
                setup(core)
            self.cores[core.peer_id] = core
            self.ids.append(core.peer_id)
            self.net.attach(core.peer_id, self._receiver(core.peer_id))
        for core in self.cores.values():
            core.replica.set_peers(self.ids)
        for pid in self.ids:
            self._on_timer(pid)

    def wall_clock(self) -> float:
        return EPOCH + self.sim.now

    @property
    def now(self) -> float:
        return self.wall_clock()

    # wiring -----------------------------------------------------------------------------------
    def _receiver(self, pid: PeerId):
        def on_message(src: PeerId, data: bytes, size: int) -> None:
            core = self.cores[pid]
            try:
                reply, sends = core.replica.handle_message(src, data, self.now)
            except StateError as exc:
                self.errors.append((pid, exc))
                return
            if reply is not None:
                self.net.send(pid, src, reply, size=len(reply), kind="reply")
            self._send(pid, sends)
            self._schedule(pid)

        return on_message

    def _send(self, src: PeerId, sends: Iterable[tuple[PeerId, bytes]]) -> None:
        for dst, data in sends:
            self.net.send(src, dst, data, size=len(data), kind="state")

    def _schedule(self, pid: PeerId) -> None:
        deadline = self.cores[pid].replica.next_deadline()
        if deadline is None:
            return
        when = max(deadline - EPOCH, self.sim.now)
        current = self._timers.get(pid)
        if current is not None and not current[1].cancelled and current[0] <= when:
            return
        if current is not None:
            current[1].cancel()
        self._timers[pid] = (when, self.sim.call_at(when, self._on_timer, pid))

    def _on_timer(self, pid: PeerId) -> None:
        self._timers.pop(pid, None)
        if not self.net.is_up(pid):
            self._timers[pid] = (self.sim.now + 1.0, self.sim.call_later(1.0, self._on_timer, pid))
            return
        self._send(pid, self.cores[pid].replica.tick(self.now))
        self._schedule(pid)

    def after_write(self, pid: PeerId) -> None:
        """Call after writing on ``pid``'s core outside the event loop, so its gossip is timed."""
        self._schedule(pid)

    # setup helpers ----------------------------------------------------------------------------
    def preload(self, atoms: list[Atom]) -> None:
        """Install the same atoms on every replica without network traffic (trusted set-up)."""
        for core in self.cores.values():
            for atom in atoms:
                core.store.apply_local(atom)

    # observation ------------------------------------------------------------------------------
    def digest(self, pid: PeerId) -> tuple[int, int]:
        return self.cores[pid].store.node(0, 0)

    def converged(self, pids: Iterable[PeerId] | None = None) -> bool:
        digests = {self.digest(p) for p in (pids if pids is not None else self.ids)}
        return len(digests) == 1

    def count_having(self, slot: tuple[str, str, str], atom: Atom) -> int:
        return sum(
            1
            for core in self.cores.values()
            if (held := core.store.get(slot)) is not None and held.signature == atom.signature
        )

    def run_until(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        check_every: float = 0.05,
        max_events: int = 50_000_000,
    ) -> float | None:
        """Advance virtual time until ``predicate()``; returns the elapsed virtual time or None."""
        start = self.sim.now
        deadline = start + timeout
        while self.sim.now < deadline:
            if predicate():
                return self.sim.now - start
            self.sim.run(until=min(deadline, self.sim.now + check_every), max_events=max_events)
        return self.sim.now - start if predicate() else None
