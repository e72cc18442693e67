"""multistream-select 1.0 core: both roles, na, lazy negotiation, ls, bounds, any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from latticaray.mesh.libp2p.errors import MultistreamError, ProtocolNotSupported
from latticaray.mesh.libp2p.multistream import (
    MAX_MESSAGE,
    MultistreamCore,
    MultistreamRole,
    MultistreamState,
    ProtocolSelected,
    encode_message,
)
from latticaray.mesh.varint import encode_varint

INI, RES = MultistreamRole.INITIATOR, MultistreamRole.RESPONDER


def _run(ini: MultistreamCore, res: MultistreamCore, chunk: int = 10_000):
    """Shuttle bytes until both selected or one fails; returns (ini events, res events)."""
    to_res, to_ini = ini.initiate(), res.initiate()
    ev_i: list[ProtocolSelected] = []
    ev_r: list[ProtocolSelected] = []
    for _ in range(100):
        if not to_res and not to_ini:
            break
        for k in range(0, len(to_res), chunk):
            ev_r += res.receive(to_res[k : k + chunk])
        to_res = b""
        for k in range(0, len(to_ini), chunk):
            ev_i += ini.receive(to_ini[k : k + chunk])
        to_ini = res.data_to_send()
        to_res = ini.data_to_send()
    return ev_i, ev_r


@given(st.integers(1, 40))
def test_negotiates_the_first_supported_protocol_at_any_chunking(chunk):
    ini = MultistreamCore(INI, ["/a/1", "/b/1", "/c/1"])
    res = MultistreamCore(RES, ["/c/1", "/b/1"])
    ev_i, ev_r = _run(ini, res, chunk)
    assert ev_i == [ProtocolSelected("/b/1", b"")]
    assert ev_r == [ProtocolSelected("/b/1", b"")]
    assert ini.state is res.state is MultistreamState.SELECTED


def test_no_common_protocol_fails_the_initiator():
    ini = MultistreamCore(INI, ["/a/1", "/b/1"])
    res = MultistreamCore(RES, ["/c/1"])
    with pytest.raises(ProtocolNotSupported) as info:
        _run(ini, res)
    assert info.value.protocols == ("/a/1", "/b/1")
    assert ini.state is MultistreamState.FAILED


def test_lazy_initiator_data_follows_the_proposal():
    ini = MultistreamCore(INI, ["/echo/1"], lazy=True)
    assert ini.optimistic_protocol == "/echo/1"
    res = MultistreamCore(RES, ["/echo/1"])
    header = res.initiate()
    # header, proposal and application bytes in one write, as rust's V1Lazy does
    events = res.receive(ini.initiate() + b"app bytes")
    assert events == [ProtocolSelected("/echo/1", b"app bytes")]
    echo = header + res.data_to_send()
    assert ini.receive(echo + b"reply") == [ProtocolSelected("/echo/1", b"reply")]


def test_lazy_initiator_refused_fails():
    ini = MultistreamCore(INI, ["/x/1"], lazy=True)
    res = MultistreamCore(RES, ["/y/1"])
    with pytest.raises(ProtocolNotSupported):
        _run(ini, res)


def test_lazy_needs_a_single_protocol_and_the_initiator_role():
    with pytest.raises(MultistreamError):
        MultistreamCore(INI, ["/a", "/b"], lazy=True)
    with pytest.raises(MultistreamError):
        MultistreamCore(RES, ["/a"], lazy=True)


def test_responder_answers_ls_then_accepts():
    res = MultistreamCore(RES, ["/a/1", "/b/1"])
    res.initiate()
    res.receive(encode_message("/multistream/1.0.0") + encode_message("ls"))
    out = res.data_to_send()
    body = b"".join(encode_message(p) for p in ["/a/1", "/b/1"]) + b"\n"
    assert out == encode_varint(len(body)) + body
    assert res.receive(encode_message("/b/1")) == [ProtocolSelected("/b/1", b"")]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (encode_message("/other/1.0.0"), "does not speak"),
        (encode_varint(4) + b"abcd", "newline"),
        (encode_varint(MAX_MESSAGE + 1) + b"x", "out of range"),
        (b"\x00", "out of range"),
        (encode_varint(3) + b"\xff\xfe\n", "UTF-8"),
    ],
)
def test_malformed_input_is_a_typed_error(data, match):
    res = MultistreamCore(RES, ["/a/1"])
    res.initiate()
    with pytest.raises(MultistreamError, match=match):
        res.receive(data)
    assert res.state is MultistreamState.FAILED
    with pytest.raises(MultistreamError):
        res.receive(b"more")


def test_responder_bounds_the_number_of_proposals():
    res = MultistreamCore(RES, ["/a/1"])
    res.initiate()
    res.receive(encode_message("/multistream/1.0.0"))
    with pytest.raises(MultistreamError, match="more than"):
        for i in range(100):
            res.receive(encode_message(f"/nope/{i}"))


def test_protocol_names_are_checked():
    for bad in ["", "na", "ls", "a\nb", "/multistream/1.0.0", "x" * 2000]:
        with pytest.raises(MultistreamError):
            MultistreamCore(INI, [bad])


@given(st.binary(max_size=200))
def test_fuzz_responder_raises_only_multistream_error(data):
    res = MultistreamCore(RES, ["/a/1"])
    res.initiate()
    try:
        res.receive(data)
    except MultistreamError:
        pass
