"""RpcSession over an in-memory channel: every call kind, deadlines, cancellation, errors."""

from __future__ import annotations

import asyncio

import pytest
from test_rpc_support import memory_pipe, wait_until

from latticaray.mesh.errors import (
    ConnectionClosed,
    FrameTooLarge,
    RpcCancelled,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
    RpcUnimplemented,
)
from latticaray.mesh.rpc import RpcLimits, RpcRouter, RpcSession, Status


def make_router() -> RpcRouter:
    router = RpcRouter()

    async def echo(ctx, payload):
        return payload

    async def slow_echo(ctx, payload):
        await asyncio.sleep(0)
        return payload

    async def whoami(ctx, payload):
        return str(ctx.peer_id).encode()

    async def fail(ctx, payload):
        raise ValueError("bad input: " + payload.decode())

    async def abort(ctx, payload):
        ctx.abort(Status.PERMISSION_DENIED, "not for you")

    async def count(ctx, payload):
        for i in range(int(payload)):
            yield str(i).encode()

    async def count_then_fail(ctx, payload):
        yield b"first"
        raise RuntimeError("stream broke")

    async def total(ctx, requests):
        n = 0
        async for message in requests:
            n += len(message)
        return str(n).encode()

    async def upper(ctx, requests):
        async for message in requests:
            yield message.upper()

    router.register_unary("echo", echo, eager=True)
    router.register_unary("slow_echo", slow_echo)
    router.register_unary("whoami", whoami)
    router.register_unary("fail", fail)
    router.register_unary("abort", abort)
    router.register_server_stream("count", count)
    router.register_server_stream("count_then_fail", count_then_fail)
    router.register_client_stream("total", total)
    router.register_bidi("upper", upper)
    return router


@pytest.fixture
async def pair():
    a, b = memory_pipe()
    router = make_router()
    client = RpcSession(a, RpcRouter())
    server = RpcSession(b, router)
    yield client, server, router
    await client.aclose()
    await server.aclose()


async def test_unary_roundtrip_eager_and_task(pair):
    client, _server, _ = pair
    assert await client.call("echo", b"hello", timeout=5) == b"hello"
    assert await client.call("slow_echo", b"x" * 100_000, timeout=5) == b"x" * 100_000
    assert await client.call("echo", b"", timeout=5) == b""
    assert await client.call("whoami", timeout=5) == str(client.channel.local_peer).encode()


async def test_both_ends_can_call(pair):
    client, server, _router = pair

    async def ping(ctx, payload):
        return b"pong"

    client.router.register_unary("ping", ping)
    assert await server.call("ping", b"", timeout=5) == b"pong"
    assert await client.call("echo", b"1", timeout=5) == b"1"


async def test_handler_exception_comes_back_typed_with_traceback(pair):
    client, _, _ = pair
    with pytest.raises(RpcError) as info:
        await client.call("fail", b"zzz", timeout=5)
    assert info.value.code == Status.INTERNAL
    assert "ValueError: bad input: zzz" in info.value.message
    assert "in fail" in info.value.remote_traceback
    with pytest.raises(RpcError) as info:
        await client.call("abort", b"", timeout=5)
    assert info.value.code == Status.PERMISSION_DENIED and info.value.message == "not for you"


async def test_unknown_service_and_wrong_kind_are_unimplemented(pair):
    client, _, _ = pair
    with pytest.raises(RpcUnimplemented, match="no service 'nope'"):
        await client.call("nope", b"", timeout=5)
    with pytest.raises(RpcUnimplemented, match="server-stream, called as unary"):
        await client.call("count", b"3", timeout=5)
    with pytest.raises(RpcUnimplemented):
        async for _ in client.call_stream("nope", b"", timeout=5):
            pass
    # the session survives all of these
    assert await client.call("echo", b"ok", timeout=5) == b"ok"


async def test_deadline_cancels_server_handler(pair):
    client, server, router = pair
    started, cancelled = asyncio.Event(), asyncio.Event()
    seen = {}

    async def hang(ctx, payload):
        started.set()
        seen["ctx"] = ctx
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    router.register_unary("hang", hang)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(RpcTimeout):
        await client.call("hang", b"", timeout=0.3)
    assert loop.time() - t0 < 5.0
    await asyncio.wait_for(cancelled.wait(), 5)
    assert seen["ctx"].cancelled
    assert seen["ctx"].deadline <= loop.time() + 0.01
    await wait_until(lambda: server.active_calls == 0 and client.active_calls == 0)


