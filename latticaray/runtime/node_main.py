"""A standalone node process: `python -m latticaray.runtime.node_main [options]`.

Runs a RuntimeNode with its worker pool and a MeshRuntime on one asyncio loop until SIGTERM or
SIGINT. Prints one JSON line on stdout when ready: {"node_id": ..., "addrs": [...], "advertised": [...],
"timings": {...}, "gc": {...}, "invite": ...} ("invite" only on the node that created the mesh). With --nat
(and --observer/--relay) the node runs NAT traversal; --serve-relay makes it a relay. Once started
it applies the GC policy of latticaray.runtime.gcpolicy (--gc-policy). --metrics-port serves the
process's Prometheus metrics (latticaray.observe.metrics; "metrics" in the ready line). This is what
`latticaray start` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="latticaray start", description=__doc__)
    parser.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        help="multiaddr (with /p2p/<id>) of a member to join; repeatable",
    )
    parser.add_argument(
        "--credential",
        default=os.environ.get("LATTICARAY_CREDENTIAL"),
        help="membership credential from `latticaray invite`",
    )
    parser.add_argument("--listen", action="append", default=None, help="multiaddr to listen on")
    parser.add_argument("--num-cpus", type=float, default=None)
    parser.add_argument("--num-gpus", type=float, default=None)
    parser.add_argument("--resources", default=None, help='JSON map, e.g. {"TPU": 4}')
    parser.add_argument("--key-path", default=None, help="host key file (created if missing)")
    parser.add_argument(
        "--driver-socket",
        default=None,
        help="Unix socket drivers attach to with init(address='unix:<path>') "
        "(default: a private directory under the temp dir)",
    )
    parser.add_argument(
        "--mesh-key-path",
        default=None,
        help="mesh key file for a node that starts a mesh (created if missing)",
    )
    parser.add_argument(
        "--nat",
        action="store_true",
        help="take part in NAT traversal: find the NAT type, reserve a relay slot "
        "when not public, advertise the circuit address, hole-punch",
    )
    parser.add_argument(
        "--observer",
        action="append",
        default=[],
        help="HOST:PORT, QUIC endpoint of a public node (NAT type, AutoNAT)",
    )
    parser.add_argument(
        "--relay",
        action="append",
        default=[],
        help="/ip4/HOST/tcp/PORT/p2p/ID of a relay to reserve a slot on",
    )
    parser.add_argument(
        "--serve-relay",
        type=int,
        default=None,
        metavar="PORT",
        help="offer the relay service (TCP PORT) and AutoNAT: for public nodes",
    )
    parser.add_argument("--no-hole-punching", action="store_true")
    parser.add_argument(
        "--no-nat",
        action="store_true",
        help="no NAT traversal (by default a node joining a mesh beyond this host runs it: "
        "AutoNAT, relays found among its peers, hole punching)",
    )
    parser.add_argument(
        "--peering",
        choices=("full", "sparse"),
        default="full",
        help="full (the default): admit every member connected or introduced (idle cost "
        "grows with N^2); sparse: admit peers only through bootstrap, placement (DHT "
        "capacity ads), objects and named actors, or when they ask, and keep live views of "
        "at most a few dozen (the least recently used peer nothing depends on is evicted)",
    )
    parser.add_argument(
        "--max-neighbours",
        type=int,
        default=None,
        help="sparse peering: live peer views kept at most (default 32); past that the least "
        "recently used peer nothing depends on is evicted",
    )
    parser.add_argument(
        "--fill-neighbours",
        type=int,
        default=None,
        help="sparse peering: below this many live peers, peers introduced in views are "
        "admitted too (default 4; 0: only bootstrap, work and peers that ask)",
    )
    parser.add_argument(
        "--capacity-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long work no known node can take waits for a node advertising "
        "the resources in the DHT before it fails as unschedulable",
    )
    parser.add_argument(
        "--gc-policy",
        choices=("startup", "refreeze", "off"),
        default="startup",
        help="startup: after start-up freeze what is alive and raise the GC "
        "thresholds (shorter pauses with many connections); refreeze: also "
        "freeze survivors every --gc-refreeze-interval seconds (frozen "
        "cycles that become garbage are never collected); off: CPython's "
        "defaults",
    )
    parser.add_argument("--gc-refreeze-interval", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument(
        "--no-same-host-path",
        action="store_true",
        help="keep peers on this host on the transport they dialled (QUIC, TCP) instead of "
        "moving them to the same-host Unix-socket path",
    )
    parser.add_argument(
        "--dht-members-only",
        action="store_true",
        help="answer DHT requests of mesh members only (default: DHT routing is a public "
        "service, rate-limited per peer and per IP for non-members)",
    )
    parser.add_argument(
        "--ipfs",
        action="store_true",
        help="let IPFS peers (kubo, Helia) fetch the objects shared with "
        "latticaray.util.ipfs.share() over Bitswap 1.2.0 (nothing else is served to them)",
    )
    parser.add_argument(
        "--lab", action="store_true", help="treat the netlab's 198.18.0.0/15 addresses as public"
    )
    parser.add_argument(
        "--object-store-memory",
        type=int,
        default=None,
        metavar="BYTES",
        help="capacity of the node's shared-memory object store (default: a share of memory)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; the ready "
        "line says which)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics server listens on (default 127.0.0.1; 0.0.0.0 for a scraper "
        "on another host)",
    )
    return parser.parse_args(argv)


def nat_settings(args: argparse.Namespace):
    """What the NAT options ask for: False (off), None (the default: auto mode when a bootstrap
    peer is beyond this host) or the settings given."""
    if args.no_nat:
        return False
    if not (args.nat or args.serve_relay is not None or args.relay or args.observer or args.lab):
        return None
    from latticaray.runtime.mesh_runtime import NatSettings

    serving = args.serve_relay is not None
    settings = {
        "observers": args.observer,
        "relays": args.relay,
        "serve_relay": serving,
        "relay_port": args.serve_relay or 0,
        "serve_autonat": serving,
        "hole_punching": not args.no_hole_punching,
        "auto_configure": not serving,
    }
    if args.lab:
        settings["lab"] = True
    return NatSettings.coerce(settings)


def _prepare(args: argparse.Namespace):
    from latticaray.runtime.mesh_runtime import CAPACITY_WAIT, MeshRuntime

    return MeshRuntime.prepare(
        bootstrap=args.bootstrap,
        credential=args.credential,
        listen=args.listen,
        key_path=args.key_path,
        mesh_key_path=args.mesh_key_path,
        nat=nat_settings(args),
        peering=args.peering,
        capacity_wait=CAPACITY_WAIT if args.capacity_wait is None else args.capacity_wait,
        same_host_path=not args.no_same_host_path,
        public_dht=not args.dht_members_only,
        ipfs=args.ipfs,
        max_neighbours=args.max_neighbours,
        fill_neighbours=args.fill_neighbours,
    )


async def run(args: argparse.Namespace) -> None:
    from latticaray.runtime import gcpolicy
    from latticaray.runtime.api import default_resources
    from latticaray.runtime.gpus import detect_gpus
    from latticaray.runtime.node import RuntimeNode

    gpus = detect_gpus(args.num_gpus)  # CUDA_VISIBLE_DEVICES, NVML, or --num-gpus declared
    resources = default_resources(
        args.num_cpus, gpus.count, json.loads(args.resources) if args.resources else None
    )
    from latticaray.runtime.errors import CredentialError

    try:
        mesh_runtime = _prepare(args)
    except CredentialError:  # main() says why and exits with 2
        raise
    except ValueError as exc:  # bad options: say what, without a traceback
        raise SystemExit(f"latticaray start: {exc}") from None
    node = RuntimeNode(
        mesh_runtime.node_id,
        resources,
        store_capacity=args.object_store_memory,
        gpu_ids=list(gpus.ids),
    )
    await node.start()
    await mesh_runtime.start(node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    import tempfile

    socket_path = args.driver_socket or os.path.join(
        tempfile.gettempdir(), f"latticaray-{os.getuid()}", f"node-{os.getpid()}.sock"
    )
    await node.listen_for_drivers(socket_path)
    refresher = None
    if args.gc_policy != "off":
        gcpolicy.apply_startup_policy()
    if args.gc_policy == "refreeze":
        refresher = asyncio.ensure_future(gcpolicy.refreeze_loop(args.gc_refreeze_interval))
    ready = {
        "node_id": mesh_runtime.node_id,
        "addrs": mesh_runtime.listen_addrs,
        "advertised": mesh_runtime.advertised_addrs,
        "timings": mesh_runtime.timings,
        "pid": os.getpid(),
        "driver_address": f"unix:{socket_path}",
        "gc": {
            "policy": args.gc_policy,
            "frozen": gc.get_freeze_count(),
            "thresholds": list(gc.get_threshold()),
        },
    }
    metrics_server = None
    if args.metrics_port is not None:
        from latticaray.observe import metrics

        metrics_server, _thread = metrics.start_http_server(args.metrics_port, args.metrics_host)
        port = metrics_server.server_port
        ready["metrics"] = f"http://{args.metrics_host}:{port}/metrics"
    if mesh_runtime.admission.mesh_key is not None:
        ready["invite"] = mesh_runtime.invite()
    ready["role"] = mesh_runtime.admission.role
    print(json.dumps(ready), flush=True)
    await stop.wait()
    if metrics_server is not None:
        metrics_server.shutdown()
    if refresher is not None:
        refresher.cancel()
    await mesh_runtime.stop()
    await node.stop()
    try:
        os.unlink(socket_path)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from latticaray.runtime.errors import CredentialError

    try:
        asyncio.run(run(args))
    except CredentialError as exc:  # refused at the door: say why, no traceback
        print(f"latticaray start: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
