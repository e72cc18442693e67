#!/usr/bin/env python3
"""RPC benchmark: the paper's Table 1 "local" row through the full latticaray RPC stack.

Two node processes on loopback (a server and a client, spawned by this driver), one authenticated
connection between them, ``RpcSession`` on top. For each transport:

* ``quic1200``  QUIC with 1200 B datagrams (what the internet allows)
* ``quic1350``  QUIC with 1350 B datagrams (the transport's default off loopback)
* ``quic16k``   QUIC with 16384 B datagrams (the best size on loopback)
* ``tcp``       TCP the libp2p way (multistream, Noise XX, yamux): the node's default
* ``tcptls``    TCP + TLS 1.3 (``MeshConfig(tcp_security="tls")``; direct stack: both TLS)
* ``unix``      same-host Unix socket (Ed25519-authenticated, no TLS)

(QUIC connections grow their datagrams by path MTU discovery, to 64 KiB on loopback with
aioquic, to 1472 B with qh3; ``quic1350-fixed`` keeps 1350 B. ``@qh3`` / ``@aioquic`` picks the
QUIC library, e.g. ``--transports quic1350-fixed@qh3,quic1350-fixed@aioquic``.)

it measures unary echo calls with ``--concurrency`` calls in flight (default 1000) at 128 B and
256 KiB: QPS, p50/p99 latency, CPU seconds of both processes; and single-stream bulk MB/s (one
client-streaming call of 1 MiB messages). The raw-transport ceiling is measured in the same run by
invoking ../shared/anchors/quic_rpc_bench.py (no latticaray code) as a subprocess.

    .venv/bin/python bench/rpc.py                 # everything (~3 min on 2 cores)
    .venv/bin/python bench/rpc.py --quick         # shorter windows
    .venv/bin/python bench/rpc.py --transports tcp,unix --sizes 128 --no-baseline
    .venv/bin/python bench/rpc.py --transports quic1350 --compare-tree /tmp/base --rounds 3

``--compare-tree DIR`` runs every transport also with the latticaray of another checkout (for
example ``git archive main | tar -x -C /tmp/base``), alternating with this one, ``--rounds``
times; the table then ends with medians and ranges per transport and tree.

The last line of output is one JSON object with every figure, the machine and the versions.
Every loop is bounded in time; the driver kills only the processes it spawned (by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _tree_from_argv() -> str | None:
    """``--tree DIR`` (server/client roles): import latticaray from that checkout instead."""
    argv = sys.argv
    if "--tree" in argv[:-1]:
        return os.path.abspath(argv[argv.index("--tree") + 1])
    return None


sys.path.insert(0, _tree_from_argv() or ROOT)


def _find_anchor() -> str:
    """../shared/anchors/quic_rpc_bench.py beside the checkout (or beside its worktree folder)."""
    for up in (("..",), ("..", "..")):
        path = os.path.normpath(os.path.join(ROOT, *up, "shared", "anchors", "quic_rpc_bench.py"))
        if os.path.exists(path):
            return path
    return os.path.normpath(os.path.join(ROOT, "..", "shared", "anchors", "quic_rpc_bench.py"))


ANCHOR = _find_anchor()
#: QUIC at 1200 B / 1350 B datagrams (internet sizes) and at 16 KiB (loopback only).
QUIC_DATAGRAM_SIZES = {"quic1200": 1200, "quic1350": 1350, "quic16k": 16384}
TRANSPORTS = [*QUIC_DATAGRAM_SIZES, "tcp", "tcptls", "unix"]
BULK_MESSAGE = 1 << 20
CALL_TIMEOUT = 120.0
STALL_MESSAGE = 64 * 1024


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def parse_quic(transport: str) -> tuple[int, bool, str]:
    """``quic1350[-fixed][@backend]``: start datagram size, path MTU discovery, QUIC library."""
    name, _, backend = transport.partition("@")
    name, fixed = name.removesuffix("-fixed"), name.endswith("-fixed")
    return QUIC_DATAGRAM_SIZES[name], not fixed, backend or "auto"


def valid_transport(transport: str) -> bool:
    if not transport.startswith("quic"):
        return transport in TRANSPORTS
    try:
        _, _, backend = parse_quic(transport)
    except KeyError:
        return False
    return backend in ("auto", "qh3", "aioquic")


def quic_config(transport: str):
    from latticaray.mesh.transport.quic import QuicConfig

    size, pmtu, backend = parse_quic(transport)
    return QuicConfig(
        max_datagram_size=size,
        loopback_max_datagram_size=size,
        pmtu_discovery=pmtu,
        backend=backend,
    )


def server_limits():
    from latticaray.mesh.rpc import RpcLimits

    return RpcLimits()  # product defaults (an 8 MiB stream window made no measurable difference)


# ------------------------------------------------------------------------------ server process
async def server_main(args) -> None:
    from latticaray.mesh.identity import KeyPair
    from latticaray.mesh.rpc import RpcRouter, RpcSession

    node = None
    if args.stack == "node":
        from latticaray.mesh.node import MeshNode

        node = MeshNode(node_config(args, server=True))
        router = node.router
    else:
        router = RpcRouter()

    async def echo(ctx, payload):
        return payload

    # CPU samples (wall time, process CPU) every 20 ms, so the client can ask for our CPU time
    # at the exact edges of its window even when its question waits behind queued calls.
    samples: deque[tuple[float, float]] = deque(maxlen=100_000)

    async def sampler():
        while True:
            samples.append((time.time(), time.process_time()))
            await asyncio.sleep(0.02)

    sampler_task = asyncio.ensure_future(sampler())

    async def cpu(ctx, payload):
        at = float(payload)
        best = None
        for wall, cpu_s in reversed(samples):
            best = cpu_s
            if wall <= at:
                break
        return repr(best if best is not None else time.process_time()).encode()

    async def sink(ctx, requests):
        n = 0
        async for message in requests:
            n += len(message)
        return str(n).encode()

    router.register_unary("bench/echo", echo, eager=True)
    router.register_unary("bench/cpu", cpu, eager=True)
    router.register_client_stream("bench/sink", sink)
    produced = [0]

    async def firehose(ctx, payload):
        chunk = b"f" * STALL_MESSAGE
        while True:
            produced[0] += 1
            yield chunk

    async def stats(ctx, payload):
        return json.dumps({"produced": produced[0], "rss": rss_bytes()}).encode()

    router.register_server_stream("bench/firehose", firehose)
    router.register_unary("bench/stats", stats, eager=True)
    sessions = []
    limits = server_limits()

    def on_channel(channel):
        sessions.append(RpcSession(channel, router, limits))

    key = KeyPair.generate()
    if node is not None:
        await node.start()
        key = node.key
        addr = next(
            a
            for a in node.listen_addrs
            if a.transport
            == ("quic" if args.transport.startswith("quic") else args.transport.replace("tls", ""))
        )
    elif args.transport.startswith("quic"):
        from latticaray.mesh.transport.quic import QuicTransport

        async def serve(conn):
            while True:
                channel = await conn.accept_channel()
                on_channel(channel)

        tasks = set()

        def on_connection(conn):
            task = asyncio.ensure_future(serve(conn))
            tasks.add(task)

        transport = QuicTransport(key, quic_config(args.transport), on_connection=on_connection)
        addr = await transport.listen("127.0.0.1", 0)
    elif args.transport in ("tcp", "tcptls"):
        from latticaray.mesh.transport.tcp import TcpTransport

        transport = TcpTransport(key)
        addr = await transport.listen("127.0.0.1", 0, on_channel)
    else:
        from latticaray.mesh.transport.unix import UnixTransport

        transport = UnixTransport(key, run_dir=args.run_dir)
        addr = await transport.listen(on_channel=on_channel)
    print(f"READY {key.peer_id} {addr}", flush=True)
    await asyncio.sleep(args.server_lifetime)  # bounded even if the driver dies
    sampler_task.cancel()


# ------------------------------------------------------------------------------ client process
def node_config(args, server: bool):
    from latticaray.mesh.node import MeshConfig

    kind = "quic" if args.transport.startswith("quic") else args.transport
    security = {}
    if kind == "tcptls":
        kind, security = "tcp", {"tcp_security": "tls"}
    listen = []
    if kind == "quic":
        listen = ["/ip4/127.0.0.1/udp/0/quic-v1"]
    elif kind == "tcp" and server:
        listen = ["/ip4/127.0.0.1/tcp/0"]
    return MeshConfig(
        listen=listen,
        transports=(kind,),
        same_host_fast_path=(kind == "unix" and server),
        unix_options={"run_dir": args.run_dir},
        quic=quic_config(args.transport) if kind == "quic" else MeshConfig().quic,
        rpc_limits=server_limits() if server else MeshConfig().rpc_limits,
        auto_identify=False,
        **security,
    )


class NodeCaller:
    """The client side through MeshNode: ``call`` / ``call_client_stream`` like a session."""

    def __init__(self, node, peer):
        self.node, self.peer = node, peer

    async def call(self, service, payload, timeout):
        return await self.node.call(self.peer, service, payload, timeout)

    def call_client_stream(self, service, timeout):
        return self.node.connection_to(self.peer).session.call_client_stream(service, timeout)

    def call_stream(self, service, payload, timeout):
        return self.node.connection_to(self.peer).session.call_stream(service, payload, timeout)

    @property
    def transport(self):
        return self.node.connection_to(self.peer).session.channel.transport

    async def aclose(self):
        await self.node.stop()


class SessionCaller:
    def __init__(self, transport, session):
        self._transport, self.session = transport, session
        self.call = session.call
        self.call_client_stream = session.call_client_stream
        self.call_stream = session.call_stream

    @property
    def transport(self):
        return self.session.channel.transport

    async def aclose(self):
        await self.session.aclose()
        await self._transport.close()


async def connect(args):
    from latticaray.mesh.identity import KeyPair, PeerId
    from latticaray.mesh.multiaddr import Multiaddr
    from latticaray.mesh.rpc import RpcRouter, RpcSession

    peer = PeerId.from_string(args.peer)
    addr = Multiaddr.parse(args.addr)
    if args.stack == "node":
        from latticaray.mesh.node import MeshNode

        node = MeshNode(node_config(args, server=False))
        await node.start()
        connected = await node.connect(addr.with_peer(peer) if addr.peer_id is None else addr)
        assert connected == peer
        return NodeCaller(node, peer)
    key = KeyPair.generate()
    if args.transport.startswith("quic"):
        from latticaray.mesh.transport.quic import QuicTransport

        transport = QuicTransport(key, quic_config(args.transport))
        await transport.listen("127.0.0.1", 0)
        conn = await transport.dial(addr, peer)
        channel = conn.open_channel()
    elif args.transport in ("tcp", "tcptls"):
        from latticaray.mesh.transport.tcp import TcpTransport

        transport = TcpTransport(key)
        channel = await transport.dial(addr.host, addr.port, peer)
    else:
        from latticaray.mesh.transport.unix import UnixTransport

        transport = UnixTransport(key, run_dir=args.run_dir)
        channel = await transport.dial(addr.unix_path, peer)
    return SessionCaller(transport, RpcSession(channel, RpcRouter()))


from latticaray.mesh.errors import RpcError  # noqa: E402  (after sys.path is set)


async def server_cpu(session, at: float) -> float:
    """The server's CPU seconds at wall time ``at`` (from its 20 ms samples)."""
    return float(await session.call("bench/cpu", repr(at).encode(), timeout=CALL_TIMEOUT + 60))


