"""MeshRuntime: the mesh services a runtime node runs beside its RemoteRuntime.

`MeshRuntime` starts a MeshNode (transports, RPC), the DHT, NAT traversal when configured
(`NatSettings`), the CRDT state service, the object exchange and the capacity advertiser, and
attaches a `RemoteRuntime` (remote/runtime.py) to a RuntimeNode so that the node places work on
its peers and serves theirs. Protocols: see remote/protocols.py and docs/protocol/runtime.md.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import logging
import os
import time
from typing import Any

from latticaray.mesh.errors import MeshError
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.multiaddr import Multiaddr
from latticaray.mesh.nat.addresses import LAB_ENV
from latticaray.mesh.node import MeshConfig, MeshNode
from latticaray.runtime.admission import ACTIVE, Admission, MeshKey, Permission
from latticaray.runtime.errors import CredentialError, MeshUnreachableError
from latticaray.runtime.remote.membership import Membership
from latticaray.runtime.remote.runtime import RemoteRuntime
from latticaray.scheduler.policy import NodeView

log = logging.getLogger(__name__)

DHT_BOOTSTRAP_TIMEOUT = 30.0
CAPACITY_TTL = 15.0  # DHT capacity ads: lifetime, refresh period, least gap on change
CAPACITY_REFRESH = 5.0
CAPACITY_MIN_INTERVAL = 2.0
CAPACITY_WAIT = 10.0  # how long work no known node can take waits for DHT capacity ads
PROVIDER_ADMIT_TIMEOUT = 10.0  # admitting a provider the DHT names, before fetching from it
DIAL_TIMEOUT = 10.0  # connecting to a bootstrap peer
REACHABLE_WAIT = 10.0  # how long a joining node behind a NAT waits to become reachable
LOOPBACK_LISTEN = ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"]
#: a node joining a mesh beyond this host: every interface, an ephemeral UDP port (the same socket
#: serves QUIC, AutoNAT and hole punching)
ANY_LISTEN = ["/ip4/0.0.0.0/udp/0/quic-v1", "/ip4/0.0.0.0/tcp/0"]


def reaches_beyond_host(bootstrap: list[str]) -> bool:
    """True if a bootstrap address is not on this host (not loopback, not a Unix socket): the node
    then listens on every interface and runs NAT traversal unless told otherwise."""
    for text in bootstrap:
        host = Multiaddr.parse(text).host
        if host is None:
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return True
        except ValueError:  # a DNS name: another host
            return True
    return False


def default_nat(nat, bootstrap: list[str]) -> NatSettings | None:
    """The NAT settings a node runs: `nat=False` none; given settings (or a dict, or True) as
    given; not given: auto mode when a bootstrap peer is beyond this host, else none."""
    if nat is None:
        return NatSettings() if reaches_beyond_host(bootstrap) else None
    return NatSettings.coerce(nat)


@dataclasses.dataclass
class NatSettings:
    """How a runtime node takes part in NAT traversal (see docs/protocol/nat.md).

    By default (no `observers`) the node runs auto mode, libp2p AutoRelay-style: it learns its
    reachability with AutoNAT from the peers it meets, finds relays among them (identify, DHT
    provider key), keeps two reservations while it is not publicly reachable, advertises its
    circuit addresses and hole-punches. `observers` (QUIC endpoints of public nodes, for NAT type
    and AutoNAT) and `relays` (`/ip4/../tcp/../p2p/<relay>`) are hand-given overrides: with
    observers the node configures itself once from them at start instead. A public node may
    `serve_relay` on `relay_port` (and libp2p's circuit relay v2 hop on its own listeners:
    members get the relay's limits, other libp2p peers the small public ones unless
    `public_relay=False`) and `serve_autonat`. `lab=True` (default: the environment's
    `LATTICARAY_LAB=1`) treats the netlab's 198.18.0.0/15 as public and turns off the same-host
    Unix-socket path (lab namespaces share one machine).
    """

    observers: tuple = ()
    relays: tuple = ()
    serve_relay: bool = False
    relay_port: int = 0
    public_relay: bool = True
    serve_autonat: bool = False
    hole_punching: bool = True
    lab: bool = dataclasses.field(default_factory=lambda: os.environ.get(LAB_ENV) == "1")
    auto_configure: bool = True

    @property
    def auto(self) -> bool:
        """Auto mode: observers and relays are found among the peers met, not given."""
        return not self.observers

    @classmethod
    def coerce(cls, value) -> NatSettings | None:
        if value is None or value is False or isinstance(value, cls):
            return value or None
        if value is True:
            return cls()
        if isinstance(value, dict):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = set(value) - fields
            if unknown:
                raise ValueError(f"unknown NAT settings {sorted(unknown)}; known: {sorted(fields)}")
            value = dict(value)
            value["observers"] = tuple(_endpoint(e) for e in value.get("observers", ()))
            value["relays"] = tuple(value.get("relays", ()))
            return cls(**value)
        raise TypeError(f"nat= takes a NatSettings, a dict of its fields or True, not {value!r}")

    def config(self):
        from latticaray.mesh.nat.addresses import LAB_PUBLIC_RANGES, AddressPolicy
        from latticaray.mesh.nat.autonat import AutoNatClientConfig
        from latticaray.mesh.nat.config import NatConfig

        policy = AddressPolicy(treat_as_public=LAB_PUBLIC_RANGES) if self.lab else AddressPolicy()
        confirmations = max(1, min(2, len(self.observers)))
        return NatConfig(
            auto=self.auto,
            observers=tuple(self.observers),
            relays=tuple(self.relays),
            policy=policy,
            serve_relay=self.serve_relay,
            relay_port=self.relay_port,
            public_relay=self.public_relay,
            serve_autonat=self.serve_autonat,
            hole_punching=self.hole_punching,
            autonat_client=AutoNatClientConfig(
                min_confirmations=confirmations, dial_back_timeout=1.5
            ),
        )


def _check_bootstrap_transports(bootstrap: list[str], listen: list[str]) -> None:
    """A QUIC bootstrap address needs a QUIC listen address: QUIC dials from the node's one
    listening UDP socket (the one hole punching and observed addresses are about)."""
    from latticaray.mesh.multiaddr import Multiaddr

    if any(Multiaddr.parse(a).transport == "quic" for a in listen):
        return
    for addr in bootstrap:
        if Multiaddr.parse(addr).transport == "quic":
            raise ValueError(
                f"bootstrap address {addr} is a QUIC one, but this node listens on no QUIC "
                "address (QUIC dials from the node's listening UDP socket): listen on one too "
                "(e.g. /ip4/0.0.0.0/udp/0/quic-v1) or bootstrap from the peer's TCP address"
            )


def _endpoint(value) -> tuple[str, int]:
    """("198.18.0.11", 4001), [host, port] or "host:port" -> (host, port)."""
    if isinstance(value, str):
        host, _, port = value.rpartition(":")
        return host, int(port)
    host, port = value
    return str(host), int(port)


class _ProvidingRefs(collections.Counter):
    """The node's store-object pin counts; a CID counted for the first time is announced."""

    def __init__(self, counts, on_new):
        super().__init__(counts)
        self._on_new = on_new

    def __setitem__(self, cid, count):
        is_new = cid not in self
        super().__setitem__(cid, count)
        if is_new and count > 0:
            self._on_new(cid)


