"""The sans-I/O RPC core (RpcConnection) on its own: no event loop, no channel, time is a number."""

from __future__ import annotations

import pytest

from latticaray.mesh import framing
from latticaray.mesh.errors import (
    FrameTooLarge,
    ProtocolViolation,
    RpcCancelled,
    RpcConnectionLost,
    RpcError,
    RpcTimeout,
    RpcUnimplemented,
    Status,
)
from latticaray.mesh.framing import (
    BIDI,
    CANCEL,
    CLIENT_STREAM,
    CREDIT,
    ERROR,
    FLAG_END,
    FLAG_MSG,
    FLAG_RESPONSE,
    GOAWAY,
    MESSAGE,
    OPEN,
    SERVER_STREAM,
    UNARY,
    FrameDecoder,
)
from latticaray.mesh.rpccore import (
    CALL_CANCELLED,
    CALL_OPENED,
    EXPIRED_INCOMING,
    EXPIRED_STREAM,
    EXPIRED_UNARY,
    GOAWAY_RECEIVED,
    REPLY,
    STREAM_CREDIT,
    STREAM_ENDED,
    STREAM_FAILED,
    STREAM_MESSAGE,
    UNARY_FAILED,
    RpcConnection,
    SessionState,
    error_from_frame,
)
from latticaray.mesh.rpcflow import INITIAL_WINDOW, RpcLimits


async def _unary(ctx, payload):  # never run: the core only hands the handler back
    return payload


async def _stream(ctx, payload):
    yield payload


SERVICES = {"echo": (UNARY, _unary, True), "count": (SERVER_STREAM, _stream, False)}


def make(**limits) -> RpcConnection:
    return RpcConnection(RpcLimits(**limits), SERVICES.get, local_name="me")


def sent(core: RpcConnection) -> list[tuple[list, bytes]]:
    """Decode and take everything the core queued."""
    pieces, _ = core.take_output()
    frames = FrameDecoder(core.limits.max_frame_size).feed(b"".join(bytes(p) for p in pieces))
    return [(h, bytes(p)) for h, p in frames]


def open_frame(call_id, service="echo", call_type=UNARY, timeout_ms=5000, flags=None):
    if flags is None:
        flags = FLAG_MSG | FLAG_END if call_type in (UNARY, SERVER_STREAM) else 0
    return [OPEN, call_id, flags, service, call_type, timeout_ms]


# -- outgoing calls ------------------------------------------------------------------------------
def test_unary_call_gets_a_fresh_id_an_open_frame_and_its_reply():
    core = make()
    first, deadline = core.open_unary("echo", b"hi", 2.0, now=100.0, future="F1")
    second, _ = core.open_unary("echo", b"yo", None, now=100.0, future="F2")
    assert (first, second) == (1, 2) and deadline == 102.0
    frames = sent(core)
    assert frames[0] == ([OPEN, 1, FLAG_MSG | FLAG_END, "echo", UNARY, 2001], b"hi")
    assert frames[1][0][5] == 30_001  # the default timeout travels when none was given
    assert core.get_timer() == 102.0
    reply = [MESSAGE, 1, FLAG_MSG | FLAG_END | FLAG_RESPONSE]
    assert core.receive_frame(reply, b"hi!", 100.5) == (REPLY, "F1", b"hi!")
    # the entry is gone: a duplicate reply is a late frame and ignored
    assert core.receive_frame(reply, b"again", 100.6) is None
    assert core.active_calls == 1


def test_remote_error_fails_the_call_with_a_typed_exception():
    core = make()
    call_id, _ = core.open_unary("echo", b"", 1.0, 0.0, "F")
    header = [ERROR, call_id, FLAG_RESPONSE, Status.UNIMPLEMENTED, "no such thing"]
    code, handle, error = core.receive_frame(header, b"", 0.1)
    assert (code, handle) == (UNARY_FAILED, "F") and isinstance(error, RpcUnimplemented)
    assert core.active_calls == 0