async def measure_calls(
    session, size: int, concurrency: int, warmup: float, duration: float
) -> dict:
    payload = os.urandom(size)
    state = {"phase": 0, "count": 0, "errors": 0}
    latencies: list[float] = []
    perf = time.perf_counter
    hard_stop = perf() + warmup + duration + 120

    async def worker():
        call = session.call
        while state["phase"] < 2 and perf() < hard_stop:
            t = perf()
            try:
                reply = await call("bench/echo", payload, CALL_TIMEOUT)
            except RpcError as exc:
                state["errors"] += 1
                state["last_error"] = str(exc)
                continue
            if state["phase"] == 1:
                state["count"] += 1
                latencies.append(perf() - t)
            if len(reply) != size:
                raise RuntimeError("bad echo")
            del reply  # RSS then shows what the stack buffers, not replies kept by the bench

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    c0, t0, w0 = time.process_time(), perf(), time.time()
    state["phase"] = 1
    await asyncio.sleep(duration)
    state["phase"] = 2
    t1, c1, w1, n = perf(), time.process_time(), time.time(), state["count"]
    client_rss = rss_bytes()
    server_rss = json.loads(await session.call("bench/stats", b"", CALL_TIMEOUT + 60))["rss"]
    s0, s1 = await server_cpu(session, w0), await server_cpu(session, w1)
    _done, pending = await asyncio.wait(tasks, timeout=CALL_TIMEOUT + 30)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()

    def q(p):
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3, 3)
            if latencies
            else None
        )

    return {
        "calls": n,
        "seconds": round(t1 - t0, 3),
        "qps": round(n / (t1 - t0), 1),
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "client_cpu_s": round(c1 - c0, 3),
        "server_cpu_s": round(s1 - s0, 3),
        "cpu_us_per_call": round(((c1 - c0) + (s1 - s0)) / max(n, 1) * 1e6, 1),
        "errors": state["errors"],
        "last_error": state.get("last_error"),
        "client_rss_mb": round(client_rss / 1e6, 1),
        "server_rss_mb": round(server_rss / 1e6, 1),
    }


