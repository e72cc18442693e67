"""Frame codec and hostile input: malformed/oversize frames close one session, never the node."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rpc_support import memory_pipe

from latticaray.mesh import framing
from latticaray.mesh.errors import FrameTooLarge, ProtocolViolation, RpcConnectionLost
from latticaray.mesh.framing import FrameDecoder, encode_frame
from latticaray.mesh.rpc import RpcRouter, RpcSession


def frames_bytes(*frames) -> bytes:
    return b"".join(b"".join(bytes(p) for p in encode_frame(h, pl)) for h, pl in frames)


def test_roundtrip_byte_by_byte_and_in_one_piece():
    big = bytes(range(256)) * 100
    frames = [
        ([framing.OPEN, 1, 3, "svc", framing.UNARY, 5000], b"hello"),
        ([framing.MESSAGE, 1, 7], big),
        ([framing.CREDIT, 9, 0, 1234], b""),
        ([framing.ERROR, 2, 4, "INTERNAL", "boom"], b"traceback"),
    ]
    wire = frames_bytes(*frames)
    whole = FrameDecoder(1 << 20).feed(wire)
    assert [(h, bytes(p)) for h, p in whole] == frames
    decoder = FrameDecoder(1 << 20)
    got = []
    for i in range(len(wire)):
        got.extend(decoder.feed(wire[i : i + 1]))
    assert [(h, bytes(p)) for h, p in got] == frames
    assert decoder.buffered == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200_000), min_size=1, max_size=40))
def test_large_frames_survive_any_chunking(cuts):
    big1 = bytes(range(256)) * 1200  # 300 KiB: collected as chunks
    big2 = b"\x07" * (framing.LARGE_PAYLOAD)  # exactly the threshold
    frames = [
        ([framing.MESSAGE, 1, 2], big1),
        ([framing.MESSAGE, 2, 2], b"small"),
        ([framing.MESSAGE, 3, 3], big2),
        ([framing.CANCEL, 4, 0], b""),
    ]
    wire = frames_bytes(*frames)
    decoder = FrameDecoder(1 << 20)
    got, pos = [], 0
    for cut in cuts:
        got.extend(decoder.feed(wire[pos : pos + cut]))
        pos += cut
        if pos >= len(wire):
            break
    if pos < len(wire):
        got.extend(decoder.feed(wire[pos:]))
    assert [(h, bytes(p)) for h, p in got] == frames
    assert decoder.buffered == 0


def test_large_payload_is_a_separate_write_piece():
    payload = b"p" * (framing.INLINE_PAYLOAD + 1)
    pieces = encode_frame([framing.MESSAGE, 1, 2], payload)
    assert len(pieces) == 2 and pieces[1] is payload


@pytest.mark.parametrize(
    "wire, message",
    [
        (struct.pack("!IH", 100 << 20, 5), "exceeds the limit"),
        (struct.pack("!IH", 10, 0) + b"\0" * 10, "header length"),
        (struct.pack("!IH", 10, 20) + b"\0" * 10, "header length"),
        (struct.pack("!IH", 5, 3) + b"\xc1\xc1\xc1", "not valid msgpack"),
        (struct.pack("!IH", 3, 1) + msgpack.packb(7), "must be an array"),
        (frames_bytes(([99, 1, 0], b"")), "unknown frame kind"),
        (frames_bytes(([framing.OPEN, 1, 0], b"")), "needs 6"),
        (frames_bytes(([framing.MESSAGE, -1, 0], b"")), "invalid call id"),
        (frames_bytes(([framing.MESSAGE, 1, 999], b"")), "invalid flags"),
        (frames_bytes(([framing.OPEN, 1, 0, "", 0, 10], b"")), "service name"),
        (frames_bytes(([framing.OPEN, 1, 0, "s", 9, 10], b"")), "call type"),
        (frames_bytes(([framing.OPEN, 1, 0, "s", 0, -1], b"")), "timeout"),
        (frames_bytes(([framing.CREDIT, 1, 0, 0], b"")), "grant"),
        (frames_bytes(([framing.ERROR, 1, 0, 5, "x"], b"")), "string code"),
    ],
)
def test_malformed_frames_raise_protocol_violation(wire, message):
    with pytest.raises(ProtocolViolation, match=message):
        FrameDecoder(16 << 20).feed(wire)


def test_oversize_frame_detected_from_prefix_alone():
    decoder = FrameDecoder(1024)
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack("!IH", 10_000, 3))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_protocol_violation(data):
    decoder = FrameDecoder(1 << 16)
    try:
        for header, _ in decoder.feed(data):
            assert isinstance(header, list)
    except ProtocolViolation:
        pass
    assert decoder.buffered <= len(data)


async def _session_pair(router=None):
    a, b = memory_pipe()
    if router is None:
        router = RpcRouter()

        async def echo(ctx, payload):
            return payload

        router.register_unary("echo", echo)
    return RpcSession(a, RpcRouter()), RpcSession(b, router), router


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack("!IH", 1 << 30, 4) + b"abcd",  # claims a 1 GiB frame
        struct.pack("!IH", 6, 4) + b"\xc1\xc1\xc1\xc1",  # invalid msgpack header
        frames_bytes(
            ([framing.OPEN, 1, 3, "echo", 0, 100], b"x"),
            ([framing.OPEN, 1, 3, "echo", 0, 100], b"y"),
        )
        * 0
        + frames_bytes(([42, 1, 0], b"")),  # unknown kind
    ],
)
async def test_bad_frames_close_only_that_session(garbage):
    router = RpcRouter()

    async def echo(ctx, payload):
        return payload

    router.register_unary("echo", echo)
    victim_client, victim_server, _ = await _session_pair(router)
    other_client, other_server, _ = await _session_pair(router)
    try:
        assert await victim_client.call("echo", b"1", timeout=5) == b"1"
        # an attacker writes raw garbage on the victim's channel instead of frames
        victim_client.channel.write(garbage)
        await asyncio.wait_for(victim_server.wait_closed(), 5)
        assert "protocol violation" in victim_server.close_reason
        # the peer was told why (GOAWAY) before the channel closed
        await asyncio.wait_for(victim_client.wait_closed(), 5)
        assert "PROTOCOL_VIOLATION" in victim_client.close_reason
        with pytest.raises(RpcConnectionLost):
            await victim_client.call("echo", b"2", timeout=5)
        # another session served by the same router is untouched
        assert await other_client.call("echo", b"3", timeout=5) == b"3"
    finally:
        for s in (victim_client, victim_server, other_client, other_server):
            await s.aclose()


async def test_duplicate_call_id_is_a_violation():
    router = RpcRouter()
    release = asyncio.Event()

    async def block(ctx, payload):
        await release.wait()
        return b""

    router.register_unary("block", block)
    client, server, _ = await _session_pair(router)
    try:
        open_frame = ([framing.OPEN, 77, 3, "block", 0, 10_000], b"")
        client.channel.write(frames_bytes(open_frame, open_frame))
        await asyncio.wait_for(server.wait_closed(), 5)
        assert "opened twice" in server.close_reason
    finally:
        release.set()
        await client.aclose()
        await server.aclose()


async def test_peer_ignoring_flow_control_is_cut_off():
    """A sender that overruns a stream's window (more than window + one frame unread) is a
    protocol violation: the receiver's memory stays bounded."""
    router = RpcRouter()
    got_first = asyncio.Event()

    async def stall(ctx, requests):
        await requests.__anext__()
        got_first.set()
        await asyncio.sleep(3600)
        return b""

    router.register_client_stream("stall", stall)
    client, server, _ = await _session_pair(router)
    try:
        call = client.call_client_stream("stall", timeout=30)
        await call.send(b"hi")
        await asyncio.wait_for(got_first.wait(), 5)
        chunk = b"x" * (1 << 20)
        raw = frames_bytes(*[([framing.MESSAGE, call.call_id, framing.FLAG_MSG], chunk)] * 40)
        client.channel.write(raw)  # bypasses the client's own credit accounting
        await asyncio.wait_for(server.wait_closed(), 5)
        assert "overran the stream window" in server.close_reason
    finally:
        await client.aclose()
        await server.aclose()