def test_error_frames_map_to_the_exception_family():
    def err(code, tb=b""):
        return error_from_frame([ERROR, 1, FLAG_RESPONSE, code, "m"], tb)

    assert isinstance(err(Status.DEADLINE_EXCEEDED), RpcTimeout)
    assert isinstance(err(Status.CANCELLED), RpcCancelled)
    assert isinstance(err(Status.UNIMPLEMENTED), RpcUnimplemented)
    other = err("MY_CODE", b"Traceback: boom")
    assert (other.code, other.remote_traceback) == ("MY_CODE", "Traceback: boom")


def test_outgoing_calls_are_limited_per_connection():
    core = make(max_concurrent_calls=2)
    core.open_unary("echo", b"", 1.0, 0.0, "F1")
    assert not core.outgoing_full()
    core.open_stream("S", "count", SERVER_STREAM, 1.0, INITIAL_WINDOW, b"", 0.0)
    assert core.outgoing_full()
    with pytest.raises(RpcError) as info:
        core.open_stream("S2", "count", SERVER_STREAM, 1.0, INITIAL_WINDOW, b"", 0.0)
    assert info.value.code == Status.RESOURCE_EXHAUSTED
    assert core.cancel_call(1, outgoing=True)
    assert not core.outgoing_full()


def test_stream_open_checks_size_and_timeout_and_grants_its_window():
    core = make(max_frame_size=4096)
    with pytest.raises(FrameTooLarge):
        core.open_stream("S", "count", SERVER_STREAM, 1.0, INITIAL_WINDOW, b"x" * 5000, 0.0)
    with pytest.raises(ValueError, match="positive"):
        core.open_stream("S", "count", SERVER_STREAM, -1.0, INITIAL_WINDOW, b"", 0.0)
    assert core.active_calls == 0 and sent(core) == []
    window = core.clamp_window(10 * INITIAL_WINDOW)
    call_id, deadline = core.open_stream("S", "upper", BIDI, 3.0, window, None, 10.0)
    assert deadline == 13.0
    assert sent(core) == [
        ([OPEN, call_id, 0, "upper", BIDI, 3001], b""),
        ([CREDIT, call_id, 0, window - INITIAL_WINDOW], b""),
    ]
    assert core.clamp_window(1) == INITIAL_WINDOW
    assert core.clamp_window(1 << 40) == core.limits.max_stream_window


def test_outgoing_stream_events_and_end():
    core = make()
    call_id, _ = core.open_stream("S", "count", SERVER_STREAM, 5.0, INITIAL_WINDOW, b"3", 0.0)
    msg = [MESSAGE, call_id, FLAG_MSG | FLAG_RESPONSE]
    assert core.receive_frame(msg, b"0", 1.0) == (
        STREAM_MESSAGE,
        "S",
        FLAG_MSG | FLAG_RESPONSE,
        b"0",
    )
    credit = [CREDIT, call_id, FLAG_RESPONSE, 1000]
    assert core.receive_frame(credit, b"", 1.0) == (STREAM_CREDIT, "S", 1000)
    end = [MESSAGE, call_id, FLAG_END | FLAG_RESPONSE]
    assert core.receive_frame(end, b"", 1.0) == (STREAM_ENDED, "S", FLAG_END | FLAG_RESPONSE, b"")
    assert core.active_calls == 0
    assert core.receive_frame(msg, b"late", 1.0) is None


def test_callee_cancel_or_error_fails_an_outgoing_stream():
    core = make()
    a, _ = core.open_stream("A", "count", SERVER_STREAM, 5.0, INITIAL_WINDOW, b"", 0.0)
    b, _ = core.open_stream("B", "count", SERVER_STREAM, 5.0, INITIAL_WINDOW, b"", 0.0)
    code, handle, error = core.receive_frame([CANCEL, a, FLAG_RESPONSE], b"", 1.0)
    assert (code, handle) == (STREAM_FAILED, "A") and isinstance(error, RpcCancelled)
    header = [ERROR, b, FLAG_RESPONSE, Status.INTERNAL, "broke"]
    code, handle, error = core.receive_frame(header, b"tb", 1.0)
    assert (code, handle, error.code, error.remote_traceback) == (
        STREAM_FAILED,
        "B",
        Status.INTERNAL,
        "tb",
    )
    assert core.active_calls == 0