class _RuntimeLoad:
    """What the scheduler's CapacityAdvertiser reads of a RuntimeNode: its view, and a version
    that changes whenever capacity or load does (checked when read)."""

    def __init__(self, membership: Membership):
        self.membership = membership
        self._signature: tuple | None = None
        self._version = 0

    def view(self, now: float) -> NodeView:
        view = self.membership.node_view()
        view.ad_time = now
        return view

    @property
    def version(self) -> int:
        view = self.membership.node_view()
        signature = (tuple(sorted(view.available.items())), view.queued, view.running)
        if signature != self._signature:
            self._signature = signature
            self._version += 1
        return self._version


class MeshRuntime:
    """A MeshNode plus the RemoteRuntime that carries a RuntimeNode's work across the mesh.

    Beside the runtime's own protocols it runs a DhtService (server mode; bootstrapped from the
    bootstrap peers) that the ObjectExchange announces store objects into and resolves CIDs
    through and that the scheduler's CapacityAdvertiser publishes `capacity/<resource>` ads
    into, and, when `nat` is given, MeshNatService (relay reservation, circuit address, hole punching).
    Placement also reads those ads (remote/capacity.py): work no admitted peer can take waits up
    to `capacity_wait` s for an advertiser of the demanded resources to be found and admitted.
    `peering="sparse"` admits peers only through bootstrap, on demand (placement,
    objects, named actors) or when they ask, and keeps live views of at most `MAX_NEIGHBOURS`
    of them (remote/membership.py: the least recently used peer it has no stake in is evicted);
    "full" (the default) admits every peer connected or introduced and pushes views to all of
    them (idle cost grows with N^2; named actors' arbiters agree mesh-wide); `max_neighbours`
    and `fill_neighbours` change the bound and how many peers introduced in views a sparse node
    admits. `same_host_path=False` keeps
    peers on the same host on the transport they dialled (QUIC, TCP) instead of moving them to
    the Unix-socket path (to measure what two machines would see).

    Public services, each explicit: DHT routing is served to non-members unless
    `public_dht=False` (rate-limited per peer and per IP; members are not limited); relay and
    AutoNAT only when `nat` says `serve_relay` / `serve_autonat` (limits: mesh/nat/relay.py
    RelayConfig, mesh/nat/autonat.py AutoNatServerConfig). Data and work are members' only,
    except the objects explicitly shared with IPFS peers when `ipfs=True` (runtime/ipfsshare.py:
    Bitswap 1.2.0 serves those, to anyone, and nothing else).
    """

    def __init__(
        self,
        key: KeyPair,
        bootstrap: list[str],
        admission: Admission,
        listen: list[str] | None,
        nat: NatSettings | None = None,
        peering: str = "full",
        capacity_wait: float = CAPACITY_WAIT,
        same_host_path: bool = True,
        public_dht: bool = True,
        ipfs: bool = False,
        max_neighbours: int | None = None,
        fill_neighbours: int | None = None,
    ):
        if peering not in ("full", "sparse"):
            raise ValueError(f"peering is 'full' or 'sparse', not {peering!r}")
        if peering == "full" and (max_neighbours is not None or fill_neighbours is not None):
            raise ValueError("max_neighbours and fill_neighbours bound sparse peering only")
        if max_neighbours is not None and (type(max_neighbours) is not int or max_neighbours < 1):
            raise ValueError(f"max_neighbours is a positive integer, not {max_neighbours!r}")
        if fill_neighbours is not None and (
            type(fill_neighbours) is not int or fill_neighbours < 0
        ):
            raise ValueError(f"fill_neighbours is an integer >= 0, not {fill_neighbours!r}")
        self.peering = peering
        self.max_neighbours = max_neighbours  # None: membership.MAX_NEIGHBOURS
        self.fill_neighbours = fill_neighbours  # None: membership.FILL_NEIGHBOURS
        self.capacity_wait = capacity_wait
        self.same_host_path = same_host_path
        self.public_dht = public_dht  # DHT routing served to non-members (rate-limited) too
        self.ipfs_enabled = ipfs  # Bitswap 1.2.0 for IPFS peers, of shared objects only
        self.embedded = False  # set by init(): this node lives in a driver process
        self.key = key
        self.node_id = str(key.peer_id)
        self.bootstrap = list(bootstrap)
        self.admission = admission
        if listen is None:
            listen = ANY_LISTEN if reaches_beyond_host(self.bootstrap) else LOOPBACK_LISTEN
        self.listen = listen
        _check_bootstrap_transports(self.bootstrap, self.listen)
        self.nat_settings = nat
        self.mesh: MeshNode | None = None
        self.remote: RemoteRuntime | None = None
        # the services, once started
        self.state: Any = None  # latticaray.state.service StateService
        self.dht: Any = None  # latticaray.mesh.dht.service DhtService
        self.mesh_dht: Any = None  # latticaray.runtime.meshdht MeshDht: runtime keys in it
        self.nat: Any = None  # latticaray.mesh.nat.mesh_service MeshNatService
        self.exchange: Any = None  # latticaray.objectstore.exchange ObjectExchange
        self.ipfs: Any = None  # latticaray.runtime.ipfsshare IpfsSharing (ipfs=True)
        self.timings: dict[str, float | str] = {}
        self.advertiser: Any = None  # latticaray.scheduler.advertiser CapacityAdvertiser
        self._dht_bootstrap: asyncio.Task | None = None
        self._reachable: asyncio.Task | None = None  # an embedded node's background wait
        self._dials: dict[str, asyncio.Task] = {}  # bootstrap address -> its connection
        self._provide_tasks: set[asyncio.Task] = set()

    @classmethod
    def prepare(
        cls,
        *,
        bootstrap: list[str],
        credential: str | None,
        listen: list[str] | None = None,
        key_path: str | None = None,
        mesh_key_path: str | None = None,
        nat: NatSettings | dict | bool | None = None,
        peering: str = "full",
        capacity_wait: float = CAPACITY_WAIT,
        same_host_path: bool = True,
        public_dht: bool = True,
        ipfs: bool = False,
        max_neighbours: int | None = None,
        fill_neighbours: int | None = None,
    ) -> MeshRuntime:
        """``nat``: None picks the default (:func:`default_nat`), False turns it off."""
        nat = default_nat(nat, bootstrap)
        key = KeyPair.load_or_create(key_path) if key_path else KeyPair.generate()
        if bootstrap:
            if not credential:
                raise CredentialError(
                    "joining a mesh needs a membership credential: pass credential= "
                    "(`latticaray start --credential`, or LATTICARAY_CREDENTIAL) with one from "
                    "the mesh's `latticaray invite`"
                )
            admission = Admission.join(credential, str(key.peer_id))
        else:
            mesh_key = MeshKey.load_or_create(mesh_key_path) if mesh_key_path else None
            admission = Admission.create_mesh(str(key.peer_id), mesh_key)
        return cls(
            key,
            bootstrap,
            admission,
            listen,
            nat,
            peering,
            capacity_wait,
            same_host_path,
            public_dht,
            ipfs,
            max_neighbours,
            fill_neighbours,
        )

    async def start(self, runtime_node) -> MeshRuntime:
        from latticaray.mesh.transport.quic import QuicConfig

        started = time.monotonic()
        # netlab hosts share this machine's filesystem but stand for separate machines: no
        # same-host Unix-socket shortcut around their NATs
        in_lab = self.nat_settings is not None and self.nat_settings.lab
        config = MeshConfig(
            listen=self.listen,
            key=self.key,
            same_host_fast_path=self.same_host_path and not in_lab,
            quic=QuicConfig(keepalive_interval=1.0, unresponsive_timeout=4.0),
        )
        self.mesh = MeshNode(config)
        await self.mesh.start()
        self._mark("mesh_started", started)
        try:
            await self._start_services(runtime_node, started)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start_services(self, runtime_node, started: float) -> None:
        from latticaray.mesh.dht.records import default_validators
        from latticaray.mesh.dht.service import DhtService, ServeLimits
        from latticaray.runtime.meshdht import MemberRecords, MeshDht, scope_prefix

        assert self.mesh is not None and self.admission.mesh_public is not None
        validators = default_validators()
        prefix = scope_prefix(self.admission.mesh_public)
        validators[prefix] = MemberRecords(prefix, self.admission.check)
        admission = self.admission
        self.dht = DhtService(
            self.mesh,
            validators=validators,
            limits=ServeLimits(public=self.public_dht),
            exempt=lambda peer: admission.allowed(str(peer)),
        )
        self.mesh_dht = MeshDht(self.dht, self.admission, admit=self._admit_provider)
        # the bootstrap dials (QUIC handshake, identify) run while the services below start;
        # identify tells each peer the protocols registered when it is answered, so the DHT's
        # are; a node that offers relay or AutoNAT dials once those are registered, one that
        # serves IPFS peers (Bitswap) once that is
        nat = self.nat_settings
        serving = nat is not None and (nat.serve_relay or nat.serve_autonat)
        if not serving and not self.ipfs_enabled:
            self._dial_bootstrap()
        if nat is not None:
            await self._start_nat()
            self._mark("nat_started", started)
        if not self.ipfs_enabled:
            self._dial_bootstrap()
        remote = self.remote = RemoteRuntime(runtime_node, self.mesh, self.admission)
        remote.sparse = self.peering == "sparse"
        if self.max_neighbours is not None:
            remote.membership.max_neighbours = self.max_neighbours
        if self.fill_neighbours is not None:
            remote.membership.fill_neighbours = self.fill_neighbours
        remote.embedded = self.embedded
        remote.register()
        runtime_node.state_source.mesh_runtime = self  # links, addresses, NAT, transfers
        from latticaray.runtime.remote.capacity import CapacityDirectoryCore, DhtPlacement

        remote.capacity = DhtPlacement(
            remote.membership,
            self.mesh_dht,
            CapacityDirectoryCore(wait_timeout=self.capacity_wait),
        )
        remote.capacity.start()
        runtime_node.remote = remote
        from latticaray.state.service import StateService

        self.state = StateService(
            self.mesh, self.key, is_member=lambda peer: self.admission.allowed(str(peer))
        )
        from latticaray.state.revocations import Revocations

        revocations = Revocations(self.state.replica, remote.membership.check_revocation)
        await self.state.start()
        self._mark("state_started", started)
        remote.membership.attach_revocations(revocations)
        runtime_node.resources.attach(  # placement groups: sched/1, their records
            self.mesh, lambda peer: admission.allowed(peer), self.state
        )
        self.state.actors.on_claim_lost(remote.names.on_claim_lost)
        remote.state = self.state
        if runtime_node.store_ready is not None:
            await runtime_node.store_ready
            self._mark("store_ready", started)
        if runtime_node.store is not None:
            from latticaray.objectstore.exchange import ObjectExchange

            admission = self.admission
            self.exchange = ObjectExchange(
                self.mesh,
                self.mesh_dht,
                runtime_node.store,
                authorize=lambda peer: admission.allowed(str(peer), Permission.READ),
                authorize_replicate=lambda peer: admission.allowed(str(peer), ACTIVE),
            )
            await self.exchange.start()
            remote.exchange = self.exchange
            objects = runtime_node.objects
            objects.store_refs = _ProvidingRefs(objects.store_refs, self._provide)
            objects.on_cid_known = self._provide  # local puts: once their CID is known
            self._mark("exchange_started", started)
        if self.ipfs_enabled:
            self._start_ipfs(runtime_node)
        self._dial_bootstrap()  # a node whose offers identify must carry dials only now
        tried = []
        refusals = []
        for addr in self.bootstrap:
            try:
                await remote.membership.join(addr, self._dials[addr])
            except CredentialError as exc:
                refusals.append(str(exc))
                tried.append(f"{addr}: refused: {exc}")
            except (MeshError, ValueError, OSError) as exc:
                log.warning("bootstrap peer %s unreachable: %s", addr, exc)
                tried.append(f"{addr}: {type(exc).__name__}: {exc}")
        self._mark("admitted", started)
        if refusals and not remote.membership.alive_peers():
            await self.stop()
            raise CredentialError(
                "this node was not admitted to the mesh: " + "; ".join(refusals[:4])
            )
        if self.bootstrap and len(tried) == len(self.bootstrap):
            await self.stop()
            raise MeshUnreachableError(
                "could not join the mesh, no bootstrap peer could be reached:\n  "
                + "\n  ".join(tried)
            )
        if self.nat is not None and self.nat.auto is not None and self.bootstrap:
            if self.embedded:
                # a driver's node is a client: its work reaches peers over the connections it
                # opens, so init() does not wait for AutoNAT's verdict and a relay reservation
                # (their round trips to the relay); they settle in the background
                self._reachable = asyncio.get_running_loop().create_task(
                    self._wait_reachable(started)
                )
            else:  # a node that serves: reachable by the other members once `start` returns
                await self._wait_reachable(started)
        self.timings["join_s"] = time.monotonic() - started
        if self.bootstrap:
            # in the background: lookups that meet departed peers wait out their timeouts, and
            # init() must not (the exchange also asks connected peers meanwhile)
            self._dht_bootstrap = asyncio.get_running_loop().create_task(
                self._bootstrap_dht(started)
            )
        else:
            self.dht.start()
        self._start_advertiser()

    def _dial_bootstrap(self) -> None:
        """Start connecting to every bootstrap peer not dialled yet (awaited, and admitted, by
        the join)."""
        assert self.mesh is not None
        loop = asyncio.get_running_loop()
        for addr in self.bootstrap:
            if addr not in self._dials:
                self._dials[addr] = loop.create_task(self.mesh.connect(addr, timeout=DIAL_TIMEOUT))

    def _mark(self, phase: str, started: float) -> None:
        self.timings[f"at_{phase}_s"] = time.monotonic() - started

    def _start_ipfs(self, runtime_node) -> None:
        """Bitswap 1.2.0 on the mesh node for IPFS peers, serving what ``share`` names only."""
        from latticaray.objectstore.ipfs import IpfsBlocks
        from latticaray.runtime.ipfsshare import IpfsSharing

        if runtime_node.store is None:
            raise RuntimeError("ipfs=True needs the node's object store, which did not start")
        blocks = IpfsBlocks(self.mesh, runtime_node.store, dht=self.dht)
        self.ipfs = IpfsSharing(runtime_node, blocks, self.dht)
        runtime_node.ipfs = self.ipfs

    async def _admit_provider(self, peer_id) -> bool:
        """A provider the DHT names: admitted (both ways) before the exchange asks it."""
        assert self.remote is not None
        membership = self.remote.membership
        if self.admission.allowed(str(peer_id), Permission.READ):
            return True
        try:
            await asyncio.wait_for(membership.admit_with(peer_id), PROVIDER_ADMIT_TIMEOUT)
        except (TimeoutError, MeshError):
            return False
        return self.admission.allowed(str(peer_id), Permission.READ)

    async def _bootstrap_dht(self, started: float) -> None:
        try:
            size = await asyncio.wait_for(self.dht.bootstrap([]), DHT_BOOTSTRAP_TIMEOUT)
            self.timings["dht_bootstrap_s"] = time.monotonic() - started
            log.info("DHT joined: %d peers in the routing table", size)
        except (TimeoutError, MeshError) as exc:
            log.warning("DHT bootstrap did not complete: %r", exc)
        self.dht.start()

    def _start_advertiser(self) -> None:
        """Capacity ads into the DHT (`capacity/<resource>`, this node's subkey); the CRDT
        `members` entry is written by the membership's view loop (with the advertised
        addresses)."""
        from latticaray.scheduler.advertiser import AdvertiserCore, CapacityAdvertiser

        assert self.remote is not None
        node = self.remote.node

        def store_free() -> int:
            store = node.store
            try:
                if store is None:
                    return 0
                stats = store.stats()
                return max(0, int(stats["capacity"] - stats["used"] - stats["reserved"]))
            except Exception:
                return 0

        self.advertiser = CapacityAdvertiser(
            _RuntimeLoad(self.remote.membership),  # type: ignore[arg-type]  # its view and version
            self.node_id,
            self.key.peer_id.to_bytes(),
            self.mesh_dht,
            core=AdvertiserCore(
                self.node_id,
                ttl=CAPACITY_TTL,
                refresh_interval=CAPACITY_REFRESH,
                min_interval=CAPACITY_MIN_INTERVAL,
            ),
            store_free=store_free,
        )
        self.advertiser.start()

    async def _start_nat(self) -> None:
        from latticaray.mesh.nat.mesh_service import MeshNatService

        settings = self.nat_settings
        assert settings is not None and self.mesh is not None
        admission = self.admission
        self.nat = MeshNatService(
            self.mesh, settings.config(), is_member=lambda peer: admission.allowed(str(peer))
        )
        await self.nat.start()
        self.nat.attach_dht(self.dht)
        if settings.auto:
            return  # auto mode: reachability and relays come from the peers met (after joining)
        if settings.auto_configure:
            report, reach = await asyncio.wait_for(self.nat.auto_configure(), 60.0)
            self.timings["nat_type"] = str(getattr(report, "nat_type", report))
            self.timings["reachability"] = str(reach)
            log.info(
                "NAT: %s, reachability %s, circuit %s", report, reach, self.nat.circuit_addresses()
            )

    async def _wait_reachable(self, started: float) -> None:
        """Auto mode: wait (bounded) until AutoNAT says this node is public or it holds a relay
        reservation, so that peers can reach it once init()/start returns."""
        from latticaray.mesh.nat.errors import NotReachable

        assert self.nat is not None
        try:
            await self.nat.wait_reachable(REACHABLE_WAIT)
        except NotReachable as exc:
            log.warning("this node may not be reachable by other members: %s", exc)
        status = self.nat.status()
        self.timings["reachable_s"] = time.monotonic() - started
        self.timings["reachability"] = str(status.get("reachability"))
        self.timings["nat_type"] = str(status.get("nat_type"))

    def _provide(self, cid: str) -> None:
        """Announce a store object this node holds as provided in the DHT (in the background)."""
        if self.exchange is None or not cid.startswith("baf"):
            return
        task = asyncio.get_running_loop().create_task(self._provide_quietly(cid))
        self._provide_tasks.add(task)
        task.add_done_callback(self._provide_tasks.discard)

    async def _provide_quietly(self, cid: str) -> None:
        try:
            await self.exchange.provide(cid)
        except Exception as exc:  # an announcement that fails is retried by the reprovider
            log.debug("providing %s failed: %r", cid, exc)

    async def wait_for_peers(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.remote is not None and len(self.remote.membership.alive_peers()) >= count:
                return True
            await asyncio.sleep(0.05)
        return False

    @property
    def listen_addrs(self) -> list[str]:
        return [str(a) for a in self.mesh.listen_addrs] if self.mesh else []

    @property
    def advertised_addrs(self) -> list[str]:
        return [str(a) for a in self.mesh.advertised_addrs] if self.mesh else []

    def invite(
        self, peer_id: str | None = None, ttl: float | None = None, role: str = "member"
    ) -> str:
        if ttl is None:
            return self.admission.invite(peer_id, role=role)
        return self.admission.invite(peer_id, ttl, role)

    async def stop(self) -> None:
        background = [
            *self._provide_tasks,
            *self._dials.values(),
            self._dht_bootstrap,
            self._reachable,
        ]
        pending = [t for t in background if t is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self.ipfs is not None:
            self.ipfs.close()
        if self.advertiser is not None:
            await self.advertiser.stop()
        if self.remote is not None:
            await self.remote.stop()
        if self.exchange is not None:
            await self.exchange.stop()
        if self.state is not None:
            try:
                await self.state.stop()
            except Exception as exc:
                log.debug("cluster state did not stop cleanly: %s", exc)
        if self.dht is not None:
            await self.dht.close()
        if self.nat is not None:
            try:
                await self.nat.stop()
            except Exception as exc:
                log.debug("NAT traversal did not stop cleanly: %s", exc)
        if self.mesh is not None:
            await self.mesh.stop()