_header_strategy = st.one_of(
    st.tuples(
        st.just(framing.OPEN),
        st.integers(0, 5),
        st.integers(0, 7),
        st.sampled_from(["echo", "stream", "sink", "nope"]),
        st.integers(0, 3),
        st.integers(0, 3000),
    ).map(list),
    st.tuples(st.just(framing.MESSAGE), st.integers(0, 5), st.integers(0, 7)).map(list),
    st.tuples(
        st.just(framing.CREDIT), st.integers(0, 5), st.integers(0, 7), st.integers(1, 1 << 20)
    ).map(list),
    st.tuples(st.just(framing.CANCEL), st.integers(0, 5), st.integers(0, 7)).map(list),
    st.tuples(
        st.just(framing.ERROR),
        st.integers(0, 5),
        st.integers(0, 7),
        st.sampled_from(["INTERNAL", "X"]),
        st.text(max_size=20),
    ).map(list),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_header_strategy, st.binary(max_size=64)), max_size=25))
def test_random_frame_sequences_never_break_the_node(frames):
    """Well-formed frames in any order (duplicate ids, stray messages, credits, cancels, errors
    for unknown calls): the session either keeps serving or closes with a protocol violation;
    no handler or session task dies with an unexpected error."""

    async def scenario():
        router = RpcRouter()

        async def echo(ctx, payload):
            return payload

        async def stream(ctx, payload):
            for _ in range(3):
                yield b"s"

        async def sink(ctx, requests):
            n = 0
            async for message in requests:
                n += len(message)
            return str(n).encode()

        router.register_unary("echo", echo)
        router.register_server_stream("stream", stream)
        router.register_client_stream("sink", sink)
        loop = asyncio.get_running_loop()
        unexpected = []
        loop.set_exception_handler(lambda _loop, context: unexpected.append(context))
        attacker, victim, _ = await _session_pair(router)
        attacker.core.last_call_id = 1000  # its own calls must not collide with the raw frames
        attacker.channel.write(frames_bytes(*[(h, p) for h, p in frames]))
        for _ in range(20):
            await asyncio.sleep(0)
        if victim.closed or victim.core.closing:
            assert "protocol violation" in victim.close_reason
        else:
            # the same session still serves calls
            assert await attacker.call("echo", b"alive", timeout=5) == b"alive"
        await attacker.aclose()
        await victim.aclose()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not unexpected, unexpected

    asyncio.run(scenario())


async def test_peer_stalling_mid_frame_is_cut_off_at_the_frame_deadline():
    router = RpcRouter()

    async def echo(ctx, payload):
        return payload

    router.register_unary("echo", echo)
    a, b = memory_pipe()
    from latticaray.mesh.rpc import RpcLimits

    client = RpcSession(a, RpcRouter())
    server = RpcSession(b, router, RpcLimits(frame_timeout=0.3))
    try:
        assert await client.call("echo", b"1", timeout=5) == b"1"
        # the start of a 1 MiB frame, then silence (the connection itself stays open)
        wire = frames_bytes(([framing.MESSAGE, 5, framing.FLAG_MSG], b"z" * (1 << 20)))
        client.channel.write(wire[:100_000])
        await asyncio.wait_for(server.wait_closed(), 10)
        assert "part of a frame" in server.close_reason
    finally:
        await client.aclose()
        await server.aclose()