async def measure_bulk(session, total: int, time_limit: float) -> dict:
    message = b"\0" * BULK_MESSAGE
    c0, t0, w0 = time.process_time(), time.perf_counter(), time.time()
    call = session.call_client_stream("bench/sink", timeout=time_limit + 60)
    sent = 0
    stop = t0 + time_limit
    while sent < total and time.perf_counter() < stop:
        await call.send(message)
        sent += len(message)
    received = int(await call.result())
    t1, c1, w1 = time.perf_counter(), time.process_time(), time.time()
    await asyncio.sleep(0.05)  # let the server take a sample after the end
    s0, s1 = await server_cpu(session, w0), await server_cpu(session, w1)
    if received != sent:
        raise RuntimeError(f"bulk: sent {sent} but server counted {received}")
    return {
        "bytes": sent,
        "seconds": round(t1 - t0, 3),
        "MBps": round(sent / (t1 - t0) / 1e6, 1),
        "client_cpu_s": round(c1 - c0, 3),
        "server_cpu_s": round(s1 - s0, 3),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def measure_stall(caller, stall: float = 1.5) -> dict:
    """A server stream of 64 KiB messages as fast as it can; the client reads a few, then stops
    reading for ``stall`` seconds. Flow control must stop the producer: we report how much it
    produced while nobody read, what the client holds, and both processes' RSS growth."""
    stats0 = json.loads(await caller.call("bench/stats", b"", 30))
    rss0 = rss_bytes()
    stream = caller.call_stream("bench/firehose", b"", 60)
    for _ in range(10):
        await stream.__anext__()
    await asyncio.sleep(0.3)
    stats1 = json.loads(await caller.call("bench/stats", b"", 30))
    await asyncio.sleep(stall)
    stats2 = json.loads(await caller.call("bench/stats", b"", 30))
    queued, rss1 = stream.queued_bytes, rss_bytes()
    stream.cancel()
    return {
        "message_bytes": STALL_MESSAGE,
        "stall_s": stall,
        "produced_during_stall": stats2["produced"] - stats1["produced"],
        "produced_total": stats2["produced"] - stats0["produced"],
        "client_queued_bytes": queued,
        "client_rss_growth_mb": round((rss1 - rss0) / 1e6, 1),
        "server_rss_growth_mb": round((stats2["rss"] - stats0["rss"]) / 1e6, 1),
    }


async def client_main(args) -> None:
    caller = await connect(args)
    result = {"transport": args.transport, "stack": args.stack, "channel": caller.transport}
    await caller.call("bench/echo", b"warm", 30)
    for size in args.sizes:
        result[f"rpc_{size}"] = await measure_calls(
            caller, size, args.concurrency, args.warmup, args.duration
        )
    if args.bulk_total:
        result["bulk"] = await measure_bulk(caller, args.bulk_total, args.duration * 2)
    result["stall"] = await measure_stall(caller)
    await caller.aclose()
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------ driver
def spawn_server(
    transport: str, run_dir: str, lifetime: float, stack: str, tree_args: list[str]
) -> tuple[subprocess.Popen, str, str]:
    server = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "server",
            "--transport",
            transport,
            "--run-dir",
            run_dir,
            "--server-lifetime",
            str(lifetime),
            "--stack",
            stack,
            *tree_args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = server.stdout.readline()
    if not line.startswith("READY"):
        server.kill()
        server.wait(10)
        raise RuntimeError(
            f"{transport} server failed to start: {line!r} {server.stderr.read()[-2000:]}"
        )
    _, peer, addr = line.split()
    return server, peer, addr


def run_transport(args, transport: str, run_dir: str, tree: str | None = None) -> dict:
    per_size = args.warmup + args.duration + CALL_TIMEOUT + 40
    limit = len(args.sizes) * per_size + args.duration * 2 + 180
    tree_args = ["--tree", tree] if tree else []
    server, peer, addr = spawn_server(transport, run_dir, limit + 30, args.stack, tree_args)
    try:
        cmd = [
            sys.executable,
            __file__,
            "client",
            "--transport",
            transport,
            "--run-dir",
            run_dir,
            "--peer",
            peer,
            "--addr",
            addr,
            "--sizes",
            ",".join(map(str, args.sizes)),
            "--concurrency",
            str(args.concurrency),
            "--warmup",
            str(args.warmup),
            "--duration",
            str(args.duration),
            "--bulk-total",
            str(args.bulk_total),
            "--stack",
            args.stack,
            *tree_args,
        ]
        client = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        if client.returncode != 0:
            return {"transport": transport, "error": client.stderr[-3000:]}
        return json.loads(client.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"transport": transport, "error": f"client exceeded {limit:.0f} s"}
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(10)
        server.stdout.close()
        server.stderr.close()


def run_anchor(args, label: str, extra: list[str]) -> dict:
    if not os.path.exists(ANCHOR):
        return {"label": label, "error": f"{ANCHOR} not found"}
    cmd = [
        sys.executable,
        ANCHOR,
        "run",
        "--loop",
        "uvloop",
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
    ] + extra
    limit = args.warmup + args.duration * 6 + 240
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"label": label, "error": f"exceeded {limit:.0f} s"}
    if proc.returncode != 0:
        return {"label": label, "error": proc.stderr[-2000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"label": label, **out["res"]}


QUIC_BIG = [
    "--mds",
    "16384",
    "--max-data",
    "16777216",
    "--max-stream-data",
    "16777216",
    "--max-streams",
    "1024",
    "--fine-clock",
]


def anchors(args) -> list[dict]:
    runs = []
    c = ["--concurrency", str(args.concurrency)]
    if 128 in args.sizes:
        runs += [
            ("raw quic 1200 B, 128 B", ["--transport", "quic", "--size", "128"] + c),
            (
                "raw quic 16 KB dgram, 128 B",
                ["--transport", "quic", "--size", "128"] + c + QUIC_BIG,
            ),
            ("raw tls, 128 B", ["--transport", "tls", "--size", "128"] + c),
            ("raw tcp, 128 B", ["--transport", "tcp", "--size", "128"] + c),
        ]
    if 262144 in args.sizes:
        runs += [
            ("raw tls, 256 KB", ["--transport", "tls", "--size", "262144"] + c),
            ("raw tcp, 256 KB", ["--transport", "tcp", "--size", "262144"] + c),
        ]
    if args.bulk_total:
        small = str(min(args.bulk_total, 64 << 20))
        runs += [
            ("raw quic 1200 B bulk", ["--transport", "quic", "--mode", "bulk", "--total", small]),
            (
                "raw quic 16 KB dgram bulk",
                ["--transport", "quic", "--mode", "bulk", "--total", str(args.bulk_total)]
                + QUIC_BIG,
            ),
            (
                "raw tls bulk",
                ["--transport", "tls", "--mode", "bulk", "--total", str(args.bulk_total)],
            ),
            (
                "raw tcp bulk",
                ["--transport", "tcp", "--mode", "bulk", "--total", str(args.bulk_total)],
            ),
        ]
    return [run_anchor(args, label, extra) for label, extra in runs]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("aioquic", "qh3", "cryptography", "msgpack", "uvloop"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = None
    import ssl

    out["openssl"] = ssl.OPENSSL_VERSION
    return out


def fmt(value, spec=",.0f") -> str:
    return "—" if value is None else format(value, spec)


def _name(r: dict) -> str:
    """The transport, with the tree when it is not this checkout, and the round."""
    name = r["transport"] + ("" if r.get("tree", "this") == "this" else "/" + r["tree"])
    return name + (f" #{r['round']}" if r.get("round", 1) > 1 else "")


def print_table(args, results: list[dict], raw: list[dict]) -> None:
    print(
        f"\nlatticaray RPC ({'MeshNode' if args.stack == 'node' else 'transport + RpcSession'}"
        f"), two processes on loopback, {args.concurrency} calls in flight, uvloop; "
        f"{args.duration:.0f} s windows"
    )
    head = (
        f"{'transport':<15} {'size':>7} {'QPS':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'cli CPU s':>9} {'srv CPU s':>9} {'us/call':>8} {'RSS cli/srv MB':>15}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{_name(r):<15} ERROR {r['error'].strip().splitlines()[-1][:100]}")
            continue
        for size in args.sizes:
            m = r.get(f"rpc_{size}")
            if m:
                label = "128 B" if size == 128 else f"{size // 1024} KB"
                print(
                    f"{_name(r):<15} {label:>7} {fmt(m['qps']):>9} {m['p50_ms']:>8} "
                    f"{m['p99_ms']:>8} {m['client_cpu_s']:>9} {m['server_cpu_s']:>9} "
                    f"{m['cpu_us_per_call']:>8} "
                    f"{str(m['client_rss_mb']) + ' / ' + str(m['server_rss_mb']):>15}"
                )
    if args.bulk_total:
        print("\nsingle-stream bulk (client stream of 1 MiB messages)")
        for r in results:
            if "bulk" in r:
                b = r["bulk"]
                print(
                    f"{_name(r):<15} {b['MBps']:>8} MB/s  ({b['bytes'] >> 20} MiB in "
                    f"{b['seconds']} s; CPU client {b['client_cpu_s']} s, server "
                    f"{b['server_cpu_s']} s)"
                )
    print("\nstalled reader (server streams 64 KiB messages; client stops reading 1.5 s)")
    for r in results:
        if "stall" in r:
            st = r["stall"]
            print(
                f"{_name(r):<15} produced {st['produced_during_stall']} msgs while "
                f"stalled ({st['produced_total']} in all); client holds "
                f"{st['client_queued_bytes'] / 1e6:.2f} MB unread; RSS growth client "
                f"{st['client_rss_growth_mb']} MB, server {st['server_rss_growth_mb']} MB"
            )
    if raw:
        print("\nraw transport baseline (../shared/anchors/quic_rpc_bench.py, same run)")
        for r in raw:
            if "error" in r:
                print(f"{r['label']:<30} ERROR {r['error'].strip().splitlines()[-1][:100]}")
            elif "qps" in r:
                print(
                    f"{r['label']:<30} {fmt(r['qps']):>9} QPS  p50 {r['lat_p50_ms']} ms  "
                    f"p99 {r['lat_p99_ms']} ms"
                )
            else:
                print(f"{r['label']:<30} {r['MBps']:>9.1f} MB/s")


def summarize(args, results: list[dict]) -> list[dict]:
    """Median and range of each figure per transport and tree (printed when rounds > 1 or a
    second tree ran)."""
    rows = []
    for transport in args.transports:
        for tree in dict.fromkeys(r.get("tree", "this") for r in results):
            runs = [
                r
                for r in results
                if r.get("transport") == transport and r.get("tree") == tree and "error" not in r
            ]
            figures: dict[str, list[float]] = {}
            for r in runs:
                for size in args.sizes:
                    if f"rpc_{size}" in r:
                        figures.setdefault(f"qps_{size}", []).append(r[f"rpc_{size}"]["qps"])
                if "bulk" in r:
                    figures.setdefault("bulk_MBps", []).append(r["bulk"]["MBps"])
            row: dict = {"transport": transport, "tree": tree, "runs": len(runs)}
            for name, values in figures.items():
                values.sort()
                row[name] = {
                    "median": values[len(values) // 2],
                    "min": values[0],
                    "max": values[-1],
                }
            rows.append(row)
    if args.rounds > 1 or args.compare_tree:
        print(f"\nmedians [min - max] over {args.rounds} round(s), trees alternated")
        for row in rows:
            cells = [
                f"{name} {fmt(v['median'], ',.1f')} [{fmt(v['min'], ',.1f')} - "
                f"{fmt(v['max'], ',.1f')}]"
                for name, v in row.items()
                if isinstance(v, dict)
            ]
            print(f"{row['transport']:<10} {row['tree']:<5} " + "  ".join(cells))
    return rows


def driver(args) -> None:
    run_dir = tempfile.mkdtemp(prefix="latticaray-bench-")
    os.chmod(run_dir, 0o700)
    results = []
    trees: list[tuple[str, str | None]] = [("this", None)]
    if args.compare_tree:
        trees.append(("base", args.compare_tree))
    try:
        for round_ in range(args.rounds):
            for transport in args.transports:
                # alternate which tree goes first, so neither always gets the quieter slot
                for label, tree in trees if round_ % 2 == 0 else trees[::-1]:
                    print(
                        f"round {round_ + 1}/{args.rounds}: {transport} ({label}) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    result = run_transport(args, transport, run_dir, tree)
                    result.update(tree=label, round=round_ + 1, loadavg=os.getloadavg()[0])
                    results.append(result)
    finally:
        try:
            os.rmdir(run_dir)
        except OSError:
            pass
    raw = []
    if args.baseline:
        print("running raw baseline ...", file=sys.stderr, flush=True)
        raw = anchors(args)
    print_table(args, results, raw)
    medians = summarize(args, results)
    summary = {
        "bench": "rpc",
        "stack": args.stack,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "sizes": args.sizes,
        "rounds": args.rounds,
        "compare_tree": args.compare_tree,
        "results": results,
        "medians": medians,
        "raw_baseline": raw,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg(),
        },
        "versions": versions(),
    }
    print(json.dumps(summary))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("role", nargs="?", default="run", choices=["run", "server", "client"])
    p.add_argument("--transports", default=",".join(TRANSPORTS))
    p.add_argument("--transport", default="tcp")
    p.add_argument("--sizes", default="128,262144")
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--bulk-total", type=int, default=256 << 20)
    p.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument(
        "--compare-tree",
        help="another checkout: every transport also runs with its latticaray, alternated",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat every run (medians reported)")
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument(
        "--stack",
        choices=["node", "direct"],
        default="node",
        help="node: MeshNode on both sides (full stack); direct: transport + "
        "RpcSession without the connection manager",
    )
    p.add_argument("--quick", action="store_true", help="2 s windows, 64 MiB bulk")
    p.add_argument("--run-dir", default=tempfile.gettempdir())
    p.add_argument("--peer")
    p.add_argument("--addr")
    p.add_argument("--server-lifetime", type=float, default=600)
    args = p.parse_args()
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    args.transports = [t for t in args.transports.split(",") if t]
    for t in args.transports:
        if not valid_transport(t):
            p.error(
                f"unknown transport {t!r}; choose from {TRANSPORTS} (QUIC ones take "
                "-fixed: no path MTU discovery, and @qh3 / @aioquic: the QUIC library)"
            )
    if args.quick:
        args.duration, args.warmup, args.bulk_total = 2.0, 1.0, 64 << 20
    if args.role == "run":
        driver(args)
        return
    install_uvloop()
    if args.role == "server":
        asyncio.run(server_main(args))
    else:
        asyncio.run(client_main(args))


if __name__ == "__main__":
    main()
