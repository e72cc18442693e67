#!/usr/bin/env python3
"""QUIC bulk transfer over a lossy, delayed netlab WAN: each QUIC backend, same lab, same run.

For each loss rate a fresh netlab lab (``--wan-delay-ms``, ``--wan-loss-pct``: the delay and the
loss apply to each direction of every packet that crosses the lab's internet) and, one after the
other in alternating order, each backend (``QuicConfig.backend`` names: qh3, aioquic, auto; and
``qh3-plain``: qh3 without datagram copies, as it was; ``qh3-primed``: qh3 sending copies from
the first datagram, as a connection to a host already marked lossy does): a sink process on pub1
and a sender on pub2, both the transport alone (``QuicTransport``, one authenticated connection,
one channel). The sender writes 1 MiB pieces for ``--seconds`` or until
``--size-mb`` are written, whichever comes first, then closes its side; the sink answers with the
byte count it read. MB/s = bytes read by the sink / seconds from the first write to that answer.
Also reported: packets lost / sent (the library's count), copies sent, smoothed RTT, CPU seconds
per side.

    sudo .venv/bin/python bench/quic_lossy.py                       # 0, 0.5, 1 % at 20 ms
    sudo .venv/bin/python bench/quic_lossy.py --loss 0 0.5 1 2 \
        --backends qh3-plain,qh3,qh3-primed,aioquic
    sudo .venv/bin/python bench/quic_lossy.py --loss 0.5 2 --delay-ms 25 --backends qh3

Needs root (netlab). The last line of output is one JSON object with every figure, the machine
(load average before and after each run) and the versions. Every process it starts is stopped by
it (by PID) and every lab it brings up is taken down.
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]

PIECE = 1 << 20


def quic_config(backend: str):
    """``qh3``, ``aioquic``, ``auto``; ``qh3-plain``: qh3 without datagram copies."""
    from latticaray.mesh.transport.quic_config import QuicConfig

    if backend == "qh3-plain":
        return QuicConfig(backend="qh3", loss_redundancy=False)
    if backend == "qh3-primed":
        return QuicConfig(backend="qh3", redundancy_from_start=True)
    return QuicConfig(backend=backend)


# ---------------------------------------------------------------------------------- the sink
async def sink_main(args) -> None:
    from latticaray.mesh.identity import KeyPair
    from latticaray.mesh.transport.quic import QuicTransport

    tasks: set[asyncio.Task] = set()

    async def serve_channel(channel) -> None:
        n = 0
        while True:
            data = await channel.read(1 << 20)
            if not data:
                break
            n += len(data)
        channel.write(str(n).encode())
        channel.close()

    async def serve(conn) -> None:
        while True:
            channel = await conn.accept_channel()
            task = asyncio.ensure_future(serve_channel(channel))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def on_connection(conn) -> None:
        task = asyncio.ensure_future(serve(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    key = KeyPair.generate()
    transport = QuicTransport(key, quic_config(args.backend), on_connection=on_connection)
    addr = await transport.listen("0.0.0.0", 0)
    print(f"READY {key.peer_id} {addr.port}", flush=True)
    await asyncio.sleep(args.lifetime)  # bounded even if the driver dies
    await transport.close()


# -------------------------------------------------------------------------------- the sender
async def send_main(args) -> None:
    from latticaray.mesh.identity import KeyPair, PeerId
    from latticaray.mesh.transport.quic import QuicTransport

    transport = QuicTransport(KeyPair.generate(), quic_config(args.backend))
    await transport.listen("0.0.0.0", 0)
    conn = await transport.dial((args.host, args.port), PeerId.from_string(args.peer))
    channel = conn.open_channel()
    piece = os.urandom(PIECE)
    total = int(args.size_mb * PIECE)
    c0, t0 = time.process_time(), time.perf_counter()
    stop = t0 + args.seconds
    sent = 0
    while sent < total and time.perf_counter() < stop:
        channel.write(piece)
        sent += PIECE
        await channel.drain()
    channel.close()
    reply = b""
    while len(reply) < 32:
        data = await asyncio.wait_for(channel.read(64), args.seconds + 120)
        if not data:
            break
        reply += data
    t1, c1 = time.perf_counter(), time.process_time()
    received = int(reply)
    lost = conn.loss_stats()
    result = {
        "backend": conn.backend,
        "bytes": received,
        "written": sent,
        "seconds": round(t1 - t0, 2),
        "MBps": round(received / (t1 - t0) / 1e6, 3),
        "sender_cpu_s": round(c1 - c0, 2),
        "lost": None if lost is None else lost[0],
        "sent_packets": None if lost is None else lost[1],
        "srtt_ms": None if conn.rtt is None else round(conn.rtt * 1000, 1),
        "datagram_size": conn.max_datagram_size,
        "copies": getattr(getattr(conn._quic, "redundancy", None), "copies_sent", None),
    }
    conn.close()
    await transport.close()
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------- driver
def in_node(prefix: str, node: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", f"{prefix}-{node}", *argv]


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_backend(args, prefix: str, backend: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    me = [sys.executable, os.path.abspath(__file__)]
    limit = args.seconds + 180
    sink = subprocess.Popen(
        in_node(prefix, "pub1", [*me, "sink", "--backend", backend, "--lifetime", str(limit)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    load0 = os.getloadavg()[0]
    try:
        line = sink.stdout.readline()
        if not line.startswith("READY"):
            return {"backend": backend, "error": f"sink: {line!r} {sink.stderr.read()[-1500:]}"}
        _, peer, port = line.split()
        sender = subprocess.run(
            in_node(
                prefix,
                "pub2",
                [
                    *me,
                    "send",
                    "--backend",
                    backend,
                    "--host",
                    "198.18.0.11",
                    "--port",
                    port,
                    "--peer",
                    peer,
                    "--seconds",
                    str(args.seconds),
                    "--size-mb",
                    str(args.size_mb),
                ],
            ),
            capture_output=True,
            text=True,
            timeout=limit,
            env=env,
        )
        sink_cpu = cpu_of(sink.pid) if sink.poll() is None else None
        if sender.returncode != 0:
            return {"backend": backend, "error": sender.stderr[-1500:]}
        result = json.loads(sender.stdout.strip().splitlines()[-1])
        result["requested"] = backend
        result["sink_cpu_s"] = None if sink_cpu is None else round(sink_cpu, 2)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "error": f"sender exceeded {limit} s"}
    finally:
        if sink.poll() is None:
            os.kill(sink.pid, signal.SIGTERM)
        try:
            sink.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(sink.pid, signal.SIGKILL)
            sink.wait(10)
        sink.stdout.close()
        sink.stderr.close()
    result["loadavg"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
    return result


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("qh3", "aioquic"):
        try:
            out[name] = getattr(__import__(name), "__version__", "?")
        except ImportError:
            out[name] = None
    return out


def driver(args) -> None:
    from netlab_util import lab, netlab_available

    reason = netlab_available()
    if reason is not None:
        sys.exit(f"quic_lossy: {reason}")
    prefix = args.prefix or os.environ.get("LATTICARAY_NAT_LAB_PREFIX", f"lq{os.getpid() % 10000}")
    rows = []
    for i, loss in enumerate(args.loss):
        up = ["--wan-delay-ms", str(args.delay_ms), "--wan-loss-pct", str(loss)]
        with lab(prefix, *up):
            for round_ in range(args.rounds):
                order = args.backends if (i + round_) % 2 == 0 else args.backends[::-1]
                for backend in order:
                    print(f"loss {loss} %: {backend} ...", file=sys.stderr, flush=True)
                    row = run_backend(args, prefix, backend)
                    row.update(loss_pct=loss, round=round_ + 1)
                    rows.append(row)
    print(
        f"\nQUIC bulk, pub2 -> pub1, {args.delay_ms} ms each way "
        f"({2 * args.delay_ms} ms RTT), up to {args.size_mb} MB or {args.seconds} s per run"
    )
    head = (
        f"{'loss %':>6} {'backend':<8} {'MB/s':>7} {'MB':>6} {'s':>6} {'lost/sent pkts':>16} "
        f"{'srtt ms':>7} {'cpu snd/sink s':>15} {'load':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        name = r.get("requested", r["backend"])
        if "error" in r:
            print(f"{r['loss_pct']:>6} {name:<8} error: {r['error'].strip()[-200:]}")
            continue
        lost = "-" if r["lost"] is None else f"{r['lost']}/{r['sent_packets']}"
        print(
            f"{r['loss_pct']:>6} {name:<8} {r['MBps']:>7.2f} {r['bytes'] / 1e6:>6.0f} "
            f"{r['seconds']:>6.1f} {lost:>16} {r['srtt_ms'] or 0:>7.1f} "
            f"{r['sender_cpu_s']:>7.1f}/{r['sink_cpu_s'] or 0:<7.1f} "
            f"{r['loadavg'][0]:>4}-{r['loadavg'][1]:<5}"
        )
    print(
        json.dumps(
            {
                "bench": "quic_lossy",
                "delay_ms": args.delay_ms,
                "seconds": args.seconds,
                "size_mb": args.size_mb,
                "rows": rows,
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "loadavg": os.getloadavg(),
                },
                "versions": versions(),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("role", nargs="?", default="run", choices=["run", "sink", "send"])
    p.add_argument("--loss", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--delay-ms", type=int, default=20)
    p.add_argument("--backends", default="qh3-plain,qh3,aioquic")
    p.add_argument("--seconds", type=float, default=20.0, help="longest a sender writes")
    p.add_argument("--size-mb", type=float, default=100.0, help="most a sender writes")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--prefix", help="netlab prefix (default: LATTICARAY_NAT_LAB_PREFIX + pid)")
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--lifetime", type=float, default=300, help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--peer", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.backends = args.backends.split(",")
    if args.role == "sink":
        asyncio.run(sink_main(args))
    elif args.role == "send":
        asyncio.run(send_main(args))
    else:
        driver(args)


if __name__ == "__main__":
    main()