# -- calls we serve ------------------------------------------------------------------------------
def test_open_is_accepted_with_its_handler_and_deadline():
    core = make()
    event = core.receive_frame(open_frame(7, timeout_ms=1500), b"req", now=50.0)
    code, call_id, service, call_type, handler, eager, deadline, flags, payload = event
    assert (code, call_id, service, call_type) == (CALL_OPENED, 7, "echo", UNARY)
    assert (handler, eager, deadline, payload) == (_unary, True, 51.5, b"req")
    assert flags == FLAG_MSG | FLAG_END


def test_deadline_of_an_open_defaults_and_is_capped():
    core = make(default_timeout=7.0, max_timeout=60.0)
    assert core.receive_frame(open_frame(1, timeout_ms=0), b"", 0.0)[6] == 7.0
    assert core.receive_frame(open_frame(2, timeout_ms=10**9), b"", 0.0)[6] == 60.0


def test_duplicate_call_id_is_a_protocol_violation():
    core = make()
    event = core.receive_frame(open_frame(5), b"", 0.0)
    core.track_incoming(5, "H5", event[6])
    with pytest.raises(ProtocolViolation, match="opened twice"):
        core.receive_frame(open_frame(5), b"", 0.0)
    # once the handler finished, the caller may use the id again
    core.finish_incoming(5)
    assert core.receive_frame(open_frame(5), b"", 0.0)[0] == CALL_OPENED


def test_unknown_service_or_wrong_kind_is_refused_with_unimplemented():
    core = make()
    assert core.receive_frame(open_frame(1, service="nope"), b"", 0.0) is None
    assert core.receive_frame(open_frame(2, service="count", call_type=UNARY), b"", 0.0) is None
    (h1, _), (h2, _) = sent(core)
    assert h1[:4] == [ERROR, 1, FLAG_RESPONSE, Status.UNIMPLEMENTED]
    assert "no service 'nope' on peer me" in h1[4]
    assert h2[:4] == [ERROR, 2, FLAG_RESPONSE, Status.UNIMPLEMENTED]
    assert "server-stream, called as unary" in h2[4]
    assert core.active_calls == 0


def test_calls_beyond_the_limit_are_refused_with_resource_exhausted():
    core = make(max_concurrent_calls=2)
    for call_id in (1, 2):
        core.track_incoming(
            call_id, f"H{call_id}", core.receive_frame(open_frame(call_id), b"", 0)[6]
        )
    assert core.receive_frame(open_frame(3), b"", 0.0) is None
    ((header, _),) = sent(core)
    assert header[:4] == [ERROR, 3, FLAG_RESPONSE, Status.RESOURCE_EXHAUSTED]
    core.finish_incoming(1)
    assert core.receive_frame(open_frame(3), b"", 0.0)[0] == CALL_OPENED


def test_remote_cancel_stops_a_served_call_once():
    core = make()
    core.track_incoming(4, "H4", 10.0)
    assert core.receive_frame([CANCEL, 4, 0], b"", 1.0) == (CALL_CANCELLED, "H4")
    assert core.receive_frame([CANCEL, 4, 0], b"", 1.0) is None
    assert core.active_calls == 0


def test_served_stream_gets_messages_and_credit_and_grants_its_window():
    core = make(stream_window=4 * INITIAL_WINDOW)
    core.track_incoming_stream(9, "S9", 10.0, core.limits.stream_window)
    assert sent(core) == [([CREDIT, 9, FLAG_RESPONSE, 3 * INITIAL_WINDOW], b"")]
    assert core.receive_frame([MESSAGE, 9, FLAG_MSG], b"m", 0.0) == (
        STREAM_MESSAGE,
        "S9",
        FLAG_MSG,
        b"m",
    )
    assert core.receive_frame([CREDIT, 9, 0, 64], b"", 0.0) == (STREAM_CREDIT, "S9", 64)
    assert core.receive_frame([MESSAGE, 10, FLAG_MSG], b"m", 0.0) is None  # unknown id
    assert core.cancel_call(9, outgoing=False)
    assert sent(core) == [([CANCEL, 9, FLAG_RESPONSE], b"")]