async def test_server_enforces_deadline_it_was_sent(pair):
    """The server cancels the handler by itself at the deadline even if the client's CANCEL is
    lost (here: the client's timer is disabled by using a long local wait)."""
    client, _server, router = pair
    cancelled = asyncio.Event()

    async def hang(ctx, payload):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    router.register_unary("hang", hang)
    client._on_timer = lambda: None  # simulate a caller whose own timer never fires
    task = asyncio.ensure_future(client.call("hang", b"", timeout=0.2))
    with pytest.raises(RpcTimeout, match="remote"):
        await asyncio.wait_for(task, 10)
    assert cancelled.is_set()


async def test_client_cancellation_cancels_server_handler(pair):
    client, _, router = pair
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(ctx, payload):
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    router.register_unary("hang", hang)
    task = asyncio.ensure_future(client.call("hang", b"", timeout=60))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_server_stream(pair):
    client, _, _ = pair
    items = [m async for m in client.call_stream("count", b"100", timeout=5)]
    assert items == [str(i).encode() for i in range(100)]
    assert client.active_calls == 0


async def test_server_stream_error_after_items(pair):
    client, _, _ = pair
    got = []
    with pytest.raises(RpcError, match="RuntimeError: stream broke"):
        async for m in client.call_stream("count_then_fail", b"", timeout=5):
            got.append(m)
    assert got == [b"first"]


async def test_server_stream_deadline_and_cancel(pair):
    client, server, router = pair
    finished = asyncio.Event()

    async def forever(ctx, payload):
        try:
            i = 0
            while True:
                yield str(i).encode()
                i += 1
                await asyncio.sleep(0.01)
        finally:
            finished.set()

    router.register_server_stream("forever", forever)
    got = 0
    with pytest.raises(RpcTimeout):
        async for _ in client.call_stream("forever", b"", timeout=0.3):
            got += 1
    assert got > 0
    await asyncio.wait_for(finished.wait(), 5)

    finished.clear()
    async with client.call_stream("forever", b"", timeout=30) as stream:
        async for _ in stream:
            break
    # leaving the block cancelled it: the server generator is closed
    await asyncio.wait_for(finished.wait(), 5)
    await wait_until(lambda: server.active_calls == 0)


async def test_client_stream(pair):
    client, _, _ = pair
    call = client.call_client_stream("total", timeout=5)
    for _ in range(50):
        await call.send(b"x" * 1000)
    assert await call.result() == b"50000"


async def test_bidi(pair):
    client, _, _ = pair
    call = client.call_bidi("upper", timeout=5)
    replies = []
    for word in (b"a", b"bc", b"def"):
        await call.send(word)
        replies.append(await call.__anext__())
    call.end()
    assert [m async for m in call] == []
    assert replies == [b"A", b"BC", b"DEF"]


async def test_bidi_server_abort_raises_on_client(pair):
    client, _, router = pair

    async def picky(ctx, requests):
        async for message in requests:
            if message == b"bad":
                ctx.abort(Status.INVALID_ARGUMENT, "bad message")
            yield message

    router.register_bidi("picky", picky)
    call = client.call_bidi("picky", timeout=5)
    await call.send(b"good")
    assert await call.__anext__() == b"good"
    await call.send(b"bad")
    with pytest.raises(RpcError) as info:
        await call.__anext__()
    assert info.value.code == Status.INVALID_ARGUMENT
    with pytest.raises(RpcError):
        await call.send(b"more")


async def test_thousand_concurrent_calls(pair):
    client, _, _ = pair
    payloads = [i.to_bytes(4, "big") * 32 for i in range(1000)]
    replies = await asyncio.gather(*(client.call("slow_echo", p, timeout=30) for p in payloads))
    assert replies == payloads
    replies = await asyncio.gather(*(client.call("echo", p, timeout=30) for p in payloads))
    assert replies == payloads


async def test_outgoing_calls_beyond_limit_wait_for_a_slot():
    a, b = memory_pipe()
    router = make_router()
    limits = RpcLimits(max_concurrent_calls=8)
    client, server = RpcSession(a, RpcRouter(), limits), RpcSession(b, router, limits)
    try:
        replies = await asyncio.gather(
            *(client.call("slow_echo", bytes([i]), timeout=10) for i in range(100))
        )
        assert replies == [bytes([i]) for i in range(100)]
    finally:
        await client.aclose()
        await server.aclose()


async def test_server_rejects_calls_beyond_its_limit():
    a, b = memory_pipe()
    router = make_router()
    release = asyncio.Event()

    async def block(ctx, payload):
        await release.wait()
        return b"done"

    router.register_unary("block", block)
    client = RpcSession(a, RpcRouter(), RpcLimits(max_concurrent_calls=100))
    server = RpcSession(b, router, RpcLimits(max_concurrent_calls=4))
    try:
        tasks = [asyncio.ensure_future(client.call("block", b"", timeout=10)) for _ in range(4)]
        await wait_until(lambda: server.active_calls == 4)
        with pytest.raises(RpcError) as info:
            await client.call("block", b"", timeout=10)
        assert info.value.code == Status.RESOURCE_EXHAUSTED
        release.set()
        assert await asyncio.gather(*tasks) == [b"done"] * 4
    finally:
        await client.aclose()
        await server.aclose()


