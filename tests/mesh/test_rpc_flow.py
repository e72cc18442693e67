"""Backpressure: a stalled reader stops its writer and memory stays bounded (measured)."""

from __future__ import annotations

import asyncio
import tracemalloc

from latticaray.mesh.rpc import INITIAL_WINDOW, MESSAGE_OVERHEAD, RpcLimits, RpcRouter, RpcSession
from test_rpc_support import memory_pipe, wait_until

MESSAGE = 64 * 1024
WINDOW = 512 * 1024


async def test_stalled_stream_reader_stops_the_server_generator():
    produced = 0
    router = RpcRouter()

    async def firehose(ctx, payload):
        nonlocal produced
        chunk = b"f" * MESSAGE
        for _ in range(600):  # 37 MiB if nothing pushed back
            produced += 1
            yield chunk

    router.register_server_stream("firehose", firehose)
    limits = RpcLimits(stream_window=WINDOW)
    a, b = memory_pipe(high_water=256 * 1024)
    client, server = RpcSession(a, RpcRouter(), limits), RpcSession(b, router, limits)
    tracemalloc.start()
    try:
        stream = client.call_stream("firehose", b"", timeout=60)
        assert len(await stream.__anext__()) == MESSAGE
        # Reader stalls: wait until the producer stops advancing (bounded poll).
        await wait_until(lambda: stream.queued_bytes >= WINDOW - MESSAGE, timeout=10)
        settled = produced
        for _ in range(50):
            await asyncio.sleep(0)
        assert produced == settled, "producer kept going although nobody reads"
        per_message = MESSAGE + MESSAGE_OVERHEAD
        # window worth of messages, plus the one that may overrun it, plus the one consumed
        assert produced <= WINDOW // per_message + 3
        assert stream.queued_bytes <= WINDOW + per_message
        _, peak = tracemalloc.get_traced_memory()
        print(f"\nstalled reader: producer made {produced} x 64 KiB, queued "
              f"{stream.queued_bytes} B, traced peak {peak / 1e6:.1f} MB")
        assert peak < 16 * 1024 * 1024
        # Resuming the reader drains everything.
        count = 1
        async for message in stream:
            count += 1
        assert count == 600 and produced == 600
    finally:
        tracemalloc.stop()
        await client.aclose()
        await server.aclose()


async def test_slow_client_stream_consumer_blocks_sender():
    router = RpcRouter()
    gate = asyncio.Event()
    received = 0

    async def slow_sink(ctx, requests):
        nonlocal received
        await gate.wait()
        async for message in requests:
            received += len(message)
        return str(received).encode()

    router.register_client_stream("sink", slow_sink)
    a, b = memory_pipe()
    client, server = RpcSession(a, RpcRouter()), RpcSession(b, router)
    try:
        call = client.call_client_stream("sink", timeout=60)
        sent = 0
        chunk = b"s" * MESSAGE

        async def sender():
            nonlocal sent
            for _ in range(200):
                await call.send(chunk)
                sent += 1

        task = asyncio.ensure_future(sender())
        window = client.limits.stream_window
        await wait_until(lambda: sent >= window // (MESSAGE + MESSAGE_OVERHEAD), timeout=10)
        for _ in range(50):
            await asyncio.sleep(0)
        assert not task.done()
        assert sent <= window // (MESSAGE + MESSAGE_OVERHEAD) + 2
        gate.set()
        await asyncio.wait_for(task, 30)
        assert await call.result() == str(200 * MESSAGE).encode()
    finally:
        await client.aclose()
        await server.aclose()


async def test_session_stops_reading_while_its_replies_cannot_be_sent():
    """Unary flood with a peer that does not read replies: the server's send queue stays bounded
    because it stops reading requests while its queue is above write_buffer_high."""
    router = RpcRouter()

    async def echo(ctx, payload):
        return payload

    router.register_unary("echo", echo, eager=True)
    limits = RpcLimits(write_buffer_high=1 << 20, close_timeout=0.2)
    a, b = memory_pipe(high_water=256 * 1024)
    client = RpcSession(a, RpcRouter(), limits)
    server = RpcSession(b, router, limits)
    # Stop the client from reading: its reader task is cancelled, so replies pile up in the pipe.
    client._reader_task.cancel()
    payload = b"q" * 16384
    tasks = [asyncio.ensure_future(client.call("echo", payload, timeout=30)) for _ in range(1000)]
    try:
        await wait_until(lambda: len(a.inbox) > 256 * 1024, timeout=10)
        for _ in range(200):
            await asyncio.sleep(0)
        server_queue = server._pending_bytes
        in_pipe_to_client = len(a.inbox)
        print(f"\nunread replies: server queue {server_queue} B, pipe {in_pipe_to_client} B")
        assert server_queue <= limits.write_buffer_high + 16384 + 64
        # the server stopped consuming requests, so they wait in its inbox instead
        assert len(b.inbox) > 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        await server.aclose()
