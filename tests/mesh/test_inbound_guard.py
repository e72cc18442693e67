"""The guard every transport adapter (QUIC, libp2p TCP, relayed circuits) puts on an inbound
connection: closed when its peer negotiates no stream in time, left alone otherwise."""

from __future__ import annotations

import asyncio

from latticaray.mesh.adapters import InboundStreams
from latticaray.mesh.libp2p.stream import ProtocolRouter


def guard(raw=None) -> InboundStreams:
    return InboundStreams(object(), ProtocolRouter(), "test", object(), None, raw=raw)


async def test_a_connection_that_negotiates_no_stream_in_time_is_closed():
    closed = []
    never = asyncio.Event()
    await guard().close_if_silent(never.wait, 0.05, lambda: closed.append(1), "a silent peer")
    assert closed == [1]


async def test_a_registered_or_closed_connection_is_left_alone():
    closed = []
    never = asyncio.Event()
    await guard(raw=object()).close_if_silent(never.wait, 0.05, lambda: closed.append(1), "x")
    done = asyncio.Event()
    done.set()
    await guard().close_if_silent(done.wait, 5.0, lambda: closed.append(2), "y")
    assert closed == []
