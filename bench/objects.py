"""Object-store benchmarks: same-host zero-copy get, node-to-node transfer per transport, swarming.

    .venv/bin/python bench/objects.py            # 100 MB same-host and per transport, 1 GiB swarm
    .venv/bin/python bench/objects.py --quick    # smaller sizes

1. same host: 100 MB numpy array put by one process, got by another (zero-copy view, then a full
   read of the data); reference: this machine's memcpy measured in the same run. Puts are timed
   per hash (sha2-256, BLAKE3) on the plain path (write(2) into fresh tmpfs pages: the baseline)
   and on the warm path (copy+hash block by block into a pre-faulted spare), and local puts (the
   runtime's path: copied into a spare, sealed under a local name, not hashed; each object is
   deleted right after, so its file comes back as the next put's spare through the mapping kept
   of it), interleaved so all see the same load; plus the first put of a process (no spare yet)
   and back-to-back puts (no idle time to make a fresh spare). For local puts, the latency until
   the CID is known (``resolve``: hash + link, asked right after the put) is reported apart.
   ``--only-same-host`` runs just this part.
2. two nodes (separate processes) on loopback, 100 MB fetched over each transport: MB/s.
3. one seed, 1/2/4/8 fetcher processes fetching the same object at once: completion time of all.
   Target: 8 peers <= 1.5x the 1-peer time (swarming: fetchers serve each other). Measured on
   loopback (CPU-bound on a small machine) and, as root, on netlab with every host's uplink shaped
   (``tc tbf``, ``--swarm-rate-mbit``) so that the seed's uplink limits one fetch, with the CPU
   used printed beside each figure (bench/objects_swarm.py). ``--swarm-where``, ``--swarm-peers``,
   ``--swarm-size-mb`` narrow it.
4. with --netlab (root): 100 MB from a seed on netlab's pub1 to pub2 (public) and to hostA (behind
   a cone NAT, dialing out: a direct path), over TCP, QUIC (qh3) and QUIC on aioquic
   (``--netlab-transports``), alternating per repetition: MB/s. ``--netlab-wan 25,0.5`` runs it
   across a WAN with 25 ms delay and 0.5 % loss each way (hostA only). Real kernel routing and NAT,
   one machine. Baselines in the same run between the same namespaces: a raw TCP stream, a Python
   ssl TLS 1.3 stream, and the bare RPC stream (1 MiB messages, no store) per transport; the path
   the fetcher used is printed; CPU seconds per 100 MB of both processes and their share of time
   spent waiting for a CPU (other jobs) come with each run. ``NETLAB_PREFIX`` names the lab.

The last line printed is one JSON object with every figure, the machine and library versions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

MB = 1_000_000
NODE_HASH = "sha256"  # multihash of the node processes' puts (--hash); the runtime uses blake3
MiB = 1 << 20


# --- helpers -------------------------------------------------------------------------------------


def memcpy_gbps(nbytes: int) -> dict[str, float]:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    start = time.perf_counter()
    np.copyto(dst, src)  # first touch of dst: page faults included
    cold = nbytes / (time.perf_counter() - start) / 1e9
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, nbytes / (time.perf_counter() - start) / 1e9)
    return {"memcpy_cold_GBps": round(cold, 2), "memcpy_warm_GBps": round(best, 2)}


def hash_gbps(nbytes: int) -> dict[str, float]:
    data = os.urandom(nbytes)
    out = {}
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    out["sha256_1thread_GBps"] = round(nbytes / (time.perf_counter() - start) / 1e9, 2)
    try:
        import blake3

        start = time.perf_counter()
        blake3.blake3(data).digest()
        out["blake3_1thread_GBps"] = round(nbytes / (time.perf_counter() - start) / 1e9, 2)
        start = time.perf_counter()
        blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
        out["blake3_mt_GBps"] = round(nbytes / (time.perf_counter() - start) / 1e9, 2)
    except ImportError:
        out["blake3"] = "not installed"
    from latticaray.objectstore.manifest import build_manifest

    start = time.perf_counter()
    build_manifest(data, {"ser": "bench"})
    out["manifest_sha256_1MiB_blocks_threads_GBps"] = round(
        nbytes / (time.perf_counter() - start) / 1e9, 2
    )
    return out


# --- 1. same host --------------------------------------------------------------------------------


def _same_host_getter(root, cid, queue):
    from latticaray.objectstore.store import LocalStore

    client = LocalStore.attach(root)
    start = time.perf_counter()
    array = client.get(cid)
    got = time.perf_counter() - start
    start = time.perf_counter()
    total = int(array.sum(dtype=np.uint64)) if array.dtype == np.uint8 else float(array.sum())
    read = time.perf_counter() - start
    queue.put((got, read, array.nbytes, not array.flags.writeable, total))


def _put_seconds(store, array, count: int, wait_warm: bool) -> list[float]:
    seconds = []
    for _ in range(count):
        if wait_warm:
            store.wait_warm(30)  # as after a moment of idle time: the spare is ready
        start = time.perf_counter()
        cid = store.put(array)
        seconds.append(time.perf_counter() - start)
        store.delete(cid)
    return seconds


def _local_put_seconds(store, array, count: int) -> tuple[list[float], list[float]]:
    """Local puts, each deleted right after (its file comes back as the next put's spare);
    every other one is resolved first, to time how long its CID then takes."""
    puts, resolves = [], []
    for i in range(count):
        start = time.perf_counter()
        name = store.put_local(array)
        puts.append(time.perf_counter() - start)
        if i % 2:
            start = time.perf_counter()
            store.resolve(name)
            resolves.append(time.perf_counter() - start)
        store.delete(name)
    return puts, resolves


def bench_same_host(size: int, shm_base: str) -> dict[str, float]:
    """Put rates of the plain path (write(2) into fresh tmpfs pages; the baseline) and of the warm
    path (copy+hash into a pre-faulted spare), per hash, all in this run; then the get."""
    from latticaray.objectstore.cid import BLAKE3, SHA2_256, blake3_available
    from latticaray.objectstore.store import LocalStore

    root = tempfile.mkdtemp(prefix="bench-store-", dir=shm_base)
    spill = tempfile.mkdtemp(prefix="bench-spill-")
    array = np.random.default_rng(1).standard_normal(size // 8)
    results: dict = {}
    hashes = [("sha256", SHA2_256)] + ([("blake3", BLAKE3)] if blake3_available() else [])
    stores = []
    try:
        for name, code in hashes:
            plain = LocalStore(
                os.path.join(root, f"plain-{name}"),
                capacity_bytes=8 * size,
                spill_dir=os.path.join(spill, f"plain-{name}"),
                hash_code=code,
                warm=False,
            )
            warm = LocalStore(
                os.path.join(root, f"warm-{name}"),
                capacity_bytes=16 * size,
                spill_dir=os.path.join(spill, f"warm-{name}"),
                hash_code=code,
            )
            local = LocalStore(
                os.path.join(root, f"local-{name}"),
                capacity_bytes=16 * size,
                spill_dir=os.path.join(spill, f"local-{name}"),
                hash_code=code,
            )
            stores += [plain, warm, local]
            first = _put_seconds(warm, array, 1, False)[0]  # no spare yet in this process
            results[f"put_warm_{name}_first_GBps"] = round(size / first / 1e9, 2)
            first = _local_put_seconds(local, array, 1)[0][0]
            results[f"put_local_{name}_first_GBps"] = round(size / first / 1e9, 2)
            plain_s, warm_s, local_s, resolve_s, memcpy_s = [], [], [], [], []
            target = np.empty_like(array)
            target[:] = 0
            for _ in range(5):  # interleaved, so all paths see the same load from other jobs
                start = time.perf_counter()
                np.copyto(target, array)
                memcpy_s.append(time.perf_counter() - start)
                plain_s += _put_seconds(plain, array, 1, False)
                warm_s += _put_seconds(warm, array, 1, True)
                warm.wait_warm(30)  # its recycling thread would run beside the local puts
                puts, resolves = _local_put_seconds(local, array, 2)
                local_s += puts
                resolve_s += resolves
            del target
            for path, seconds in (
                ("plain", plain_s),
                ("warm", warm_s),
                ("local", local_s),
                ("memcpy", memcpy_s),
            ):
                results[f"put_{path}_{name}_GBps"] = round(size / min(seconds) / 1e9, 2)
                results[f"put_{path}_{name}_median_GBps"] = round(
                    size / sorted(seconds)[len(seconds) // 2] / 1e9, 2
                )
            resolve_s.sort()
            results[f"cid_after_local_put_{name}_ms"] = [
                round(resolve_s[0] * 1e3, 1),
                round(resolve_s[len(resolve_s) // 2] * 1e3, 1),
            ]
            both = sorted(p + r for p, r in zip(local_s[1::2], resolve_s))
            results[f"put_local_then_cid_{name}_median_GBps"] = round(
                size / both[len(both) // 2] / 1e9, 2
            )
            back_to_back = _put_seconds(warm, array, 5, False)
            results[f"put_warm_{name}_back_to_back_GBps"] = round(
                size / sorted(back_to_back)[2] / 1e9, 2
            )
            back_to_back = _local_put_seconds(local, array, 5)[0]
            results[f"put_local_{name}_back_to_back_GBps"] = round(
                size / sorted(back_to_back)[2] / 1e9, 2
            )
            results[f"local_{name}_gifts_taken_reused_mapping"] = [
                local.gifts_taken,
                local.gifts_reused_mapping,
            ]
            warm.close()
        store = stores[-1]
        ctx = mp.get_context("spawn")
        for kind, key in (("cid", str(store.put(array))), ("local", store.put_local(array))):
            gets, reads = [], []
            for _ in range(3):
                queue = ctx.Queue()
                child = ctx.Process(target=_same_host_getter, args=(store.root, key, queue))
                child.start()
                got, read, nbytes, readonly, _total = queue.get(timeout=120)
                child.join(timeout=30)
                assert nbytes == array.nbytes and readonly
                gets.append(got)
                reads.append(read)
            get, read = min(gets), min(reads)
            suffix = "" if kind == "cid" else "_by_local_name"
            results[f"get_zero_copy{suffix}_ms"] = round(get * 1e3, 3)
            results[f"get{suffix}_GBps"] = round(array.nbytes / get / 1e9, 1)
            results[f"get_and_read_all{suffix}_GBps"] = round(array.nbytes / (get + read) / 1e9, 2)
        get = results["get_zero_copy_by_local_name_ms"] / 1e3
        for name, _ in hashes:
            put_rate = results[f"put_local_{name}_GBps"]
            results[f"put_then_get_local_{name}_GBps"] = round(
                size / (size / put_rate / 1e9 + get) / 1e9, 2
            )
            put_rate = results[f"put_local_{name}_median_GBps"]
            results[f"put_then_get_local_{name}_median_GBps"] = round(
                size / (size / put_rate / 1e9 + get) / 1e9, 2
            )
        get = results["get_zero_copy_ms"] / 1e3
        for name, _ in hashes:
            for path in ("plain", "warm"):
                put_rate = results[f"put_{path}_{name}_GBps"]
                results[f"put_then_get_{path}_{name}_GBps"] = round(
                    size / (size / put_rate / 1e9 + get) / 1e9, 2
                )
        return results
    finally:
        for store in stores:
            store.destroy()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)


# --- node processes ------------------------------------------------------------------------------


def _node_process(
    conn,
    transport: str,
    shm_dir: str,
    chunk_size: int,
    netns: str | None = None,
    listen_ip: str = "127.0.0.1",
    hash_name: str = "sha256",
) -> None:
    if netns is not None:  # enter a netlab node's network namespace before any socket exists
        _enter_netns(netns)
    asyncio.run(_node_main(conn, transport, shm_dir, chunk_size, listen_ip, hash_name))


async def _node_main(
    conn, transport: str, shm_dir: str, chunk_size: int, listen_ip: str, hash_name: str
) -> None:
    from latticaray.mesh.multiaddr import Multiaddr
    from latticaray.mesh.node import MeshConfig, MeshNode
    from latticaray.mesh.transport.quic import QuicConfig
    from latticaray.objectstore.cid import BLAKE3, SHA2_256
    from latticaray.objectstore.exchange import ExchangeConfig, ObjectExchange
    from latticaray.objectstore.store import LocalStore

    kind, _, backend = transport.partition("@")  # "quic@aioquic": QUIC on that library
    listen = {
        "quic": [f"/ip4/{listen_ip}/udp/0/quic-v1"],
        "tcp": [f"/ip4/{listen_ip}/tcp/0"],
        "unix": [],
    }[kind]
    quic = QuicConfig(backend=backend or "auto")
    node = MeshNode(MeshConfig(listen=listen, transports=(kind,), quic=quic))
    await node.start()
    spill = tempfile.mkdtemp(prefix="bench-spill-")
    # the seed's hash names the blocks; fetchers verify with it
    store = LocalStore(
        shm_dir,
        capacity_bytes=8 << 30,
        spill_dir=spill,
        chunk_size=chunk_size,
        hash_code={"sha256": SHA2_256, "blake3": BLAKE3}[hash_name],
    )
    known: list = []

    async def providers(cid):
        return list(known)

    bulk_block = os.urandom(MiB)

    async def bulk(ctx, payload):  # the bare RPC baseline of part 4: 1 MiB messages, nothing else
        for _ in range(int(payload) // MiB):
            yield bulk_block

    node.register_server_stream(_BULK_SERVICE, bulk)
    exchange = ObjectExchange(node, None, store, providers=providers, config=ExchangeConfig())
    await exchange.start()
    loop = asyncio.get_running_loop()
    try:
        while True:
            command, arg = await loop.run_in_executor(None, conn.recv)
            if command == "info":
                conn.send([str(a) for a in node.listen_addrs])
            elif command == "put":
                array = np.random.default_rng(arg[1]).integers(0, 255, arg[0], dtype=np.uint8)
                conn.send(str(store.put(array)))
            elif command == "connect":
                for addr in arg:
                    peer = await node.connect(Multiaddr.parse(addr))
                    if peer not in known:
                        known.append(peer)
                conn.send(True)
            elif command == "reconnect":  # a fresh connection to each peer (new handshake)
                for peer in list(known):
                    await node.disconnect(peer)
                for addr in arg:
                    await node.connect(Multiaddr.parse(addr))
                conn.send(True)
            elif command == "fetch":
                start = time.perf_counter()
                await exchange.fetch(arg, timeout=600)
                conn.send(time.perf_counter() - start)
            elif command == "path":  # how this node reaches each peer (transport, address, relayed)
                conn.send(
                    [
                        (c.transport, str(c.remote_addr), c.relayed, "out" if c.outbound else "in")
                        for c in node.connections.connections()
                    ]
                )
            elif command == "quic":  # the QUIC library and datagram sizes of this node's links
                transport = node.quic
                conn.send(
                    None
                    if transport is None
                    else {
                        "backend": transport.backend.name,
                        "datagram_sizes": [c.max_datagram_size for c in transport.connections],
                        "engines": [c.backend for c in transport.connections],
                        "batched_io": transport._udp.batched if transport._udp else None,
                    }
                )
            elif command == "pull_bulk":  # bare RPC stream of arg[1] bytes from arg[0]: no store
                from latticaray.mesh.identity import PeerId

                start, got, cpu = time.perf_counter(), 0, time.process_time()
                async for item in node.call_stream(
                    PeerId.from_string(arg[0]),
                    _BULK_SERVICE,
                    str(arg[1]).encode(),
                    timeout=600,
                    window=8 << 20,
                ):
                    got += len(item)
                conn.send((got, time.perf_counter() - start, time.process_time() - cpu))
            elif command == "settle":  # let the store finish its background spare first
                conn.send(await loop.run_in_executor(None, store.wait_warm, arg))
            elif command == "cpu":  # (CPU s, s runnable but waiting for a CPU) so far, all threads
                conn.send((time.process_time(), _runqueue_wait()))
            elif command == "uploaded":
                conn.send(sum(ledger.sent for ledger in exchange.ledgers.peers.values()))
            elif command == "stop":
                break
    finally:
        await exchange.stop()
        await node.stop()
        store.destroy()
        shutil.rmtree(spill, ignore_errors=True)
        conn.send("stopped")


_BULK_SERVICE = "/bench/bulk/1"


def _runqueue_wait() -> float:
    """Seconds this process's threads spent runnable but not running (schedstat; 0 if absent):
    on a machine shared with other jobs this tells waiting for a CPU apart from idling."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/self/task/{task}/schedstat") as file:
                    total += int(file.read().split()[1])
    return total / 1e9


