"""yamux core: stream lifecycle, the spec's window rules, ping, go-away, bounds, abuse."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latticaray.mesh.libp2p.errors import YamuxError
from latticaray.mesh.libp2p.yamux import (
    INITIAL_WINDOW,
    StreamState,
    YamuxCore,
    YamuxGoAway,
    YamuxPong,
    YamuxStreamData,
    YamuxStreamEnded,
    YamuxStreamOpened,
    YamuxStreamReset,
    YamuxTimeout,
    YamuxWindowOpened,
)

HDR = struct.Struct(">BBHII")


def frame(ftype, flags, sid, length, body=b""):
    return HDR.pack(0, ftype, flags, sid, length) + body


def _pair(**kw):
    return YamuxCore(True, **kw), YamuxCore(False, **kw)


def _xfer(src, dst, now=0.0):
    return dst.receive(src.data_to_send(), now)


def test_open_ack_data_fin_both_ways():
    c, s = _pair()
    sid = c.open_stream()
    assert sid == 1 and c.stream_state(sid) is StreamState.SYN_SENT
    assert _xfer(c, s) == [YamuxStreamOpened(1)]
    _xfer(s, c)
    assert c.stream_state(sid) is StreamState.ESTABLISHED
    assert c.send(sid, b"hello") == 5
    assert _xfer(c, s) == [YamuxStreamData(1, b"hello")]
    c.close_stream(sid)
    assert _xfer(c, s) == [YamuxStreamEnded(1)]
    assert s.stream_state(1) is StreamState.REMOTE_CLOSED
    s.send(1, b"bye")
    s.close_stream(1)
    assert s.stream_state(1) is None
    assert _xfer(s, c) == [YamuxStreamData(1, b"bye"), YamuxStreamEnded(1)]
    assert c.open_streams == 0 and s.open_streams == 0


def test_stream_ids_by_role():
    c, s = _pair()
    assert [c.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [s.open_stream() for _ in range(2)] == [2, 4]


def test_send_window_limits_and_grants_after_consumption():
    c, s = _pair()
    sid = c.open_stream()
    _xfer(c, s)
    _xfer(s, c)
    assert c.send(sid, b"x" * (INITIAL_WINDOW + 100)) == INITIAL_WINDOW
    assert c.send_window(sid) == 0 and c.send(sid, b"y") == 0
    events = _xfer(c, s)
    assert sum(len(e.data) for e in events if isinstance(e, YamuxStreamData)) == INITIAL_WINDOW
    s.consumed(sid, INITIAL_WINDOW // 2 - 1)
    assert s.data_to_send() == b""  # grants are batched until half the window is free
    s.consumed(sid, 1)
    assert _xfer(s, c) == [YamuxWindowOpened(sid)]
    assert c.send_window(sid) == INITIAL_WINDOW // 2


def test_larger_window_granted_with_syn_and_ack():
    c, s = _pair(stream_window=4 * INITIAL_WINDOW)
    sid = c.open_stream()
    _xfer(c, s)
    assert s.send_window(sid) == 4 * INITIAL_WINDOW
    _xfer(s, c)
    assert c.send_window(sid) == 4 * INITIAL_WINDOW


def test_window_overrun_is_a_protocol_error_with_go_away():
    c, s = _pair()
    sid = c.open_stream()
    _xfer(c, s)
    with pytest.raises(YamuxError, match="window"):
        s.receive(frame(0, 0, sid, INITIAL_WINDOW + 1), 0.0)
    assert s.data_to_send()[-12:] == frame(3, 0, 0, 1)  # Go Away, protocol error


def test_reset_and_late_data_dropped():
    c, s = _pair()
    sid = c.open_stream()
    _xfer(c, s)
    c.send(sid, b"late")
    s.reset_stream(sid)
    assert _xfer(s, c) == [YamuxStreamReset(sid)]
    assert _xfer(c, s) == []  # data for a stream we reset is discarded
    with pytest.raises(YamuxError):
        c.send(sid, b"more")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (HDR.pack(1, 0, 0, 1, 0), "version"),
        (frame(7, 0, 1, 0), "unknown"),
        (frame(0, 0, 0, 0), "stream 0"),
        (frame(1, 1, 2, 0), "parity"),  # a server-parity stream opened by the client
        (frame(2, 1, 5, 0), "Ping"),
        (frame(3, 0, 5, 0), "Go Away"),
    ],
)
def test_malformed_frames(data, match):
    s = YamuxCore(False)
    with pytest.raises(YamuxError, match=match):
        s.receive(data, 0.0)


def test_duplicate_syn_is_refused():
    s = YamuxCore(False)
    s.receive(frame(1, 1, 1, 0), 0.0)
    with pytest.raises(YamuxError, match="twice"):
        s.receive(frame(1, 1, 1, 0), 0.0)


def test_streams_beyond_the_limit_are_reset():
    s = YamuxCore(False, max_streams=2)
    events = s.receive(frame(1, 1, 1, 0) + frame(1, 1, 3, 0) + frame(1, 1, 5, 0), 0.0)
    assert events == [YamuxStreamOpened(1), YamuxStreamOpened(3)]
    assert s.data_to_send().endswith(frame(1, 8, 5, 0))


def test_ping_answered_and_measured():
    c, s = _pair()
    opaque = c.ping(10.0)
    _xfer(c, s)
    assert c.receive(s.data_to_send(), 10.25) == [YamuxPong(opaque, 0.25)]


def test_keepalive_pings_when_idle_and_times_out():
    c = YamuxCore(True, keepalive=5.0, ping_timeout=2.0)
    c.receive(b"", 0.0)
    assert c.get_timer() == 5.0
    assert c.handle_timer(5.0) == []
    assert c.data_to_send()[:2] == bytes([0, 2])  # a ping went out
    assert c.get_timer() == 7.0  # now waiting for the answer, not pinging again
    assert c.handle_timer(6.0) == [] and c.data_to_send() == b""
    assert c.handle_timer(7.5) == [YamuxTimeout()]


def test_go_away_received_stops_new_streams():
    c = YamuxCore(True)
    assert c.receive(frame(3, 0, 0, 0), 0.0) == [YamuxGoAway(0)]
    with pytest.raises(YamuxError, match="going away"):
        c.open_stream()


@given(st.lists(st.binary(max_size=5000), max_size=6), st.integers(1, 100))
def test_data_arrives_intact_at_any_chunking(chunks, step):
    c, s = _pair()
    sid = c.open_stream()
    sent = b""
    for chunk in chunks:
        taken = c.send(sid, chunk)
        sent += chunk[:taken]
    wire = c.data_to_send()
    got = b""
    for k in range(0, len(wire), step):
        for e in s.receive(wire[k : k + step], 0.0):
            if isinstance(e, YamuxStreamData):
                got += e.data
    assert got == sent


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_fuzz_raises_only_yamux_error(data):
    s = YamuxCore(False)
    try:
        s.receive(data, 0.0)
    except YamuxError:
        pass
