"""Backpressure: a stalled reader stops its writer and memory stays bounded (measured)."""

from __future__ import annotations

import asyncio
import tracemalloc

from test_rpc_support import memory_pipe, wait_until

from latticaray.mesh.rpc import MESSAGE_OVERHEAD, RpcLimits, RpcRouter, RpcSession

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
        print(
            f"\nstalled reader: producer made {produced} x 64 KiB, queued "
            f"{stream.queued_bytes} B, traced peak {peak / 1e6:.1f} MB"
        )
        assert peak < 16 * 1024 * 1024
        # Resuming the reader drains everything.
        count = 1
        async for _message in stream:
            count += 1
        assert count == 600 and produced == 600
    finally:
        tracemalloc.stop()
        await client.aclose()
        await server.aclose()


async def test_per_call_window_lets_a_bulk_reader_have_more_in_flight():
    """call_stream(window=...) raises that call's receive window (capped by max_stream_window):
    a stalled reader then lets the producer run ahead by that window, not the session default."""
    produced = 0
    router = RpcRouter()

    async def firehose(ctx, payload):
        nonlocal produced
        chunk = b"f" * MESSAGE
        for _ in range(200):
            produced += 1
            yield chunk

    router.register_server_stream("firehose", firehose)
    limits = RpcLimits(stream_window=WINDOW, max_stream_window=4 * WINDOW)
    a, b = memory_pipe(high_water=256 * 1024)
    client, server = RpcSession(a, RpcRouter(), limits), RpcSession(b, router, limits)
    per_message = MESSAGE + MESSAGE_OVERHEAD
    try:
        for asked, granted in ((3 * WINDOW, 3 * WINDOW), (64 * WINDOW, 4 * WINDOW)):
            produced = 0
            stream = client.call_stream("firehose", b"", timeout=60, window=asked)
            await wait_until(lambda: stream.queued_bytes >= granted - per_message, timeout=10)
            settled = produced
            for _ in range(50):
                await asyncio.sleep(0)
            assert produced == settled, "producer kept going although nobody reads"
            assert granted // per_message <= produced <= granted // per_message + 2
            assert stream.queued_bytes <= granted + per_message
            count = 0
            async for _ in stream:
                count += 1
            assert count == 200
    finally:
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


async def test_unread_replies_keep_server_memory_bounded():
    """Unary flood from a peer that does not read its replies: the server parks new calls once its
    send queue is above write_buffer_high, and stops reading only when the parked calls exceed
    max_concurrent_calls; everything it holds stays bounded."""
    router = RpcRouter()

    async def echo(ctx, payload):
        return payload

    router.register_unary("echo", echo, eager=True)
    limits = RpcLimits(write_buffer_high=1 << 20, close_timeout=0.2, max_concurrent_calls=100)
    a, b = memory_pipe(high_water=256 * 1024)
    client = RpcSession(a, RpcRouter(), RpcLimits(close_timeout=0.2))
    server = RpcSession(b, router, limits)
    # Stop the client from reading: its reader task is cancelled, so replies pile up in the pipe.
    client._reader_task.cancel()
    payload = b"q" * 16384
    tasks = [asyncio.ensure_future(client.call("echo", payload, timeout=30)) for _ in range(1000)]
    try:
        await wait_until(lambda: len(server.core.parked) > 100 and len(b.inbox) > 0, timeout=10)
        for _ in range(200):
            await asyncio.sleep(0)
        held = server.core.pending_bytes + server.core.parked_bytes
        print(
            f"\nunread replies: server send queue {server.core.pending_bytes} B, parked calls "
            f"{len(server.core.parked)} ({server.core.parked_bytes} B), unread requests "
            f"{len(b.inbox)} B, replies in pipe {len(a.inbox)} B"
        )
        assert server.core.pending_bytes <= limits.write_buffer_high + 16384 + 64
        assert len(server.core.parked) <= 100 + 256 * 1024 // 16384 + 1
        assert held < 4 * 1024 * 1024
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        await server.aclose()


async def test_two_peers_flooding_each_other_do_not_deadlock():
    """Both sides call each other with large payloads at once; neither may stop reading."""
    router = RpcRouter()

    async def echo(ctx, payload):
        return payload

    router.register_unary("echo", echo, eager=True)
    limits = RpcLimits(write_buffer_high=512 * 1024)
    a, b = memory_pipe(high_water=256 * 1024)
    left, right = RpcSession(a, router, limits), RpcSession(b, router, limits)
    payload = b"p" * 200_000
    try:
        calls = [left.call("echo", payload, timeout=60) for _ in range(100)]
        calls += [right.call("echo", payload, timeout=60) for _ in range(100)]
        replies = await asyncio.wait_for(asyncio.gather(*calls), 60)
        assert all(r == payload for r in replies)
    finally:
        await left.aclose()
        await right.aclose()


