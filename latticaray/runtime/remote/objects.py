"""Objects between nodes: arguments as they travel, fetches by id and CID, `/latticaray/object/1`.

Store values travel by CID: the receiving node pulls them into its own store with the object
store's ObjectExchange (Bitswap) before the task runs, from the node holding the only copy while
it lives, else from any provider; an argument the exchange cannot get is fetched inline from its
owner by object id (`/latticaray/object/1`), and the owner recovers it if it is lost. Small
values travel inline; inline values over BY_REF_ARG go by reference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import TYPE_CHECKING, Any

import cloudpickle

from latticaray.mesh.errors import MeshError
from latticaray.objectstore.cid import Cid
from latticaray.objectstore.errors import BlockVerificationError, ObjectStoreError
from latticaray.objectstore.manifest import Manifest
from latticaray.objectstore.serialization import deserialize as deserialize_payload
from latticaray.runtime import serialization
from latticaray.runtime.admission import Permission
from latticaray.runtime.errors import ObjectLostError
from latticaray.runtime.local.records import ERROR, OK, ObjectEntry
from latticaray.runtime.remote.samehost import SameHostCopies
from latticaray.runtime.remote.wire import (
    CHUNK,
    OBJECT_PROTOCOL,
    ObjectByCid,
    ObjectById,
    ObjectHeader,
    ObjectMissing,
    ObjectPlace,
    ObjectRequest,
    ObjectWhere,
    decode_object_header,
    decode_object_request,
)
from latticaray.runtime.serialization import error_blob

if TYPE_CHECKING:
    from latticaray.objectstore.store import LocalStore
    from latticaray.objectstore.writer import ObjectWriter
    from latticaray.runtime.remote.membership import Peer
    from latticaray.runtime.remote.runtime import RemoteRuntime

log = logging.getLogger(__name__)

#: A fetched object this large is joined from its chunks on an executor thread.
JOIN_OFF_LOOP = 8 << 20
BY_REF_ARG = 256 << 10
#: A fetch fails once nothing of its object arrived for this long (no provider answered, or the
#: transfer stalled); one that keeps progressing goes on, however slow the link, up to
#: FETCH_DEADLINE.
FETCH_STALL = 30.0
FETCH_DEADLINE = 6 * 3600.0


class BadObjectReply(ValueError):
    """A peer's object reply does not match the CID it names (or the one asked for): the
    peer is penalized and the object fetched elsewhere (``cid``: the CID to fetch it by)."""

    def __init__(self, message: str, cid: str | None):
        super().__init__(message)
        self.cid = cid


def _lost(oid: bytes, message: str, why: str) -> ObjectLostError:
    return ObjectLostError(message, object_id=oid.hex(), reason=why)


def _join_and_name(chunks: list) -> tuple[bytes, str]:
    """A fetched value's bytes and the CID they hash to (off the loop for a large one)."""
    data = bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)
    return data, serialization.cid_of(data)