def test_local_cancel_sends_cancel_once():
    core = make()
    call_id, _ = core.open_unary("echo", b"", 5.0, 0.0, "F")
    sent(core)
    assert core.cancel_call(call_id, outgoing=True)
    assert not core.cancel_call(call_id, outgoing=True)
    assert sent(core) == [([CANCEL, call_id, 0], b"")]
    # the late reply is ignored
    assert (
        core.receive_frame([MESSAGE, call_id, FLAG_MSG | FLAG_END | FLAG_RESPONSE], b"", 1.0)
        is None
    )


# -- deadlines -----------------------------------------------------------------------------------
def test_deadlines_expire_in_order_and_cancel_outgoing_calls():
    core = make()
    u, _ = core.open_unary("echo", b"", 1.0, 0.0, "U")
    s, _ = core.open_stream("S", "count", SERVER_STREAM, 2.0, INITIAL_WINDOW, b"", 0.0)
    core.track_incoming(77, "H", 1.5)
    sent(core)
    assert core.expire(0.99) == []
    assert core.expire(1.0) == [(EXPIRED_UNARY, u, "U")]
    assert core.expire(1.5) == [(EXPIRED_INCOMING, 77, "H")]
    assert core.expire(2.5) == [(EXPIRED_STREAM, s, "S")]
    assert sent(core) == [([CANCEL, u, 0], b""), ([CANCEL, s, 0], b"")]
    # a served call stays in the table until its handler has stopped
    assert core.active_calls == 1
    core.finish_incoming(77)
    assert core.active_calls == 0 and core.get_timer() is None


def test_finished_calls_do_not_expire():
    core = make()
    call_id, _ = core.open_unary("echo", b"", 1.0, 0.0, "U")
    core.receive_frame([MESSAGE, call_id, FLAG_MSG | FLAG_END | FLAG_RESPONSE], b"", 0.5)
    core.track_incoming(3, "H", 1.0)
    core.finish_incoming(3)
    sent(core)
    assert core.expire(10.0) == []
    assert sent(core) == []


def test_deadline_entries_of_finished_calls_are_compacted():
    core = make()
    for _ in range(5000):
        call_id, _ = core.open_unary("echo", b"", 60.0, 0.0, "F")
        core.receive_frame([MESSAGE, call_id, FLAG_MSG | FLAG_END | FLAG_RESPONSE], b"", 0.0)
    assert len(core.deadlines) < 5000


# -- send queue ----------------------------------------------------------------------------------
def test_opens_are_parked_while_the_send_queue_is_full():
    core = make(write_buffer_high=1024)
    core.open_unary("echo", b"x" * 2000, 5.0, 0.0, "F")
    assert core.receive_frame(open_frame(1), b"a", 0.0) is None
    assert core.receive_frame(open_frame(2), b"bb", 0.0) is None
    assert (len(core.parked), core.parked_bytes) == (2, 3)
    assert core.take_parked() is None  # still full
    core.take_output()
    header, payload = core.take_parked()
    assert (header[1], payload) == (1, b"a")
    assert core.accept(header, payload, 0.0)[0] == CALL_OPENED
    assert core.take_parked()[1] == b"bb" and core.parked_bytes == 0