class NodeProcess:
    def __init__(
        self,
        transport: str,
        shm_base: str,
        chunk_size: int = MiB,
        netns: str | None = None,
        listen_ip: str = "127.0.0.1",
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.dir = tempfile.mkdtemp(prefix="bench-node-", dir=shm_base)
        self.process = ctx.Process(
            target=_node_process,
            args=(
                child,
                transport,
                os.path.join(self.dir, "s"),
                chunk_size,
                netns,
                listen_ip,
                NODE_HASH,
            ),
        )
        self.process.start()

    def ask(self, command: str, arg=None, timeout: float = 900):
        self.conn.send((command, arg))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"node did not answer {command} in {timeout} s")
        return self.conn.recv()

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.ask("stop", timeout=30)
        except (OSError, EOFError, TimeoutError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def bench_transfer(
    transport: str,
    size: int,
    shm_base: str,
    seed_at: tuple = (None, "127.0.0.1"),
    fetcher_at: tuple = (None, "127.0.0.1"),
) -> dict[str, float]:
    seed = NodeProcess(transport, shm_base, netns=seed_at[0], listen_ip=seed_at[1])
    fetcher = NodeProcess(transport, shm_base, netns=fetcher_at[0], listen_ip=fetcher_at[1])
    try:
        cid = seed.ask("put", (size, 1))
        fetcher.ask("connect", seed.ask("info"))
        seconds = fetcher.ask("fetch", cid)
        return {"seconds": round(seconds, 3), "MBps": round(size / seconds / MB, 1)}
    finally:
        seed.stop()
        fetcher.stop()


def bench_swarm(
    size: int,
    counts: list[int],
    shm_base: str,
    where: list[str],
    rate_mbit: float,
    transport: str = "tcp",
) -> dict:
    """Part 3 (bench/objects_swarm.py): loopback (CPU-bound here) and netlab with shaped uplinks."""
    import objects_swarm

    make_node = lambda netns, ip: NodeProcess(transport, shm_base, netns=netns, listen_ip=ip)  # noqa: E731
    out = {}
    if "loopback" in where:
        out["loopback"] = objects_swarm.bench_swarm_loopback(make_node, size, counts)
    if "netlab" in where:
        out["netlab"] = objects_swarm.bench_swarm_netlab(make_node, size, counts, rate_mbit, NETLAB)
    return out


def _find_netlab() -> str:
    """../shared/netlab/netlab beside the checkout (or beside its worktree folder)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for up in (("..",), ("..", "..")):
        path = os.path.normpath(os.path.join(root, *up, "shared", "netlab", "netlab"))
        if os.path.exists(path):
            return path
    return os.path.normpath(os.path.join(root, "..", "shared", "netlab", "netlab"))


NETLAB = os.environ.get("NETLAB") or _find_netlab()


def _enter_netns(netns: str) -> None:
    """Move this process into a netlab node's network namespace (before any socket exists)."""
    import ctypes

    fd = os.open(netns, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(fd)


def _tls_contexts():
    """The TCP transport's own TLS 1.3 contexts (libp2p certificate, ALPN libp2p)."""
    from latticaray.mesh.identity import KeyPair
    from latticaray.mesh.tls import client_ssl_context, make_certified_key, server_ssl_context

    certified = make_certified_key(KeyPair.generate())
    return server_ssl_context(certified), client_ssl_context(certified)


def _socket_sender(netns: str, ip: str, tls: bool, nbytes: int, queue) -> None:
    import socket

    _enter_netns(netns)
    server_ctx = _tls_contexts()[0] if tls else None
    listener = socket.create_server((ip, 0))
    queue.put(listener.getsockname()[1])
    sock, _ = listener.accept()
    listener.close()
    if server_ctx is not None:
        sock = server_ctx.wrap_socket(sock, server_side=True)
    block = memoryview(os.urandom(MiB))
    start_cpu = time.process_time()
    for _ in range(nbytes // MiB):
        sock.sendall(block)
    queue.put(time.process_time() - start_cpu)
    with contextlib.suppress(OSError):
        sock.recv(1)  # the receiver closes once it has everything
    sock.close()


def _socket_receiver(netns: str, addr: tuple, tls: bool, nbytes: int, queue) -> None:
    import socket

    _enter_netns(netns)
    client_ctx = _tls_contexts()[1] if tls else None
    sock = socket.create_connection(addr, timeout=60)
    if client_ctx is not None:
        sock = client_ctx.wrap_socket(sock, server_hostname=None)
    buffer = bytearray(4 * MiB)
    got = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    while got < nbytes:
        n = sock.recv_into(buffer)
        if not n:
            break
        got += n
    queue.put((got, time.perf_counter() - start, time.process_time() - start_cpu))
    sock.close()


def bench_socket_stream(tls: bool, nbytes: int, seed_at: tuple, fetcher_at: tuple) -> dict:
    """Baseline: one blocking TCP stream (optionally Python ssl TLS 1.3) seed -> fetcher, 1 MiB
    sendall / 4 MiB recv_into, no framing and no store."""
    ctx = mp.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    nbytes = nbytes // MiB * MiB
    sender = ctx.Process(target=_socket_sender, args=(seed_at[0], seed_at[1], tls, nbytes, ports))
    sender.start()
    receiver = None
    try:
        port = ports.get(timeout=60)
        receiver = ctx.Process(
            target=_socket_receiver, args=(fetcher_at[0], (seed_at[1], port), tls, nbytes, results)
        )
        receiver.start()
        got, seconds, receiver_cpu = results.get(timeout=300)
        sender_cpu = ports.get(timeout=60)
        if got != nbytes:
            raise RuntimeError(f"socket baseline received {got} of {nbytes} bytes")
        return {
            "MBps": round(nbytes / seconds / MB, 1),
            "cpu_s_per_100MB": {
                "seed": round(sender_cpu * 100 * MB / nbytes, 3),
                "fetcher": round(receiver_cpu * 100 * MB / nbytes, 3),
            },
        }
    finally:
        for process in (receiver, sender):
            if process is not None:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=10)


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    return {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}


class NodePair:
    """A seed and a fetcher node process over one transport, connected, for repeated fetches."""

    def __init__(self, transport: str, shm_base: str, seed_at: tuple, fetcher_at: tuple) -> None:
        self.transport = transport
        self.seed = NodeProcess(transport, shm_base, netns=seed_at[0], listen_ip=seed_at[1])
        self.fetcher = NodeProcess(
            transport, shm_base, netns=fetcher_at[0], listen_ip=fetcher_at[1]
        )
        self.seed_addrs = self.seed.ask("info")
        self.fetcher.ask("connect", self.seed_addrs)
        self.seed_peer = self.seed_addrs[0].rsplit("/p2p/", 1)[1]
        self.backends: list = []
        self.runs: dict[str, list] = {"rpc_bulk": [], "exchange": []}

    def measure(self, size: int, rep: int, reconnect: bool = False) -> None:
        """The bare RPC stream baseline (1 MiB messages, no store) and an exchange fetch of a
        fresh object, each with the CPU seconds both processes used and the seconds they waited
        for a CPU (load from other jobs); ``reconnect``: over a fresh connection."""
        seed, fetcher = self.seed, self.fetcher
        if reconnect and rep:
            fetcher.ask("reconnect", self.seed_addrs)
        cid = seed.ask("put", (size, 100 + rep))
        seed.ask("settle", 60)  # the store's background spare must not compete with the fetch
        for what in ("rpc_bulk", "exchange"):
            before = (seed.ask("cpu"), fetcher.ask("cpu"))
            if what == "rpc_bulk":
                got, seconds, _ = fetcher.ask("pull_bulk", (self.seed_peer, size // MiB * MiB))
            else:
                got, seconds = size, fetcher.ask("fetch", cid)
            after = (seed.ask("cpu"), fetcher.ask("cpu"))
            if what == "exchange":  # which QUIC library carried the data (per repetition)
                self.backends.append(seed.ask("quic"))
            self.runs[what].append(
                {
                    "MBps": round(got / seconds / MB, 1),
                    "cpu_s_per_100MB": {
                        side: round((after[i][0] - before[i][0]) * 100 * MB / got, 3)
                        for i, side in enumerate(("seed", "fetcher"))
                    },
                    "cpu_wait_share": {
                        side: round((after[i][1] - before[i][1]) / seconds, 2)
                        for i, side in enumerate(("seed", "fetcher"))
                    },
                }
            )

    def result(self) -> dict:
        out = {
            "path": [
                dict(zip(("transport", "remote_addr", "relayed", "direction"), p))
                for p in self.fetcher.ask("path")
            ],
            "quic": self.seed.ask("quic"),
            "quic_per_run": self.backends,
        }
        for what, items in self.runs.items():
            out[what] = {"MBps": _spread([r["MBps"] for r in items]), "runs": items}
        return out

    def stop(self) -> None:
        self.seed.stop()
        self.fetcher.stop()


def bench_node_pairs(
    transports: tuple[str, ...],
    size: int,
    shm_base: str,
    seed_at: tuple,
    fetcher_at: tuple,
    reps: int,
    reconnect: bool = False,
) -> dict:
    """One seed/fetcher pair per transport, measured in turn (transports alternate within each
    repetition, so all of them see the same load); ``reconnect``: a fresh connection each
    repetition."""
    pairs: list[NodePair] = []
    try:
        for transport in transports:
            pairs.append(NodePair(transport, shm_base, seed_at, fetcher_at))
        for rep in range(reps):
            for pair in pairs:
                pair.measure(size, rep, reconnect)
        return {pair.transport: pair.result() for pair in pairs}
    finally:
        for pair in pairs:
            pair.stop()


#: Part 4's transports: TCP+TLS, QUIC on the default library (qh3), QUIC on aioquic.
NETLAB_TRANSPORTS = ("tcp", "quic", "quic@aioquic")


def bench_netlab(
    size: int,
    shm_base: str,
    reps: int = 3,
    transports: tuple[str, ...] = NETLAB_TRANSPORTS,
    wan: tuple[float, float] | None = None,
) -> dict:
    """Seed on pub1 (public, 198.18.0.11); fetchers on pub2 (public) and on hostA (behind a cone
    NAT, dialing out through it: a direct path, no relay, no hole punch needed). Per fetcher host
    and in the same run: raw TCP and Python ssl TLS 1.3 socket streams (baselines), then per
    transport the bare RPC stream and the exchange fetch, ``reps`` times each, transports
    alternating. ``wan`` = (delay ms, loss %) each way across the lab's internet: then only the
    hostA fetcher (its packets cross the emulated WAN, as any site-to-site path does), over a
    fresh connection each repetition (QUIC picks its library per path from what earlier
    connections lost)."""
    import subprocess

    if os.geteuid() != 0 or not os.access(NETLAB, os.X_OK):
        return {"skipped": "needs root and the netlab script"}
    prefix = os.environ.get("NETLAB_PREFIX", "lrobj")
    env = dict(os.environ, NETLAB_PREFIX=prefix)
    up = [NETLAB, "--prefix", prefix, "up", "--force"]
    if wan is not None:
        up += ["--wan-delay-ms", str(wan[0]), "--wan-loss-pct", str(wan[1])]
    subprocess.run(up, env=env, check=True, capture_output=True, timeout=120)
    try:
        ns = lambda node: f"/run/netns/{prefix}-{node}"  # noqa: E731
        seed_at = (ns("pub1"), "198.18.0.11")
        results: dict = {
            "seed": "pub1 198.18.0.11 (public)",
            "wan": None if wan is None else {"delay_ms": wan[0], "loss_pct": wan[1]},
            "load_avg_before": os.getloadavg(),
        }
        fetchers = [
            ("public_to_public", "pub2", "198.18.0.12"),
            ("behind_cone_nat_to_public", "hostA", "198.19.1.10"),
        ]
        if wan is not None:
            fetchers = fetchers[1:]
        for name, node, ip in fetchers:
            fetcher_at = (ns(node), ip)
            host: dict = {"fetcher": f"{node} {ip}"}
            for label, tls in (("tcp_socket", False), ("tls13_socket", True)):
                items = [bench_socket_stream(tls, size, seed_at, fetcher_at) for _ in range(reps)]
                host[label] = {"MBps": _spread([r["MBps"] for r in items]), "runs": items}
            host.update(
                bench_node_pairs(
                    transports, size, shm_base, seed_at, fetcher_at, reps, wan is not None
                )
            )
            host["transports"] = list(transports)
            results[name] = host
        results["load_avg_after"] = os.getloadavg()
        return results
    finally:
        subprocess.run(
            [NETLAB, "--prefix", prefix, "down"], env=env, capture_output=True, timeout=120
        )


def _netlab_rows(netlab: dict) -> list:
    rows = []
    for name, host in netlab.items():
        if not isinstance(host, dict) or "fetcher" not in host:
            continue
        rows.append((f"netlab {name}: seed pub1 -> fetcher {host['fetcher']}", ""))
        for label in ("tcp_socket", "tls13_socket"):
            spread = host[label]["MBps"]
            rows.append(
                (
                    f"  {label} baseline (MB/s min/med/max)",
                    f"{spread['min']}/{spread['median']}/{spread['max']}",
                )
            )
        for transport in host.get("transports", ("tcp", "quic")):
            pair = host[transport]
            if pair.get("quic"):
                quic = pair["quic"]
                rows.append(
                    (
                        f"  {transport}: {quic['backend']}, seed's datagrams "
                        f"{quic['datagram_sizes']} B",
                        "",
                    )
                )
                per_run = [q.get("engines") for q in pair.get("quic_per_run", []) if q]
                if any(per_run):
                    rows.append((f"  {transport} libraries per run: {per_run}", ""))
            path = ", ".join(
                f"{p['transport']} {'relayed' if p['relayed'] else 'direct'} "
                f"{p['direction']} to {p['remote_addr']}"
                for p in pair["path"]
            )
            rows.append((f"  {transport} path: {path}", ""))
            for what in ("rpc_bulk", "exchange"):
                spread = pair[what]["MBps"]
                cpu = pair[what]["runs"][0]["cpu_s_per_100MB"]
                rows.append(
                    (
                        f"  {transport} {what} (MB/s min/med/max)",
                        f"{spread['min']}/{spread['median']}/{spread['max']}",
                    )
                )
                rows.append(
                    (
                        f"  {transport} {what} CPU s/100MB seed, fetcher (1st run)",
                        f"{cpu['seed']}, {cpu['fetcher']}",
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    parser.add_argument("--swarm-size-mb", type=int, default=None)
    parser.add_argument("--skip-swarm", action="store_true")
    parser.add_argument("--only-swarm", action="store_true")
    parser.add_argument(
        "--netlab", action="store_true", help="also measure across netlab namespaces (root)"
    )
    parser.add_argument("--only-netlab", action="store_true")
    parser.add_argument("--netlab-reps", type=int, default=3, help="repetitions per part-4 measure")
    parser.add_argument(
        "--netlab-transports",
        default=",".join(NETLAB_TRANSPORTS),
        help="part 4's transports: tcp, quic (the default QUIC library), quic@qh3, quic@aioquic",
    )
    parser.add_argument(
        "--netlab-wan",
        default=None,
        metavar="DELAY_MS,LOSS_PCT",
        help="part 4 across a WAN with this delay and loss each way (e.g. 25,0.5): hostA only",
    )
    parser.add_argument(
        "--only-same-host", action="store_true", help="memcpy, hashing and part 1 only"
    )
    parser.add_argument(
        "--hash",
        choices=("sha256", "blake3"),
        default=None,
        help="multihash of the node processes' objects (parts 2-4); default: what the "
        "runtime uses (blake3 when installed)",
    )
    parser.add_argument("--swarm-peers", default="1,2,4,8", help="fetcher counts for part 3")
    parser.add_argument(
        "--swarm-where",
        default=None,
        help="part 3 settings, comma-separated: loopback, netlab (default: both when "
        "root and netlab are available, else loopback)",
    )
    parser.add_argument(
        "--swarm-rate-mbit",
        type=float,
        default=40.0,
        help="part 3 on netlab: every host's uplink rate (tc tbf), Mbit/s",
    )
    args = parser.parse_args()
    global NODE_HASH
    from latticaray.objectstore.cid import blake3_available

    NODE_HASH = args.hash or ("blake3" if blake3_available() else "sha256")
    shm_base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    size = 20 * MB if args.quick else 100 * MB
    swarm_size = (args.swarm_size_mb or (64 if args.quick else 1000)) * MB
    figures: dict = {"size_MB": size // MB, "node_hash": NODE_HASH}

    if args.netlab or args.only_netlab:
        wan = None
        if args.netlab_wan:
            delay, loss = (float(x) for x in args.netlab_wan.split(","))
            wan = (delay, loss)
        figures["cross_host_netlab"] = bench_netlab(
            size,
            shm_base,
            args.netlab_reps,
            tuple(args.netlab_transports.split(",")),
            wan,
        )
    else:
        figures["cross_host_netlab"] = "not run (pass --netlab; needs root and the netlab harness)"
    if not args.only_swarm and not args.only_netlab:
        figures["reference"] = memcpy_gbps(size)
        figures["hashing"] = hash_gbps(size)
        figures["same_host"] = bench_same_host(size, shm_base)
        if not args.only_same_host:
            figures["transfer"] = {
                t: bench_transfer(t, size, shm_base) for t in ("unix", "tcp", "quic")
            }
    if not args.skip_swarm and not args.only_netlab and not args.only_same_host:
        figures["swarm_size_MB"] = swarm_size // MB
        figures["swarm_transport"] = "tcp"
        counts = [int(c) for c in args.swarm_peers.split(",")]
        where = (
            args.swarm_where.split(",")
            if args.swarm_where
            else ["loopback", "netlab"]
            if os.geteuid() == 0 and os.access(NETLAB, os.X_OK)
            else ["loopback"]
        )
        figures["swarm"] = bench_swarm(swarm_size, counts, shm_base, where, args.swarm_rate_mbit)

    import aioquic
    import pyarrow

    figures["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "aioquic": aioquic.__version__,
        "qh3": _version_of("qh3"),
        "load_avg": os.getloadavg(),
    }

    print(f"{'measure':<52}{'value':>14}")
    print("-" * 66)
    rows = []
    if not args.only_swarm and not args.only_netlab:
        rows += _local_rows(figures, size)
    if isinstance(figures["cross_host_netlab"], dict):
        rows += _netlab_rows(figures["cross_host_netlab"])
    if "swarm" in figures:
        import objects_swarm

        for where, result in figures["swarm"].items():
            rows.append(("swarm: object size (MB)", swarm_size // MB))
            rows += objects_swarm.rows(result, f"swarm {where}")
    for name, value in rows:
        print(f"{name:<52}{value!s:>14}")
    print("(machine shared with other engineers' jobs during the run: figures are noisy)")
    print(json.dumps(figures))


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _local_rows(figures: dict, size: int) -> list:
    ref, same = figures["reference"], figures["same_host"]
    rows = [
        ("memcpy warm / cold (GB/s)", f"{ref['memcpy_warm_GBps']} / {ref['memcpy_cold_GBps']}"),
        ("sha256 1 thread (GB/s)", figures["hashing"]["sha256_1thread_GBps"]),
        (
            "blake3 1 thread / all threads (GB/s)",
            "{} / {}".format(
                figures["hashing"].get("blake3_1thread_GBps", "-"),
                figures["hashing"].get("blake3_mt_GBps", "-"),
            ),
        ),
        (
            "manifest build, sha256 threads (GB/s)",
            figures["hashing"]["manifest_sha256_1MiB_blocks_threads_GBps"],
        ),
    ]
    for name in ("sha256", "blake3"):
        if f"put_plain_{name}_GBps" not in same:
            continue
        rows += [
            (
                f"put {size // MB} MB, {name}, plain (baseline): best / median",
                f"{same[f'put_plain_{name}_GBps']} / {same[f'put_plain_{name}_median_GBps']}",
            ),
            (
                f"put, {name}, warm spare: best / median",
                f"{same[f'put_warm_{name}_GBps']} / {same[f'put_warm_{name}_median_GBps']}",
            ),
            (
                f"put, {name}, warm: first / back to back",
                f"{same[f'put_warm_{name}_first_GBps']} / "
                f"{same[f'put_warm_{name}_back_to_back_GBps']}",
            ),
            (
                f"put then get, {name}: plain / warm",
                f"{same[f'put_then_get_plain_{name}_GBps']} / "
                f"{same[f'put_then_get_warm_{name}_GBps']}",
            ),
            (
                f"memcpy {size // MB} MB in the same loop: best / median",
                f"{same[f'put_memcpy_{name}_GBps']} / {same[f'put_memcpy_{name}_median_GBps']}",
            ),
            (
                f"local put, {name}: best / median",
                f"{same[f'put_local_{name}_GBps']} / {same[f'put_local_{name}_median_GBps']}",
            ),
            (
                f"local put, {name}: first / back to back",
                f"{same[f'put_local_{name}_first_GBps']} / "
                f"{same[f'put_local_{name}_back_to_back_GBps']}",
            ),
            (
                f"local put then get, {name}: best / median",
                "{} / {}".format(
                    same[f"put_then_get_local_{name}_GBps"],
                    same[f"put_then_get_local_{name}_median_GBps"],
                ),
            ),
            (
                f"CID after a local put, {name}: best / median (ms)",
                " / ".join(str(v) for v in same[f"cid_after_local_put_{name}_ms"]),
            ),
            (
                f"local put + CID, {name}: median (GB/s)",
                same[f"put_local_then_cid_{name}_median_GBps"],
            ),
        ]
    rows += [
        ("get from another process, zero-copy (ms)", same["get_zero_copy_ms"]),
        ("same, by local name (ms)", same["get_zero_copy_by_local_name_ms"]),
        ("get + read every byte (GB/s)", same["get_and_read_all_GBps"]),
    ]
    for transport, result in figures.get("transfer", {}).items():
        rows.append((f"{size // MB} MB node to node over {transport} (MB/s)", result["MBps"]))
    return rows


if __name__ == "__main__":
    sys.exit(main())
