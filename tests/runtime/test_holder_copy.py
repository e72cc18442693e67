"""Fetching an object from the node said to hold it: a same-host copy first, the exchange next,
and neither waited on once the holder is dead (RemoteObjects.fetch_while_alive); the
``ObjectWhere`` stream of a same-host copy is closed however its answer ends
(SameHostCopies.copy). Fakes stand in for the mesh, membership and exchange: these are the
decisions alone; the copies themselves run between real nodes in test_mesh.py."""

import asyncio
import types

from latticaray.runtime.remote.objects import RemoteObjects
from latticaray.runtime.remote.samehost import SameHostCopies
from latticaray.runtime.remote.wire import ObjectPlace

CID = "bafyr4iexamplecid"
HOLDER = "holder-node"


class FakeExchange:
    def __init__(self, result: bool = True):
        self.fetched: list[str] = []
        self.result = result

    async def fetch(self, cid, **kwargs):
        self.fetched.append(cid)
        return self.result

    def abandon(self, cid, why):
        return False


class FakeCopies:
    """A same-host copy that answers `result`, or hangs until cancelled (result None)."""

    def __init__(self, result):
        self.result = result
        self.started = asyncio.Event()
        self.cancelled = False

    async def copy(self, cid, peers):
        self.started.set()
        if self.result is not None:
            return self.result
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def remote_objects(copies, exchange) -> RemoteObjects:
    peer = types.SimpleNamespace(peer_id="holder-peer", node_id=HOLDER)
    remote = types.SimpleNamespace(
        node=types.SimpleNamespace(store=None),
        stats={},
        mesh=None,
        exchange=exchange,
        membership=types.SimpleNamespace(
            alive_peer=lambda node_id: peer if node_id == HOLDER else None
        ),
    )
    objects = RemoteObjects(remote)  # type: ignore[arg-type]
    objects.same_host = copies
    return objects


async def test_a_holder_that_dies_during_the_same_host_copy_is_not_waited_on():
    copies, exchange = FakeCopies(None), FakeExchange()
    objects = remote_objects(copies, exchange)
    fetching = asyncio.ensure_future(objects.fetch_while_alive(CID, HOLDER, 30.0))
    await asyncio.wait_for(copies.started.wait(), 5)
    objects.holder_gone(HOLDER)
    assert await asyncio.wait_for(fetching, 5) is False
    await asyncio.sleep(0)  # the cancelled copy runs its handler
    assert copies.cancelled
    assert exchange.fetched == []  # the dead holder was not asked
    assert objects.gone_waiters == {}


async def test_a_same_host_copy_is_enough():
    exchange = FakeExchange()
    objects = remote_objects(FakeCopies(True), exchange)
    assert await asyncio.wait_for(objects.fetch_while_alive(CID, HOLDER, 30.0), 5) is True
    assert exchange.fetched == []
    assert objects.gone_waiters == {}


async def test_no_same_host_copy_falls_back_to_the_exchange():
    exchange = FakeExchange()
    objects = remote_objects(FakeCopies(False), exchange)
    assert await asyncio.wait_for(objects.fetch_while_alive(CID, HOLDER, 30.0), 5) is True
    assert exchange.fetched == [CID]
    assert objects.gone_waiters == {}


async def test_a_dead_holder_is_not_asked_at_all():
    copies, exchange = FakeCopies(True), FakeExchange()
    objects = remote_objects(copies, exchange)
    assert await objects.fetch_while_alive(CID, "another-node", 30.0) is False
    assert not copies.started.is_set() and exchange.fetched == []


def same_host_copies(call_stream) -> SameHostCopies:
    """Copies whose only peer is on this host (the Unix transport) and answers by
    ``call_stream``."""
    mesh = types.SimpleNamespace(
        call_stream=call_stream,
        connection_to=lambda peer: types.SimpleNamespace(transport="unix"),
    )
    return SameHostCopies(mesh, types.SimpleNamespace(store=object()))


async def test_the_where_stream_is_closed_after_its_first_answer():
    closed = asyncio.Event()

    async def call_stream(peer, protocol, payload, timeout=None):
        try:
            yield ObjectPlace("/nonexistent/latticaray-store").encode()
            await asyncio.Event().wait()  # a peer that would go on streaming
        finally:
            closed.set()

    copies = same_host_copies(call_stream)
    # the named store cannot be attached here: no copy, but the stream was closed at once,
    # not when its generator is collected
    assert await copies.copy(CID, ["peer"]) is False
    assert closed.is_set()


async def test_the_where_stream_is_closed_when_the_peer_fails():
    closed = asyncio.Event()

    async def call_stream(peer, protocol, payload, timeout=None):
        try:
            raise ConnectionError("peer went away")
            yield b""  # an async generator
        finally:
            closed.set()

    copies = same_host_copies(call_stream)
    assert await copies.copy(CID, ["peer"]) is False
    assert closed.is_set()