def test_frames_of_a_parked_stream_call_wait_behind_its_open_in_order():
    """A client-stream OPEN parked while our queue is full, then its messages and END, then a
    CANCEL of another call: nothing is dropped as "unknown call", nothing overtakes the OPEN."""
    services = dict(SERVICES, sink=(CLIENT_STREAM, _unary, False))
    core = RpcConnection(RpcLimits(write_buffer_high=1024), services.get)
    core.track_incoming(7, "H7", 10.0)  # a unary call already running
    core.open_unary("echo", b"x" * 2000, 5.0, 0.0, "F")  # our queue is now full
    frames = [
        (open_frame(1, service="sink", call_type=CLIENT_STREAM), b""),
        ([MESSAGE, 1, FLAG_MSG], b"m1"),
        ([MESSAGE, 1, FLAG_MSG | FLAG_END], b"m2"),
        ([CANCEL, 7, 0], b""),
    ]
    for header, payload in frames:
        assert core.receive_frame(header, payload, 0.0) is None
    assert len(core.parked) == 4 and core.parked_bytes == 4
    # a response to our own call is never parked
    reply = [MESSAGE, 1, FLAG_MSG | FLAG_END | FLAG_RESPONSE]
    assert core.receive_frame(reply, b"r", 0.0) == (REPLY, "F", b"r")
    core.take_output()
    events = []
    while (parked := core.take_parked()) is not None:
        event = core.unpark(parked[0], parked[1], 1.0)
        if event[0] == CALL_OPENED:
            core.track_incoming_stream(event[1], "S1", event[6], INITIAL_WINDOW)
        events.append(event[:2] if event[0] != STREAM_MESSAGE else event)
    assert events == [
        (CALL_OPENED, 1),
        (STREAM_MESSAGE, "S1", FLAG_MSG, b"m1"),
        (STREAM_MESSAGE, "S1", FLAG_MSG | FLAG_END, b"m2"),
        (CALL_CANCELLED, "H7"),
    ]
    assert core.parked_bytes == 0


def test_output_hook_fires_when_the_outbox_stops_being_empty():
    woken = []
    core = RpcConnection(RpcLimits(), SERVICES.get, on_output=lambda: woken.append(1))
    core.open_unary("echo", b"", 1.0, 0.0, "F1")
    core.open_unary("echo", b"", 1.0, 0.0, "F2")
    assert woken == [1]
    pieces, large = core.take_output()
    assert len(pieces) == 2 and not large and core.pending_bytes == 0
    core.open_unary("echo", b"z" * (framing.INLINE_PAYLOAD + 1), 1.0, 0.0, "F3")
    assert woken == [1, 1]
    pieces, large = core.take_output()
    assert large and len(pieces) == 2


def test_replies_are_checked_before_they_are_sent():
    core = make(max_frame_size=1024)
    core.send_reply(1, "not bytes")
    core.send_reply(2, b"x" * 2000)
    core.send_reply(3, b"ok")
    core.send_exception(4, ValueError("bad"))
    core.send_exception(5, RpcError("MINE", "custom"))
    (e1, _), (e2, _), (ok, body), (e4, tb), (e5, _) = sent(core)
    assert e1[3] == Status.INTERNAL and "expected bytes" in e1[4]
    assert e2[3] == Status.RESOURCE_EXHAUSTED
    assert ok == [MESSAGE, 3, FLAG_MSG | FLAG_END | FLAG_RESPONSE] and body == b"ok"
    assert e4[3:] == [Status.INTERNAL, "ValueError: bad"] and b"ValueError" in tb
    assert e5[3:] == ["MINE", "custom"]


# -- closing -------------------------------------------------------------------------------------
def test_goaway_is_reported():
    core = make()
    code, reason = core.receive_frame([GOAWAY, 0, 0, "PROTOCOL_VIOLATION", "bad"], b"", 0.0)
    assert code == GOAWAY_RECEIVED and "[PROTOCOL_VIOLATION] bad" in reason


def test_closing_hands_back_every_call_and_refuses_new_ones():
    core = make()
    core.open_unary("echo", b"", 5.0, 0.0, "U")
    core.open_stream("S", "count", SERVER_STREAM, 5.0, INITIAL_WINDOW, b"", 0.0)
    core.track_incoming(3, "H", 5.0)
    core.send_goaway(Status.UNAVAILABLE, "bye")
    assert core.start_closing("bye") == (["U"], ["S"], ["H"])
    assert core.state is SessionState.CLOSING and core.closing
    assert core.active_calls == 0 and core.get_timer() is None
    with pytest.raises(RpcConnectionLost, match="bye"):
        core.open_unary("echo", b"", 1.0, 0.0, "late")
    assert sent(core)[-1][0] == [GOAWAY, 0, 0, Status.UNAVAILABLE, "bye"]  # still flushable
    core.mark_closed()
    core.send([MESSAGE, 1, 0])
    assert core.outbox == [] and core.state is SessionState.CLOSED
    with pytest.raises(RuntimeError, match="CLOSED to CLOSING"):
        core.start_closing("again")