class _StoreFormSink:
    """A store object arriving in its store form (``man`` in the reply header): the manifest
    is verified against the CID, then the payload's blocks, cut out of the reply's chunks, are
    each verified against the manifest as they arrive (on an executor thread when the object
    is large). Into this node's store (``store``): `finish` seals it there and gives its store
    reference. Else into memory: `finish` gives the value's pickle (a borrower's copy, held
    inline like any fetched value)."""

    def __init__(self, manifest: Manifest, cid: str, writer: ObjectWriter | None):
        self.manifest = manifest
        self.cid = cid
        self.writer = writer
        self.buffer = bytearray(manifest.size) if writer is None else None
        self.off_loop = manifest.size >= JOIN_OFF_LOOP
        self.index = 0
        self.pending = bytearray()

    @classmethod
    def open(cls, store: LocalStore | None, header: ObjectHeader) -> _StoreFormSink:
        cid = header.cid
        if cid is None or header.s != OK or header.man is None:
            raise BadObjectReply("a store-form reply must be an OK object with its CID", cid)
        try:
            manifest = Manifest.decode(Cid.parse(cid), header.man)
        except (ObjectStoreError, ValueError) as exc:
            raise BadObjectReply(f"its manifest does not match {cid}: {exc}", cid) from None
        if manifest.size != header.size:
            raise BadObjectReply(
                f"the header says {header.size} bytes, the manifest {manifest.size}", cid
            )
        if store is None:
            return cls(manifest, cid, None)
        try:
            writer = store.open_writer(manifest)
        except ObjectStoreError as exc:  # no room here: not the sender's doing
            raise LookupError(f"no room in this node's store for {cid}: {exc}") from None
        return cls(manifest, cid, writer)

    async def feed(self, raw: bytes | memoryview) -> None:
        """Take the next chunk of the payload; the blocks it completes are checked and kept."""
        sizes = self.manifest.sizes
        view = memoryview(raw)
        done: list[tuple[int, bytes | memoryview]] = []
        while len(view):
            need = sizes[self.index + len(done)] - len(self.pending)
            if not self.pending and len(view) >= need:
                done.append((self.index + len(done), view[:need]))
                view = view[need:]
                continue
            take = min(need, len(view))
            self.pending += view[:take]
            view = view[take:]
            if len(self.pending) == sizes[self.index + len(done)]:
                done.append((self.index + len(done), bytes(self.pending)))
                self.pending = bytearray()
        if not done:
            return
        if self.off_loop:
            await asyncio.get_running_loop().run_in_executor(None, self._keep, done)
        else:
            self._keep(done)
        self.index += len(done)

    def _keep(self, blocks: list[tuple[int, bytes | memoryview]]) -> None:
        manifest = self.manifest
        for index, data in blocks:
            if self.writer is not None:
                try:
                    self.writer.write_block(index, data)
                    continue
                except BlockVerificationError:
                    pass
            elif len(data) == manifest.sizes[index] and manifest.blocks[index].verify(data):
                assert self.buffer is not None
                start, end = manifest.block_range(index)
                self.buffer[start:end] = data
                continue
            raise BadObjectReply(
                f"block {index} of {self.cid} does not match its manifest", self.cid
            )

    async def finish(self) -> bytes:
        """The store reference of the object sealed here, or (in memory) its value's pickle."""
        if self.index != len(self.manifest.blocks):
            raise ValueError(f"{self.cid}: {len(self.manifest.blocks) - self.index} blocks missing")
        if self.writer is not None:
            cid = self.writer.seal()
            self.writer = None
            return serialization.STORE_MAGIC + str(cid).encode("ascii")
        if self.off_loop:
            return await asyncio.get_running_loop().run_in_executor(None, self._pickled)
        return self._pickled()

    def _pickled(self) -> bytes:
        buffer, self.buffer = self.buffer, None
        return cloudpickle.dumps(deserialize_payload(self.manifest.meta, buffer), protocol=5)

    def abort(self) -> None:
        self.buffer = None
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def release_off_loop(doomed: list) -> None:
    """Drop references to (views of) values on an executor thread. When they are the last
    views of a store object, its mapping is unmapped there: tens of ms for hundreds of MB,
    which would stall the event loop."""
    if doomed:
        asyncio.get_running_loop().run_in_executor(None, doomed.clear)


