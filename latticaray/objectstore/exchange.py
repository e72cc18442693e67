"""asyncio driver of the Bitswap core over the mesh: fetch, serve, provide, replicate.

::

    exchange = ObjectExchange(node, dht, store)          # registers /latticaray/bitswap/1 and
    await exchange.start()                               #   /latticaray/replicate/1 on the node
    cid = store.put(value); await exchange.provide(cid)  # announce to the DHT (re-announced)
    await exchange.fetch(cid, timeout=30.0, pin=False, progress=None, stall_timeout=None) -> Cid
    value = await exchange.get(cid, timeout=30.0)        # local store first, else fetch
    peers = await exchange.replicate(cid, n, timeout=60.0)   # n peers fetch and pin it
    exchange.progress(cid) -> (bytes_done, bytes_total) | None
    exchange.fetches() -> [(cid, bytes_done, bytes_total, started), ...]
    await exchange.stop()

``authorize`` (``peer -> bool``, optional) decides who may be served and asked: a peer it
refuses gets ``PERMISSION_DENIED`` on ``/latticaray/bitswap/1`` and ``/latticaray/replicate/1``
before any byte of its request is decoded, and is never asked for a block nor to replicate.
``authorize_replicate`` (default: ``authorize``) decides who may ask this node to replicate.
Without them every peer is served (a node outside any mesh). Every block fetched is verified
against its CID whoever sent it; a sender of a bad block is penalized and dropped from the fetch,
and once it sent ``distrust_after_bad_blocks`` of them no later fetch asks it (:meth:`trusted`).

``node`` is anything with the MeshNode surface this module uses: ``peer_id``,
``register_server_stream``, ``register_unary``, ``call``, ``call_stream``, ``connected_peers``
(and ``add_addrs`` when the DHT returns provider addresses). ``dht`` is a ``DhtService``
(``provide(key)``, ``find_providers(key, count)``) or None. ``providers`` is an optional
``async (Cid) -> list[peer]`` source of candidates, used beside the DHT and connected peers.

A fetch finds providers (DHT + connected peers + the custom source), runs a
:class:`~.bitswap.FetchSession`, writes verified blocks into a store writer and seals it. While a
fetch runs the node already serves the blocks it has (have-bitmaps), and announces itself as a
provider once it has the manifest, so concurrent fetchers of a popular object form a swarm.
A missing CID raises :class:`ObjectNotFound` at the deadline. Large fetches can show a progress bar
(``ExchangeConfig.show_progress``; tqdm if installed, else a line on stderr); quiet by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..mesh.errors import RpcError
from ..mesh.rpc import Status
from . import bitswap as bs
from .cid import Cid
from .errors import (
    CodecError,
    ExchangeError,
    InvalidCid,
    ObjectNotFound,
    ObjectStoreError,
    StoreFull,
)
from .manifest import Manifest
from .store import LocalStore, ObjectWriter, StoredObject

__all__ = ["REPLICATE_PROTOCOL_ID", "ExchangeConfig", "ObjectExchange"]

log = logging.getLogger(__name__)

REPLICATE_PROTOCOL_ID = "/latticaray/replicate/1"
ProviderSource = Callable[[Cid], Awaitable[list[Hashable]]]
#: whether a peer may be served (a member of this node's mesh)
Authorize = Callable[[Hashable], bool]


@dataclass
class ExchangeConfig:
    session: bs.SessionConfig = field(default_factory=bs.SessionConfig)
    upload_slots: int = 8
    free_allowance: int = 256 << 20
    max_debt_ratio: float = 4.0
    #: Connected peers asked want-have when a fetch starts (besides DHT providers).
    max_connected_candidates: int = 32
    max_dht_providers: int = 20
    dht_lookup_timeout: float = 5.0
    #: Announce an object as provided as soon as its manifest is in (swarming), not only when sealed.
    announce_partial: bool = True
    reprovide_interval: float = 12 * 3600.0
    accept_replication: bool = True
    max_concurrent_replications: int = 4
    #: A peer that sent this many bad blocks (any fetches) is asked for nothing more.
    distrust_after_bad_blocks: int = 4
    #: Show a progress bar for fetches of at least progress_min_bytes (quiet by default; the
    #: environment variable LATTICARAY_PROGRESS=1 turns it on when stderr is a terminal).
    show_progress: bool = field(
        default_factory=lambda: os.environ.get("LATTICARAY_PROGRESS") == "1" and sys.stderr.isatty()
    )
    progress_min_bytes: int = 64 << 20


class _Progress:
    """Progress of one fetch: callbacks plus an optional terminal bar."""

    def __init__(
        self, root: Cid, callback: Callable[[int, int], None] | None, show: bool, min_bytes: int
    ) -> None:
        self.root = root
        self.callback = callback
        self.show = show
        self.min_bytes = min_bytes
        self.done = 0
        self.total = 0
        self.started = time.time()  # wall clock: the state API's transfer rows
        self._bar: Any = None
        self._last_line = 0.0

    def start(self, total: int) -> None:
        self.total = total
        if self.show and total >= self.min_bytes:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=str(self.root)[:16])
            except ImportError:
                self._bar = "line"

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.callback is not None:
            self.callback(self.done, self.total)
        if self._bar == "line":
            now = time.monotonic()
            if now - self._last_line > 0.5 or self.done >= self.total:
                self._last_line = now
                sys.stderr.write(
                    f"\r{str(self.root)[:16]} {self.done >> 20}/{self.total >> 20} MiB"
                )
                sys.stderr.flush()
        elif self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar == "line":
            sys.stderr.write("\n")
        elif self._bar is not None:
            self._bar.close()
        self._bar = None


class _FetchRun:
    """One fetch: feeds a FetchSession from RPC streams and timers, executes its actions."""

    def __init__(
        self,
        exchange: ObjectExchange,
        root: Cid,
        timeout: float,
        pin: bool,
        progress: _Progress,
        hint_peers: list[Hashable],
        stall_timeout: float | None = None,
    ) -> None:
        self.exchange = exchange
        self.root = root
        self.pin = pin
        self.progress = progress
        self.hint_peers = hint_peers
        self.loop = asyncio.get_running_loop()
        self.session = bs.FetchSession(
            root, self.loop.time() + timeout, exchange.config.session, stall_timeout
        )
        self.writer: ObjectWriter | None = None
        self.finished: asyncio.Future[Cid] = self.loop.create_future()
        self.wake = asyncio.Event()
        self.requests: dict[int, asyncio.Task[None]] = {}
        self.lookup: asyncio.Task | None = None
        self.lookup_again = False
        self.background: set[asyncio.Task] = set()

    def now(self) -> float:
        return self.loop.time()

    def candidates(self, peers: Iterable[Hashable]) -> list[Hashable]:
        """The peers worth asking: not this node, nor a peer distrusted for its bad blocks."""
        exchange = self.exchange
        return [
            p
            for p in peers
            if p != exchange.node.peer_id
            and exchange.trusted(p)
            and (exchange.authorize is None or exchange.authorize(p))
        ]

    async def run(self) -> Cid:
        try:
            self.apply(self.session.start(self.now(), self.candidates(self.hint_peers)))
            while not self.finished.done():
                delay = self.session.next_timer() - self.now()
                if delay > 0:
                    self.wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), timeout=delay)
                    if self.finished.done():
                        break
                self.apply(self.session.on_timer(self.now()))
            return self.finished.result()
        finally:
            await self.cleanup()

    async def cleanup(self) -> None:
        tasks = list(self.requests.values()) + list(self.background)
        if self.lookup is not None:
            tasks.append(self.lookup)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.exchange._partial.pop(self.root, None)
        if self.writer is not None:  # not sealed: failed or cancelled
            self.writer.abort()
            self.writer = None
        self.progress.close()

    def finish(self, result: Cid | None = None, error: BaseException | None = None) -> None:
        if self.finished.done():
            return
        if error is not None:
            self.finished.set_exception(error)
        else:
            assert result is not None  # a fetch ends with its CID or an error
            self.finished.set_result(result)
        self.wake.set()

    def apply(self, actions: list[Any]) -> None:
        for action in actions:
            if self.finished.done():
                return
            if isinstance(action, bs.SendRequest):
                task = self.loop.create_task(self.request(action))
                self.requests[action.request_id] = task
            elif isinstance(action, bs.CancelRequest):
                cancelled = self.requests.pop(action.request_id, None)
                if cancelled is not None:
                    cancelled.cancel()
            elif isinstance(action, bs.FindProviders):
                if self.lookup is None or self.lookup.done():
                    self.lookup = self.loop.create_task(self.find_providers())
            elif isinstance(action, bs.ManifestReady):
                self.on_manifest(action.manifest)
            elif isinstance(action, bs.Penalize):
                log.warning("bitswap: penalizing %s: %s", action.peer, action.reason)
                self.exchange.ledgers.record_bad_block(action.peer)
            elif isinstance(action, bs.Completed):
                self.on_complete()
            elif isinstance(action, bs.Failed):
                self.finish(error=action.error)
        self.wake.set()

    def on_manifest(self, manifest: Manifest) -> None:
        try:
            self.writer = self.exchange.store.open_writer(manifest)
        except (StoreFull, ObjectStoreError) as exc:
            self.finish(error=exc)
            return
        self.progress.start(manifest.size)
        self.exchange._partial[self.root] = self.writer
        if self.exchange.config.announce_partial and self.exchange.dht is not None:
            self.spawn(self.exchange._announce(self.root))
        self.apply(self.session.attach_sink(self.writer, self.now()))

    def on_complete(self) -> None:
        assert self.writer is not None
        try:
            cid = self.writer.seal(pin=self.pin)
        except ObjectStoreError as exc:
            self.finish(error=exc)
            return
        self.exchange._partial.pop(self.root, None)
        self.writer = None
        self.finish(cid)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def find_providers(self) -> None:
        exchange = self.exchange
        connected = self.candidates(exchange._connected_peers())
        self.apply(
            self.session.add_peers(
                connected[: exchange.config.max_connected_candidates], self.now()
            )
        )
        if exchange.providers is not None:
            try:
                found = await asyncio.wait_for(
                    exchange.providers(self.root), timeout=exchange.config.dht_lookup_timeout
                )
                self.apply(self.session.add_peers(self.candidates(found), self.now()))
            except Exception as exc:  # a failing source must not end the fetch
                log.debug("bitswap: provider source failed for %s: %r", self.root, exc)
        if exchange.dht is not None:
            try:
                async with asyncio.timeout(exchange.config.dht_lookup_timeout):
                    async for peer in exchange._dht_providers(self.root):
                        # each provider joins the session as soon as it is found
                        self.apply(self.session.add_peers(self.candidates([peer]), self.now()))
            except Exception as exc:
                log.debug("bitswap: DHT provider lookup failed for %s: %r", self.root, exc)

    async def request(self, action: bs.SendRequest) -> None:
        exchange = self.exchange
        peer, rid = action.peer, action.request_id
        payload = bs.encode_request(action.request)
        try:
            stream = exchange.node.call_stream(
                peer, bs.PROTOCOL_ID, payload, timeout=action.timeout, window=action.window or None
            )
            async with contextlib.aclosing(stream):
                async for item in stream:
                    try:
                        response = bs.decode_response(item)
                    except CodecError as exc:
                        exchange.ledgers.record_bad_block(peer)
                        raise ExchangeError(
                            f"malformed bitswap response from {peer}: {exc}"
                        ) from None
                    for _, data in response.blocks:
                        exchange.ledgers.record_received(peer, len(data))
                    before = self.session.bytes_received
                    self.apply(self.session.on_response(peer, rid, response, self.now()))
                    if self.session.bytes_received > before and self.session.manifest is not None:
                        self.progress.advance(self.session.bytes_received - before)
                    if self.finished.done():
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("bitswap: request %d to %s failed: %r", rid, peer, exc)
            self.requests.pop(rid, None)
            self.apply(self.session.on_request_failed(peer, rid, repr(exc), self.now()))
            return
        self.requests.pop(rid, None)
        self.apply(self.session.on_request_done(peer, rid, self.now()))


class ObjectExchange:
    """Bitswap over a MeshNode: serves this node's store and fetches objects into it."""

    def __init__(
        self,
        node: Any,
        dht: Any,
        store: LocalStore,
        *,
        providers: ProviderSource | None = None,
        config: ExchangeConfig | None = None,
        authorize: Authorize | None = None,
        authorize_replicate: Authorize | None = None,
    ) -> None:
        self.node = node
        self.authorize = authorize
        self.authorize_replicate = authorize_replicate or authorize
        self.refused = 0  # requests refused unread (observability; tests)
        self.dht = dht
        self.store = store
        self.providers = providers
        self.config = config or ExchangeConfig()
        self.ledgers = bs.Ledgers(
            self.config.upload_slots, self.config.free_allowance, self.config.max_debt_ratio
        )
        self._partial: dict[Cid, ObjectWriter] = {}
        self._fetches: dict[Cid, asyncio.Future] = {}
        self._runs: dict[Cid, _FetchRun] = {}
        self._provided: set[Cid] = set()
        self._open: dict[Cid, StoredObject] = {}
        self._slot_waiters: dict[object, asyncio.Future] = {}
        self._replications = 0
        self._reprovider: asyncio.Task | None = None
        node.register_server_stream(bs.PROTOCOL_ID, self._serve)
        node.register_unary(REPLICATE_PROTOCOL_ID, self._serve_replicate)

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._reprovider is None and self.dht is not None:
            self._reprovider = asyncio.get_running_loop().create_task(self._reprovide_loop())

    async def stop(self) -> None:
        if self._reprovider is not None:
            self._reprovider.cancel()
            with contextlib.suppress(BaseException):
                await self._reprovider
            self._reprovider = None
        for future in list(self._fetches.values()):
            future.cancel()
        self._open.clear()

    # --- fetching --------------------------------------------------------------------------------
    async def fetch(
        self,
        cid: Cid | str,
        timeout: float = 30.0,
        pin: bool = False,
        progress: Callable[[int, int], None] | None = None,
        peers: Sequence[Hashable] = (),
        stall_timeout: float | None = None,
    ) -> Cid:
        """Make ``cid`` present in the local store; raise ObjectNotFound after ``timeout``, or
        once nothing of it arrived for ``stall_timeout`` s (a slow fetch that progresses goes
        on until ``timeout``). A fetch of a CID already under way is joined, on its terms."""
        root = Cid.coerce(cid)
        if self.store.contains(root):
            if pin:
                self.store.pin(root)
            return root
        future = self._fetches.get(root)
        pinned_at_seal = future is None and pin
        if future is None:
            reporter = _Progress(
                root, progress, self.config.show_progress, self.config.progress_min_bytes
            )
            run = _FetchRun(self, root, timeout, pin, reporter, list(peers), stall_timeout)
            self._runs[root] = run
            future = asyncio.ensure_future(run.run())
            self._fetches[root] = future

            def forget(_: asyncio.Future, root: Cid = root) -> None:
                self._fetches.pop(root, None)
                self._runs.pop(root, None)

            future.add_done_callback(forget)
        else:
            running = self._runs.get(root)
            if running is not None and peers:
                running.apply(running.session.add_peers(running.candidates(peers), running.now()))
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout=timeout + 1.0)
        except TimeoutError:
            raise ObjectNotFound(root, "fetch did not finish before its deadline") from None
        if pin and not pinned_at_seal:
            self.store.pin(result)
        await self.provide(result)
        return result

    def abandon(self, cid: Cid | str, why: str) -> bool:
        """End the fetch of ``cid`` under way if it has received nothing yet (its source is
        known to be gone): its waiters get ObjectNotFound, and a later fetch starts afresh,
        asking every peer again (a running fetch does not re-ask a peer that had no copy)."""
        run = self._runs.get(Cid.coerce(cid))
        if run is None or run.session.bytes_received:
            return False
        run.finish(error=ObjectNotFound(run.root, why))
        return True

    async def get(self, cid: Cid | str, timeout: float = 30.0) -> Any:
        root = Cid.coerce(cid)
        if not self.store.contains(root):
            await self.fetch(root, timeout)
        return self.store.get(root)

    def progress(self, cid: Cid | str) -> tuple[int, int] | None:
        run = self._runs.get(Cid.coerce(cid))
        if run is None or run.session.manifest is None:
            return None
        return run.progress.done, run.progress.total

    def fetches(self) -> list[tuple[Cid, int, int, float]]:
        """The fetches under way whose size is known: (cid, bytes done, bytes total, start
        time on the wall clock), for the state API and progress bars."""
        return [
            (root, run.progress.done, run.progress.total, run.progress.started)
            for root, run in list(self._runs.items())
            if run.session.manifest is not None
        ]

    # --- providing -------------------------------------------------------------------------------
    async def provide(self, cid: Cid | str) -> None:
        """Record that we serve ``cid`` and announce it to the DHT (re-announced periodically)."""
        root = Cid.coerce(cid)
        self._provided.add(root)
        await self._announce(root)

    async def _announce(self, root: Cid) -> None:
        if self.dht is None:
            return
        try:
            await self.dht.provide(bytes(root))
        except Exception as exc:
            log.info("bitswap: announcing %s to the DHT failed: %r", root, exc)

    async def _reprovide_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reprovide_interval)
            for root in list(self._provided):
                if self.store.contains(root):
                    await self._announce(root)
                else:
                    self._provided.discard(root)

    async def _dht_providers(self, root: Cid):
        """Provider peer IDs from the DHT, as they are found (their addresses go to the peer store)."""
        async for item in self.dht.find_providers(bytes(root), count=self.config.max_dht_providers):
            peer = getattr(item, "peer_id", item)
            if isinstance(peer, (bytes, bytearray)):
                from latticaray.mesh.identity import PeerId

                peer = PeerId(bytes(peer))
            addrs = getattr(item, "addrs", ())
            if addrs and hasattr(self.node, "add_addrs"):
                with contextlib.suppress(Exception):
                    self.node.add_addrs(peer, list(addrs))
            yield peer

    def _connected_peers(self) -> list[Hashable]:
        try:
            return list(self.node.connected_peers())
        except Exception:
            return []

    # --- replication -----------------------------------------------------------------------------
    async def replicate(
        self,
        cid: Cid | str,
        n: int,
        timeout: float = 60.0,
        candidates: list[Hashable] | None = None,
    ) -> list[Hashable]:
        """Ask up to ``n`` peers to fetch and pin ``cid`` (from us and other providers).

        Returns the peers that confirmed. Peers are tried in order until ``n`` confirm.
        """
        root = Cid.coerce(cid)
        if not self.store.contains(root):
            raise ObjectNotFound(root, "cannot replicate an object this node does not hold")
        await self.provide(root)
        pool = [
            p
            for p in (candidates if candidates is not None else self._connected_peers())
            if p != self.node.peer_id and (self.authorize is None or self.authorize(p))
        ]
        payload = msgpack.packb({"root": bytes(root), "timeout": float(timeout)})
        confirmed: list[Hashable] = []
        while pool and len(confirmed) < n:
            batch, pool = pool[: n - len(confirmed)], pool[n - len(confirmed) :]
            results = await asyncio.gather(
                *(
                    self.node.call(p, REPLICATE_PROTOCOL_ID, payload, timeout=timeout + 5)
                    for p in batch
                ),
                return_exceptions=True,
            )
            for peer, result in zip(batch, results):
                if isinstance(result, BaseException):
                    log.info("bitswap: replication of %s to %s failed: %r", root, peer, result)
                    continue
                with contextlib.suppress(Exception):
                    if msgpack.unpackb(result).get("ok"):
                        confirmed.append(peer)
        return confirmed

    def trusted(self, peer: Hashable) -> bool:
        """False once ``peer`` sent ``distrust_after_bad_blocks`` bad blocks: no fetch asks it."""
        return self.ledgers.bad_blocks(peer) < self.config.distrust_after_bad_blocks

    def _require_authorized(
        self, ctx: Any, protocol: str, authorize: Authorize | None = None
    ) -> None:
        """Refuse a peer ``authorize`` does not accept, before anything it sent is read."""
        if authorize is not None and not authorize(ctx.peer_id):
            self.refused += 1
            raise RpcError(
                Status.PERMISSION_DENIED,
                f"peer {ctx.peer_id} may not use {protocol} here; request refused unread",
            )

    async def _serve_replicate(self, ctx: Any, payload: bytes) -> bytes:
        self._require_authorized(ctx, REPLICATE_PROTOCOL_ID, self.authorize_replicate)
        if not self.config.accept_replication:
            return msgpack.packb({"ok": False, "error": "replication refused"})
        if len(payload) > 4096:
            return msgpack.packb({"ok": False, "error": "request too large"})
        try:
            request = msgpack.unpackb(payload)
            root = Cid.decode(request["root"])
            timeout = min(float(request.get("timeout", 60.0)), 600.0)
        except (
            InvalidCid,
            KeyError,
            TypeError,
            ValueError,
            msgpack.ExtraData,
            msgpack.FormatError,
            msgpack.StackError,
        ) as exc:
            return msgpack.packb({"ok": False, "error": f"bad request: {exc}"})
        if self._replications >= self.config.max_concurrent_replications:
            return msgpack.packb({"ok": False, "error": "busy"})
        self._replications += 1
        try:
            await self.fetch(root, timeout=timeout, pin=True, peers=[ctx.peer_id])
        except (TimeoutError, ObjectStoreError) as exc:
            return msgpack.packb({"ok": False, "error": str(exc)})
        finally:
            self._replications -= 1
        return msgpack.packb({"ok": True})

    # --- serving ---------------------------------------------------------------------------------
    def _holding(self, root: Cid | None) -> tuple[Manifest | None, bytes | None, Any]:
        if root is None:
            return None, None, None
        stored = self._open.get(root)
        if stored is not None and self.store.in_memory(root):
            return stored.manifest, None, stored
        self._open.pop(root, None)
        writer = self._partial.get(root)
        if writer is not None:
            return writer.manifest, writer.have_bitmap(), writer
        if self.store.contains(root):
            try:
                stored = self.store.get_object(root)
            except ObjectStoreError:
                return None, None, None
            self._open[root] = stored
            while len(self._open) > 64:
                self._open.pop(next(iter(self._open)))
            return stored.manifest, None, stored
        return None, None, None

    async def _acquire_slot(self, peer: Hashable, token: object) -> None:
        if self.ledgers.request_slot(peer, token):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters[token] = waiter
        try:
            await waiter
        except BaseException:
            self._slot_waiters.pop(token, None)
            self._release_slot(token)
            raise

    def _release_slot(self, token: object) -> None:
        granted = self.ledgers.release_slot(token)
        while granted:
            next_token = granted.pop()
            waiter = self._slot_waiters.pop(next_token, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            else:  # its waiter went away: pass the slot on
                granted.extend(self.ledgers.release_slot(next_token))

    async def _serve(self, ctx: Any, payload: bytes) -> AsyncIterator[bytes]:
        self._require_authorized(ctx, bs.PROTOCOL_ID, self.authorize)
        peer = ctx.peer_id
        try:
            request = bs.decode_request(payload)
        except CodecError as exc:
            abort = getattr(ctx, "abort", None)
            if abort is not None:
                abort("INVALID_ARGUMENT", str(exc))
            raise ExchangeError(f"bad bitswap request from {peer}: {exc}") from None
        manifest, flags, source = self._holding(request.root)
        pending = None
        if flags is not None and request.pending:  # a partial holder: what its fetch has asked for
            run = self._runs.get(request.root) if request.root is not None else None
            pending = run.session.pending_flags() if run is not None else None
        plan = bs.plan_response(request, manifest, flags, pending)
        if plan.presences:
            yield bs.encode_response(bs.Response(presences=plan.presences))
        for cid, index in plan.blocks:
            token = object()
            await self._acquire_slot(peer, token)
            try:
                if index == -1:
                    assert manifest is not None  # the plan names the manifest only if held
                    data: Any = manifest.encoded
                elif isinstance(source, ObjectWriter):
                    data = source.read_block(index)
                else:
                    data = source.block(index)
                if data is None:
                    yield bs.encode_response(bs.Response(presences=[(cid, bs.DONT_HAVE, None)]))
                    continue
                message = bs.encode_block_response(cid, data)
                self.ledgers.record_sent(peer, len(data))
                yield message
            finally:
                self._release_slot(token)