async def test_oversize_message_refused_locally():
    small = RpcLimits(max_frame_size=4096)
    a, b = memory_pipe()
    client, server = RpcSession(a, RpcRouter(), small), RpcSession(b, make_router(), small)
    try:
        with pytest.raises(FrameTooLarge, match="client stream"):
            await client.call("echo", b"x" * 5000, timeout=5)
        stream = client.call_client_stream("total", timeout=5)
        with pytest.raises(FrameTooLarge):
            await stream.send(b"x" * 5000)
        stream.cancel()
        assert await client.call("echo", b"x" * 4096, timeout=5) == b"x" * 4096
    finally:
        await client.aclose()
        await server.aclose()


async def test_reply_larger_than_peer_limit_is_an_error_not_a_crash():
    a, b = memory_pipe()
    router = RpcRouter()

    async def big(ctx, payload):
        return b"z" * 10_000

    router.register_unary("big", big)
    client = RpcSession(a, RpcRouter(), RpcLimits(max_frame_size=1 << 20))
    server = RpcSession(b, router, RpcLimits(max_frame_size=4096))
    try:
        with pytest.raises(RpcError) as info:
            await client.call("big", b"", timeout=5)
        assert info.value.code == Status.RESOURCE_EXHAUSTED
        assert "use a server stream" in info.value.message
    finally:
        await client.aclose()
        await server.aclose()