class RemoteObjects:
    """Fetching objects from peers and serving this node's objects to them."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote
        self.node = remote.node
        self.stats = remote.stats
        self.gone_waiters: dict[str, list[asyncio.Future]] = {}  # node id -> set when it dies
        self.same_host = SameHostCopies(remote.mesh, remote.node)
        #: fetches over /latticaray/object/1 under way, for the state API and progress bars:
        #: a key -> [cid, bytes done, bytes total, start time (wall clock), peer node id]
        self.inflight: dict[int, list[Any]] = {}
        self._inflight_next = 0

    def holder_gone(self, node_id: str) -> None:
        for waiter in self.gone_waiters.pop(node_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ arguments on the wire
    def wire_args(self, args: list) -> list:
        """Arguments as a peer is sent them. A store reference keeps its local name here: the
        task session names it by CID (``portable_args``) when the message goes out."""
        if args[0] == "b":  # a copy: naming it by CID must not rename the caller's pin
            return ["b", args[1]] if serialization.is_store_ref(args[1]) else args
        node_id = self.remote.node_id
        exchange = self.remote.exchange
        entries = self.node.objects.entries

        def slim(item: list) -> list:
            # a resolved argument: [0, value, object id, owner]; a borrowed one is fetched
            # from its owner (which recovers it if lost), an owned one from us
            owner = item[3] if len(item) > 3 and item[3] else node_id
            if item[0] == 0 and len(item) > 2 and serialization.is_store_ref(item[1]):
                if exchange is None:
                    return [1, item[2], owner]
                # fetched by CID, else from its owner; named: the node holding the only copy
                entry = entries.get(item[2])
                if entry is not None and entry.holder is not None:
                    return [0, item[1], item[2], owner, entry.holder]
                return [0, item[1], item[2], owner]
            if item[0] == 0 and len(item) > 2 and len(item[1]) > BY_REF_ARG:
                return [1, item[2], owner]
            return item[:3] if item[0] == 1 else item[:2]  # a ref keeps its owner

        return ["l", [slim(i) for i in args[1]], {k: slim(v) for k, v in args[2].items()}]

    async def portable_args(self, args: list) -> None:
        """Name the store references among wired arguments by CID; a local put is hashed off
        the event loop. One that cannot be resolved (deleted meanwhile) goes by reference."""
        if args[0] == "b":
            if serialization.is_store_ref(args[1]):  # all arguments, stored as one value
                # unnamed: the peer reports the arguments it cannot find
                args[1] = await self._named_by_cid(args[1], "arguments") or args[1]
            return
        for item in [*args[1], *args[2].values()]:
            if item[0] != 0 or not serialization.is_store_ref(item[1]):
                continue
            named = await self._named_by_cid(item[1], "argument")
            if named is not None:
                item[1] = named
            elif len(item) > 3:
                item[:] = [1, item[2], item[3]]

    async def _named_by_cid(self, data: bytes, what: str) -> bytes | None:
        """``data`` named by CID for a peer, or None (logged) when its object is gone."""
        try:
            return await self.node.objects.portable_async(data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "%s %s could not be named by CID: %r", what, serialization.store_name(data), exc
            )
            return None

    def missing_store_args(self, args: list) -> list:
        """Store arguments (by CID) this node's store lacks."""
        if self.remote.exchange is None:
            return []
        store = self.node.store
        if args[0] == "b":
            ref = args[1]
            return (
                [serialization.store_cid(ref)]
                if serialization.is_store_ref(ref)
                and not store.contains(serialization.store_cid(ref))
                else []
            )
        items = list(args[1]) + list(args[2].values())
        return [
            i
            for i in items
            if i[0] == 0
            and serialization.is_store_ref(i[1])
            and not store.contains(serialization.store_cid(i[1]))
        ]

    async def fetch_then(self, items: list, peer: str, then: Callable[[], Any]) -> None:
        """Bring store objects into this node's store (Bitswap) before going on. An argument
        the exchange cannot get is fetched from its owner instead (by object id, inline; the
        owner recovers it if it is lost), at once when the node named as holding its only
        copy is dead or dies meanwhile."""
        exchange = self.remote.exchange
        sender = self.remote.membership.peers.get(peer)
        hint = [sender.peer_id] if sender is not None else []
        for item in items:
            cid = serialization.store_cid(item[1]) if isinstance(item, list) else item
            holder = item[4] if isinstance(item, list) and len(item) > 4 else None
            try:
                if holder is None:
                    if not await self.same_host.copy(cid, hint):
                        await exchange.fetch(
                            cid, timeout=FETCH_DEADLINE, peers=hint, stall_timeout=FETCH_STALL
                        )
                    continue
                if await self.fetch_while_alive(cid, holder, FETCH_STALL, hint):
                    continue
                self.stats["args_from_owner_holder_dead"] += 1
            except Exception as exc:
                log.warning("could not fetch %s from %s by CID: %s", cid, peer, exc)
            if isinstance(item, list) and len(item) >= 4:
                entry = await self.fetch_object(item[2], item[3])
                item[1] = entry.data if entry.status == OK else item[1]
        then()

    async def fetch_while_alive(
        self,
        cid: str,
        holder: str,
        stall: float,
        peers: list = (),  # type: ignore[assignment]
    ) -> bool:
        """Fetch `cid` by the exchange from `holder` (and `peers`) while `holder` is alive and
        the transfer progresses (nothing arriving for `stall` s ends it). False when the holder
        is (or becomes) dead first; raises what the exchange raises."""
        peer = self.remote.membership.alive_peer(holder)
        if peer is None:
            return False
        exchange = self.remote.exchange
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        waiters = self.gone_waiters.setdefault(holder, [])
        waiters.append(gone)
        # a holder on this host: its store file first (it may die meanwhile: then it is not asked)
        copying = loop.create_task(self.same_host.copy(cid, [peer.peer_id]))
        fetch = None
        try:
            await asyncio.wait([copying, gone], return_when=asyncio.FIRST_COMPLETED)
            if copying.done() and copying.result():
                return True
            if copying.done():  # no file to copy: the exchange, while the holder lives
                fetch = loop.create_task(
                    exchange.fetch(
                        cid,
                        timeout=FETCH_DEADLINE,
                        peers=[peer.peer_id, *peers],
                        stall_timeout=stall,
                    )
                )
                await asyncio.wait([fetch, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not copying.done():
                copying.cancel()
            if gone in waiters:
                waiters.remove(gone)
                if not waiters:
                    self.gone_waiters.pop(holder, None)
        if fetch is None:  # the holder died during the copy
            return False
        if not fetch.done():
            # a run from the dead holder that got nothing ends now: one that went on would
            # be joined by later fetches of the CID and never ask the node a re-run puts it on
            if exchange.abandon(cid, f"its holder {holder} died"):
                await asyncio.wait([fetch], timeout=5.0)  # the run is gone: fetches start anew
            fetch.add_done_callback(lambda f: f.cancelled() or f.exception())
            return False
        fetch.result()
        return True

    # ------------------------------------------------------------------ fetching (client)
    def trusted(self, peer: Peer) -> bool:
        """Whether a peer is still asked for objects: not once it sent enough bad data (the
        exchange's count, which bad replies here add to)."""
        exchange = self.remote.exchange
        return exchange is None or exchange.trusted(peer.peer_id)

    def penalize(self, peer: Peer, why: BaseException) -> None:
        """A peer sent data that does not match its CID: counted against it (the exchange
        asks it for nothing more after a few), and this fetch goes elsewhere."""
        log.warning("peer %s sent a bad object: %s", peer.node_id, why)
        self.stats["bad_object_replies"] += 1
        exchange = self.remote.exchange
        if exchange is not None:
            exchange.ledgers.record_bad_block(peer.peer_id)

    async def fetch_object(self, oid: bytes, owner: str) -> ObjectEntry:
        """An object owned by ``owner``, fetched from it by id and verified against the CID
        its reply names (a reply that does not match: the owner is penalized and the object
        fetched by that CID from another holder): an OK entry, or an ERROR one with the
        ObjectLostError that says why not."""
        entry = ObjectEntry()
        peer = self.remote.membership.alive_peer(owner)
        if peer is None:
            why = f"its owner node {owner} is dead or not reachable (only the owner recovers it)"
            entry.seal(ERROR, error_blob(_lost(oid, f"object {oid.hex()} is lost: {why}", why)))
            return entry
        blocks = self.node.store is not None
        try:
            status, data, _cid = await self.fetch(peer, ObjectById(oid, blocks))
        except BadObjectReply as exc:
            self.penalize(peer, exc)
            found = None
            if exc.cid is not None:
                found = await self.fetch_by_cid(exc.cid, FETCH_DEADLINE, exclude={owner})
            if found is not None and found[0] == OK and serialization.is_store_ref(found[1]):
                try:  # held inline, as a value fetched by id always is
                    found = (OK, await self.inline(found[1]))
                except LookupError:  # evicted before it was read: lost, as below
                    found = None
            if found is not None:
                entry.seal(*found)
                return entry
            why = f"its owner node {owner} served data that does not match its CID ({exc})"
            entry.seal(ERROR, error_blob(_lost(oid, f"object {oid.hex()} is lost: {why}", why)))
            return entry
        except (MeshError, ValueError, LookupError) as exc:
            why = f"its owner node {owner} could not serve it: {exc}"
            message = f"object {oid.hex()} could not be fetched from its owner {owner}: {exc}"
            entry.seal(ERROR, error_blob(_lost(oid, message, why)))
            return entry
        entry.seal(status, data)
        return entry

    async def inline(self, data: bytes) -> bytes:
        """A store object's pickle, made on an executor thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, serialization.materialize, data)

    async def fetch_by_cid(
        self, cid: str, timeout: float | None, exclude: Collection[str] = ()
    ) -> tuple[int, bytes] | None:
        """(status, data) of the object ``cid`` from the mesh, or None: store CIDs through the
        exchange (Bitswap), then from each member in turn over ``/latticaray/object/1``
        (``exclude``: members not to ask). Every reply is verified against the CID: a store
        object block by block under its manifest, any other value by its hash; a member whose
        reply does not match is penalized and the next one asked."""
        remote = self.remote
        membership = remote.membership
        exchange = remote.exchange
        if exchange is not None and cid.startswith("bafy"):
            alive = [s.peer_id for s in membership.peers.values() if s.alive]
            if await self.same_host.copy(cid, alive):
                return (OK, serialization.STORE_MAGIC + cid.encode("ascii"))
            try:
                await exchange.fetch(
                    cid,
                    timeout=timeout or FETCH_DEADLINE,
                    peers=[
                        s.peer_id
                        for s in membership.peers.values()
                        if s.alive and s.node_id not in exclude
                    ],
                    stall_timeout=FETCH_STALL,
                )
                return (OK, serialization.STORE_MAGIC + cid.encode("ascii"))
            except Exception as exc:
                log.debug("exchange could not fetch %s: %s", cid, exc)
        blocks = self.node.store is not None
        for node_id in membership.alive_peers():
            peer = membership.peers[node_id]
            if node_id in exclude or not self.trusted(peer):
                continue
            try:
                status, data, _ = await asyncio.wait_for(
                    self.fetch(peer, ObjectByCid(cid, blocks), cid, into_store=blocks),
                    timeout or 30.0,
                )
            except BadObjectReply as exc:
                self.penalize(peer, exc)
                continue
            except (TimeoutError, MeshError, ValueError, LookupError):
                continue
            return (status, data)
        return None

    async def fetch(
        self,
        peer: Peer,
        request: ObjectRequest,
        expect_cid: str | None = None,
        into_store: bool = False,
    ) -> tuple[int, bytes, str | None]:
        """An object's status, bytes and CID from a peer over ``/latticaray/object/1``: a header
        giving the size and the CID, then chunks that must add up to exactly that size (a reply
        that runs past it is cut off at the first chunk over). A value is checked against the
        CID (`BadObjectReply` if it does not hash to it, or the CID is not ``expect_cid``); a
        store object in its store form is checked block by block against its manifest as it
        arrives and comes back, ``into_store``, sealed in this node's store as a store
        reference, else as its value's pickle (a borrower's copy by id, held inline)."""
        header: ObjectHeader | None = None
        size = received = 0
        chunks = []
        sink: _StoreFormSink | None = None
        row: list[Any] = ["", 0, 0, time.time(), peer.node_id]
        self._inflight_next += 1
        key = self._inflight_next
        try:
            async for raw in self.remote.mesh.call_stream(
                peer.peer_id, OBJECT_PROTOCOL, request.encode(), timeout=3600.0
            ):
                if header is None:
                    reply = decode_object_header(raw)
                    if isinstance(reply, ObjectMissing):
                        raise LookupError(reply.why)
                    if isinstance(reply, ObjectPlace):  # asked for bytes, answered with a place
                        raise ValueError("object reply names a store instead of sending the object")
                    header, size = reply, reply.size
                    row[0], row[2] = header.cid or "", size
                    self.inflight[key] = row
                    if expect_cid is not None and header.cid != expect_cid:
                        raise BadObjectReply(
                            f"asked for {expect_cid}, the reply names {header.cid}", None
                        )
                    if header.man is not None:
                        sink = _StoreFormSink.open(self.node.store if into_store else None, header)
                    continue
                received += len(raw)
                row[1] = received
                if received > size:
                    raise ValueError(f"object reply runs past the {size} bytes its header said")
                if sink is not None:
                    await sink.feed(raw)
                else:
                    chunks.append(raw)
            if header is None:
                raise LookupError("empty object reply")
            if received != size:
                raise ValueError(f"object reply has {received} bytes, header said {size}")
            if sink is not None:
                return header.s, await sink.finish(), header.cid
        finally:
            self.inflight.pop(key, None)
            if sink is not None:
                sink.abort()
        if size >= JOIN_OFF_LOOP:  # joining and hashing release the GIL: the loop goes on
            data, cid = await asyncio.get_running_loop().run_in_executor(
                None, _join_and_name, chunks
            )
        else:
            data, cid = _join_and_name(chunks)
        if header.cid is None or cid != header.cid:
            raise BadObjectReply(
                f"the {size} bytes sent hash to {cid}, the reply names {header.cid}", header.cid
            )
        return header.s, data, header.cid

    # ------------------------------------------------------------------ serving
    async def serve_object(self, ctx: Any, payload: bytes) -> AsyncIterator[Any]:
        self.remote.membership.require_member(ctx, Permission.READ)
        request = decode_object_request(payload)
        if isinstance(request, ObjectWhere):  # a peer on this host copies it from our store
            yield self.same_host.place(ctx.transport, request.cid).encode()
            return
        node = self.node
        objects = node.objects
        entry: ObjectEntry | None
        oid: bytes | None
        by_id = isinstance(request, ObjectById)
        if isinstance(request, ObjectById):
            oid = request.oid
            entry = objects.entries.get(oid)
        else:
            cid = request.cid
            oid = objects.cid_index.get(cid)
            entry = objects.entries.get(oid) if oid is not None else None
            if entry is None and node.store is not None and cid.startswith("bafy"):
                try:
                    if node.store.contains(cid):
                        entry = ObjectEntry(OK, serialization.STORE_MAGIC + cid.encode("ascii"))
                        entry.cid = cid
                except Exception:
                    entry = None
        if entry is None:
            yield ObjectMissing(
                "its owner released it (no holder was left) or never made it"
                if by_id
                else "this node does not hold the object"
            ).encode()
            return
        await entry.sealed()
        if oid is not None and by_id and node.recovery.is_missing(entry):
            entry = await node.recovery.ensure_local(oid, entry)
        if entry.cid is None:
            await objects.resolve_off_loop(entry.data)  # a local put: hashed off the event loop
        cid = entry.cid if entry.cid is not None else objects.cid_for(oid or b"", entry)
        if request.blocks and entry.status == OK and serialization.is_store_ref(entry.data):
            async for frame in self._serve_store_form(cid):
                yield frame
            return
        # a store object goes out as slices of its mapping (the store keeps a mapped file's
        # bytes while a view of it lives); only pickle's own bytes are made, off the loop
        data = entry.data or b""
        pieces = (
            [data]
            if not serialization.is_store_ref(data)
            else await asyncio.get_running_loop().run_in_executor(
                None, serialization.materialize_pieces, data
            )
        )
        del data
        yield ObjectHeader(entry.status, sum(len(p) for p in pieces), cid).encode()
        try:
            while pieces:
                view = memoryview(pieces[0])
                for start in range(0, len(view), CHUNK):
                    yield view[start : start + CHUNK]
                    await asyncio.sleep(0)  # a window's worth of chunks is no single step
                del view
                release_off_loop([pieces.pop(0)])  # a sent piece is given up off the loop
        finally:
            release_off_loop(pieces)

    async def _serve_store_form(self, cid: str) -> AsyncIterator[Any]:
        """A store object in its store form: the header carries its manifest block, the chunks
        are slices of its payload (the store's mapping), which the receiver verifies block by
        block."""
        store = self.node.store
        try:
            assert store is not None  # a store reference names an object in it
            stored = store.get_object(cid)
        except (ObjectStoreError, AssertionError, ValueError) as exc:
            yield ObjectMissing(f"this node's store no longer holds {cid}: {exc}").encode()
            return
        manifest = stored.manifest
        yield ObjectHeader(OK, manifest.size, cid, manifest.encoded).encode()
        view = stored.payload
        try:
            for start in range(0, manifest.size, CHUNK):
                yield view[start : start + CHUNK]
                await asyncio.sleep(0)  # a window's worth of chunks is no single step
        finally:
            del view
            release_off_loop([stored])  # the mapping is given up off the loop