async def test_deadline_entries_of_finished_calls_are_dropped():
    """Finished calls leave their deadline entry behind (lazy removal); the session compacts them
    so a long-lived connection does not accumulate one entry per call ever made."""
    router = RpcRouter()

    async def echo(ctx, payload):
        return payload

    router.register_unary("echo", echo, eager=True)
    a, b = memory_pipe()
    client, server = RpcSession(a, RpcRouter()), RpcSession(b, router)
    try:
        for _ in range(5):
            await asyncio.gather(*(client.call("echo", b"x", timeout=60) for _ in range(2000)))
        assert len(client.core.deadlines) <= 4096 + 2000
        assert client.active_calls == 0
    finally:
        await client.aclose()
        await server.aclose()


async def test_unary_flood_keeps_the_send_queue_under_its_limit():
    """1000 callers with 64 KiB requests: however the wakeups interleave, the caller's send queue
    never holds more than write_buffer_high plus one message per sender woken at the limit."""
    router = RpcRouter()

    async def echo(ctx, payload):
        await asyncio.sleep(0)
        return payload[:16]

    router.register_unary("echo", echo)
    limits = RpcLimits(write_buffer_high=512 * 1024)
    a, b = memory_pipe(high_water=128 * 1024)
    client, server = RpcSession(a, RpcRouter(), limits), RpcSession(b, router)
    payload = b"r" * 65536
    peak = 0
    done = False

    async def sample():
        nonlocal peak
        for _ in range(1_000_000):  # bounded; ends when the flood is over
            peak = max(peak, client.core.pending_bytes)
            if done:
                return
            await asyncio.sleep(0)

    sampler = asyncio.ensure_future(sample())
    try:
        replies = await asyncio.wait_for(
            asyncio.gather(*(client.call("echo", payload, timeout=60) for _ in range(1000))), 60
        )
        assert replies == [b"r" * 16] * 1000
        done = True
        await asyncio.wait_for(sampler, 10)
        print(f"\nunary flood: peak send queue {peak / 1e6:.2f} MB (limit 0.52 MB)")
        assert peak <= limits.write_buffer_high + 2 * (65536 + 64)
    finally:
        sampler.cancel()
        await client.aclose()
        await server.aclose()


async def test_stream_call_opened_while_the_server_queue_is_full_loses_no_message():
    """The server parks new calls while its send queue is full; the messages a client stream
    sends right after its OPEN wait with it (they used to be dropped as frames of an unknown
    call, and the handler then waited forever)."""
    router = RpcRouter()

    async def big(ctx, payload):
        return b"b" * 65536

    async def total(ctx, requests):
        n = 0
        async for message in requests:
            n += len(message)
        return str(n).encode()

    router.register_unary("big", big, eager=True)
    router.register_client_stream("total", total)
    a, b = memory_pipe(high_water=64 * 1024)
    gate = asyncio.Event()
    read = a.read

    async def gated_read(max_bytes):
        await gate.wait()  # the client reads nothing until the gate opens
        return await read(max_bytes)

    a.read = gated_read
    client = RpcSession(a, RpcRouter())
    server = RpcSession(b, router, RpcLimits(write_buffer_high=128 * 1024))
    try:
        bigs = []
        for _ in range(64):  # until the server's writer is stuck and replies pile up
            bigs.append(asyncio.ensure_future(client.call("big", b"", timeout=30)))
            await asyncio.sleep(0.01)
            if server.core.pending_bytes > 128 * 1024:
                break
        assert server.core.pending_bytes > 128 * 1024
        stream = client.call_client_stream("total", timeout=30)
        for _ in range(3):
            await stream.send(b"x" * 1000)
        stream.end()
        await wait_until(lambda: len(server.core.parked) >= 5, 10)  # OPEN, 3 messages, END
        gate.set()
        assert await asyncio.wait_for(stream.result(), 20) == b"3000"
        assert all(len(r) == 65536 for r in await asyncio.gather(*bigs))
    finally:
        gate.set()
        await client.aclose()
        await server.aclose()