async def test_dead_channel_fails_inflight_calls_promptly(pair):
    client, server, router = pair
    started = asyncio.Event()

    async def hang(ctx, payload):
        started.set()
        await asyncio.sleep(3600)
        return b""

    async def drip(ctx, payload):
        while True:
            yield b"."
            await asyncio.sleep(0.01)

    router.register_unary("hang", hang)
    router.register_server_stream("drip", drip)
    unary = asyncio.ensure_future(client.call("hang", b"", timeout=60))
    stream = client.call_stream("drip", b"", timeout=60)
    assert await stream.__anext__() == b"."
    await asyncio.wait_for(started.wait(), 5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    server.channel.abort()  # the server end vanishes
    with pytest.raises(RpcConnectionLost):
        await asyncio.wait_for(unary, 5)
    with pytest.raises(ConnectionClosed):
        async for _ in stream:
            pass
    assert loop.time() - t0 < 2.0
    assert client.closed
    with pytest.raises(RpcConnectionLost):
        await client.call("echo", b"", timeout=1)


async def test_close_callbacks_and_goaway(pair):
    client, server, _ = pair
    closed = []
    client.on_close(closed.append)
    await server.aclose("node shutting down")
    await asyncio.wait_for(client.wait_closed(), 5)
    assert closed == [client]
    assert "node shutting down" in client.close_reason


async def test_a_gracefully_closed_session_is_not_kept_alive_by_its_close_timeout():
    import gc
    import weakref

    a, b = memory_pipe()
    client = RpcSession(a, RpcRouter(), RpcLimits(close_timeout=60.0))
    server = RpcSession(b, make_router())
    assert await client.call("echo", b"x", timeout=10) == b"x"
    client.close("done")  # GOAWAY queued: the writer flushes it, bounded by close_timeout
    await asyncio.wait_for(client.wait_closed(), 5)
    await asyncio.wait_for(server.wait_closed(), 5)
    gone = weakref.ref(client)
    del client, a
    gc.collect()
    assert gone() is None


async def test_calls_made_while_closing_fail_at_once(pair):
    client, server, _ = pair
    client.close("going away")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(RpcConnectionLost, match="going away"):
        await client.call("echo", b"", timeout=30)
    with pytest.raises(RpcConnectionLost):
        client.call_stream("count", b"3", timeout=30)
    assert loop.time() - t0 < 1.0
    await asyncio.wait_for(server.wait_closed(), 5)


async def test_invalid_timeout_rejected(pair):
    client, _, _ = pair
    with pytest.raises(ValueError):
        await client.call("echo", b"", timeout=0)


def test_router_validates_handlers():
    router = RpcRouter()

    def not_async(ctx, payload):
        return b""

    async def gen(ctx, payload):
        yield b""

    with pytest.raises(TypeError):
        router.register_unary("x", not_async)
    with pytest.raises(TypeError):
        router.register_server_stream("x", not_async)
    router.register_server_stream("x", gen)
    with pytest.raises(ValueError, match="already registered"):
        router.register_server_stream("x", gen)
    with pytest.raises(ValueError):
        router.register_bidi("", gen)
    assert router.services() == ["x"]


@pytest.mark.parametrize("kind", ["client_stream", "bidi"])
async def test_streaming_call_deadline_and_cancellation_reach_the_handler(pair, kind):
    client, server, router = pair
    cancelled = asyncio.Event()
    got_first = asyncio.Event()

    async def stuck_sink(ctx, requests):
        async for _ in requests:
            got_first.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                assert ctx.cancelled
                cancelled.set()
                raise
        return b""

    async def stuck_bidi(ctx, requests):
        async for message in requests:
            yield message
            got_first.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                assert ctx.cancelled
                cancelled.set()
                raise

    if kind == "client_stream":
        router.register_client_stream("stuck", stuck_sink)
        open_call = client.call_client_stream
    else:
        router.register_bidi("stuck", stuck_bidi)
        open_call = client.call_bidi

    # 1. the deadline passes: the caller raises RpcTimeout, the handler is cancelled
    call = open_call("stuck", timeout=0.3)
    await call.send(b"one")
    await asyncio.wait_for(got_first.wait(), 5)
    with pytest.raises(RpcTimeout):
        if kind == "client_stream":
            await call.result()
        else:
            assert await call.__anext__() == b"one"
            await call.__anext__()
    await asyncio.wait_for(cancelled.wait(), 5)

    # 2. the caller cancels: the handler is cancelled, the caller's reads raise RpcCancelled
    got_first.clear()
    cancelled.clear()
    call = open_call("stuck", timeout=30)
    await call.send(b"two")
    await asyncio.wait_for(got_first.wait(), 5)
    call.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
    with pytest.raises(RpcCancelled):
        await call.__anext__()
    await wait_until(lambda: server.active_calls == 0 and client.active_calls == 0)


async def test_client_stream_handler_error_is_typed(pair):
    client, _, router = pair

    async def strict(ctx, requests):
        async for message in requests:
            if message != b"ok":
                raise RpcError(Status.INVALID_ARGUMENT, f"bad item {message!r}")
        return b"fine"

    router.register_client_stream("strict", strict)
    call = client.call_client_stream("strict", timeout=5)
    await call.send(b"ok")
    await call.send(b"nope")
    with pytest.raises(RpcError) as info:
        await call.result()
    assert info.value.code == Status.INVALID_ARGUMENT and "nope" in info.value.message


async def test_eager_handler_that_awaits_is_cancellable_and_returns(pair):
    """An eager handler that suspends continues as a task: its reply, its exceptions, deadline
    and caller cancellation all behave as for a normal handler."""
    client, server, router = pair
    cancelled = asyncio.Event()
    release = asyncio.Event()

    async def eager_wait(ctx, payload):
        if payload == b"hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        await release.wait()
        if payload == b"boom":
            raise KeyError("late failure")
        return payload * 2

    router.register_unary("eager_wait", eager_wait, eager=True)
    pending = asyncio.ensure_future(client.call("eager_wait", b"ab", timeout=10))
    failing = asyncio.ensure_future(client.call("eager_wait", b"boom", timeout=10))
    await wait_until(lambda: server.active_calls == 2)
    release.set()
    assert await pending == b"abab"
    with pytest.raises(RpcError, match="KeyError"):
        await failing
    with pytest.raises(RpcTimeout):
        await client.call("eager_wait", b"hang", timeout=0.2)
    await asyncio.wait_for(cancelled.wait(), 5)
    cancelled.clear()
    task = asyncio.ensure_future(client.call("eager_wait", b"hang", timeout=30))
    await wait_until(lambda: server.active_calls == 1)
    task.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
    await wait_until(lambda: server.active_calls == 0)


async def test_eager_handler_cannot_capture_the_session_reader(pair):
    """asyncio.timeout() before the first await of an eager handler must not bind to (and later
    cancel) the session's reader task: it fails that call loudly, the session keeps working."""
    client, server, router = pair

    async def careless(ctx, payload):
        async with asyncio.timeout(0.05):
            await asyncio.sleep(1)
        return b"unreachable"

    router.register_unary("careless", careless, eager=True)
    with pytest.raises(RpcError) as info:
        await client.call("careless", b"", timeout=5)
    assert info.value.code == Status.INTERNAL and "RuntimeError" in info.value.message
    await asyncio.sleep(0.1)  # past the timeout the handler asked for
    assert not server._reader_task.done()
    assert await client.call("echo", b"still here", timeout=5) == b"still here"
