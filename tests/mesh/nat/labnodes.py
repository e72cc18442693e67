"""A NAT-traversal mesh inside the netlab: one :class:`NatHost` per lab host, each on its own
namespace thread (shared by the netlab tests and ``bench/nat_matrix.py``)."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from netlab_util import NamespaceLoop

from latticaray.mesh.nat.addresses import LAB_PUBLIC_RANGES, AddressPolicy
from latticaray.mesh.nat.autonat import AutoNatClientConfig
from latticaray.mesh.nat.config import NatConfig
from latticaray.mesh.nat.host import NatHost

LAB_POLICY = AddressPolicy(treat_as_public=LAB_PUBLIC_RANGES)
PUBLIC_NODES = ("pub1", "pub2")
IPS = {"pub1": "198.18.0.11", "pub2": "198.18.0.12", "hostD": "198.18.0.31"}


class LabMesh:
    """pub1: relay + AutoNAT + observer; pub2: AutoNAT + observer; every other host a peer."""

    def __init__(
        self, prefix: str, hosts: list[str], quic_port: int, relay_port: int, **overrides
    ) -> None:
        self.prefix = prefix
        self.quic_port = quic_port
        self.relay_port = relay_port
        self.loops: dict[str, NamespaceLoop] = {}
        self.nodes: dict[str, NatHost] = {}
        self.hosts = list(dict.fromkeys(["pub1", *hosts]))
        self.overrides = overrides

    def config_for(self, host: str) -> NatConfig:
        public = host in PUBLIC_NODES
        cfg = NatConfig(
            quic_port=self.quic_port,
            policy=LAB_POLICY,
            serve_autonat=public,
            serve_relay=(host == "pub1"),
            relay_port=self.relay_port,
            # only two public observers exist in the lab: a public node can ask just the other one
            autonat_client=AutoNatClientConfig(
                min_confirmations=1 if public else 2, dial_back_timeout=1.5
            ),
        )
        node_overrides = self.overrides.get(host, {})
        common = {
            k: v for k, v in self.overrides.items() if k not in self.hosts and k != "per_host"
        }
        return replace(cfg, **{**common, **node_overrides})

    def start(self) -> None:
        for host in self.hosts:
            self.loops[host] = NamespaceLoop(self.prefix, host)
        for host in self.hosts:
            node = NatHost(config=self.config_for(host))
            self.loops[host].run(node.start(), 30)
            self.nodes[host] = node

    def servers_for(self, host: str) -> list[tuple[str, int]]:
        return [
            (IPS[p], self.quic_port)
            for p in PUBLIC_NODES
            if (p != host and p in self.nodes) or (p != host and p in PUBLIC_NODES)
        ]

    def discover(self, hosts: list[str] | None = None, timeout: float = 40.0) -> dict:
        """NAT type + one AutoNAT round on every host (in parallel); returns host -> (type, reach)."""
        hosts = hosts or self.hosts

        async def one(host: str):
            node = self.nodes[host]
            observers = [(IPS[p], self.quic_port) for p in PUBLIC_NODES]
            report = await node.detect_nat(observers)
            servers = [(IPS[p], self.quic_port) for p in PUBLIC_NODES if p != host]
            reach = await node.check_reachability(servers)
            return report, reach

        futures = {h: self.loops[h].submit(one(h)) for h in hosts}
        return {h: f.result(timeout) for h, f in futures.items()}

    def reserve_all(self, hosts: list[str]) -> None:
        relay = self.nodes["pub1"]
        for host in hosts:
            self.loops[host].run(
                self.nodes[host].reserve_relay(relay.peer_id, IPS["pub1"], self.relay_port), 20
            )

    def relay_tuple(self):
        return (self.nodes["pub1"].peer_id, IPS["pub1"], self.relay_port)

    def direct_addrs(self, host: str) -> list[tuple[str, int]]:
        return [(IPS[host], self.quic_port)] if host in IPS else []

    def connect(self, src: str, dst: str, wait_upgrade: float = 0.0, timeout: float = 60.0):
        node, target = self.nodes[src], self.nodes[dst]
        return self.loops[src].run(
            node.connect(
                target.peer_id,
                self.direct_addrs(dst),
                self.relay_tuple(),
                wait_upgrade=wait_upgrade,
            ),
            timeout,
        )

    def call(
        self, src: str, dst: str, service: str, payload: bytes, timeout: float = 20.0
    ) -> bytes:
        node = self.nodes[src]
        return self.loops[src].run(
            node.call(self.nodes[dst].peer_id, service, payload, timeout), timeout + 5
        )

    def wait_upgrade(self, src: str, dst: str, timeout: float = 30.0) -> str:
        node = self.nodes[src]
        link = node.links[self.nodes[dst].peer_id]

        async def wait():
            if link.upgrade_task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(link.upgrade_task), timeout)
                except (TimeoutError, Exception):
                    pass
            return link.path

        return self.loops[src].run(wait(), timeout + 5)

    def stop(self) -> None:
        for host, node in self.nodes.items():
            try:
                self.loops[host].run(node.stop(), 20)
            except Exception:
                pass
        for loop in self.loops.values():
            loop.stop()
        self.nodes.clear()
        self.loops.clear()


class MeshLab:
    """Like :class:`LabMesh`, but every host runs a real ``MeshNode`` with :class:`MeshNatService` on it."""

    def __init__(
        self,
        prefix: str,
        hosts: list[str],
        quic_port: int,
        relay_port: int,
        hole_punching: bool = True,
        relay_capture: bool = False,
    ) -> None:
        self.prefix = prefix
        self.quic_port = quic_port
        self.relay_port = relay_port
        self.hosts = list(dict.fromkeys(["pub1", *hosts]))
        self.hole_punching = hole_punching
        self.relay_capture = relay_capture
        self.loops: dict[str, NamespaceLoop] = {}
        self.nodes: dict = {}
        self.nats: dict = {}
        self.dhts: dict = {}

    async def _start_one(self, host: str):
        from latticaray.mesh.nat.mesh_service import MeshNatService
        from latticaray.mesh.node import MeshConfig, MeshNode

        node = MeshNode(
            MeshConfig(
                listen=[f"/ip4/0.0.0.0/udp/{self.quic_port}/quic-v1"],
                transports=("quic",),
                dial_timeout=10.0,
            )
        )
        await node.start()
        public = host in PUBLIC_NODES
        nat = MeshNatService(
            node,
            NatConfig(
                policy=LAB_POLICY,
                serve_autonat=public,
                serve_relay=(host == "pub1"),
                relay_port=self.relay_port,
                relay_capture=self.relay_capture,
                hole_punching=self.hole_punching,
                autonat_client=AutoNatClientConfig(
                    min_confirmations=1 if public else 2, dial_back_timeout=1.5
                ),
            ),
        )
        await nat.start()
        return node, nat, None

    def start(self) -> None:
        for host in self.hosts:
            self.loops[host] = NamespaceLoop(self.prefix, host)
        for host in self.hosts:
            self.nodes[host], self.nats[host], dht = self.loops[host].run(self._start_one(host), 60)
            if dht is not None:
                self.dhts[host] = dht

    def discover_and_reserve(self) -> dict:
        relay = self.nodes["pub1"].peer_id

        async def one(host: str):
            nat = self.nats[host]
            nat.config.observers = tuple((IPS[p], self.quic_port) for p in PUBLIC_NODES)
            nat.config.relays = (f"/ip4/{IPS['pub1']}/tcp/{self.relay_port}/p2p/{relay}",)
            return await nat.auto_configure()

        futures = {h: self.loops[h].submit(one(h)) for h in self.hosts}
        return {h: f.result(40) for h, f in futures.items()}

    def circuit_addr(self, host: str) -> str:
        return self.nats[host].circuit_address()

    def stop(self) -> None:
        async def stop_one(host):
            if host in self.dhts:
                await self.dhts[host].close()
            await self.nats[host].stop()
            await self.nodes[host].stop()

        for host in list(self.nodes):
            try:
                self.loops[host].run(stop_one(host), 20)
            except Exception:
                pass
        for loop in self.loops.values():
            loop.stop()
        self.nodes.clear()
        self.nats.clear()
        self.dhts.clear()
        self.loops.clear()


class AutoLab(MeshLab):
    """Zero-flag nodes in the netlab: pub1 and pub2 serve the relay and AutoNAT; every other host
    joins with nothing but pub1's address (auto mode, a DHT, an ephemeral UDP port), one after
    the other, each once it holds ``want`` relay reservations. ``LATTICARAY_LAB=1`` must be set
    (the default address policy then counts the lab's ranges as public)."""

    def __init__(
        self,
        prefix: str,
        hosts: list[str],
        quic_port: int,
        relay_port: int,
        want: int = 2,
        serve_relay: bool = True,
        no_relay_grace: float = 10.0,
        given: bool = False,
    ) -> None:
        super().__init__(prefix, hosts, quic_port, relay_port)
        self.want = want
        self.serve_relay = serve_relay
        self.no_relay_grace = no_relay_grace
        self.given = given  # the baseline: observers and relay given by hand, as before auto mode
        self.join_s: dict[str, float] = {}

    def bootstrap_addr(self) -> str:
        return f"/ip4/{IPS['pub1']}/udp/{self.quic_port}/quic-v1/p2p/{self.nodes['pub1'].peer_id}"

    async def _start_one(self, host: str):
        from latticaray.mesh.dht import DhtConfig, DhtService
        from latticaray.mesh.nat.mesh_service import MeshNatService
        from latticaray.mesh.node import MeshConfig, MeshNode

        public = host in PUBLIC_NODES
        loop = asyncio.get_running_loop()
        started = loop.time()
        node = MeshNode(
            MeshConfig(
                listen=[f"/ip4/0.0.0.0/udp/{self.quic_port if public else 0}/quic-v1"],
                transports=("quic",),
                bootstrap=[] if host == "pub1" else [self.bootstrap_addr()],
                dial_timeout=5.0,
            )
        )
        await node.start()
        serving = {
            "serve_relay": self.serve_relay,
            "relay_port": self.relay_port,
            "serve_autonat": True,
        }
        config = NatConfig(auto=True, **(serving if public else {}))
        if self.given and not public:
            config = NatConfig(
                observers=tuple((IPS[p], self.quic_port) for p in PUBLIC_NODES),
                relays=(
                    f"/ip4/{IPS['pub1']}/tcp/{self.relay_port}/p2p/{self.nodes['pub1'].peer_id}",
                ),
                autonat_client=AutoNatClientConfig(min_confirmations=2, dial_back_timeout=1.5),
            )
        nat = MeshNatService(node, config)
        nat.config.autorelay.want = self.want
        nat.config.autorelay.no_relay_grace = self.no_relay_grace
        await nat.start()
        dht = DhtService(node, DhtConfig(request_timeout=5.0))
        nat.attach_dht(dht)
        joined = loop.create_task(dht.bootstrap())  # in the background, as the runtime does
        try:
            await self._join(host, nat, public, started)
        except BaseException:
            joined.cancel()
            raise
        await joined
        return node, nat, dht

    async def _join(self, host: str, nat, public: bool, started: float) -> None:
        loop = asyncio.get_running_loop()
        if self.given and not public:
            await nat.auto_configure()
            self.join_s[host] = loop.time() - started
        elif not public and self.serve_relay:
            await nat.wait_reachable(20.0)
            self.join_s[host] = loop.time() - started

            async def holds_all() -> None:
                while len(nat.status()["reserved"]) < self.want:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(holds_all(), 20.0)

    def status(self, host: str) -> dict:
        async def read() -> dict:
            return self.nats[host].status()

        return self.loops[host].run(read(), 10)
