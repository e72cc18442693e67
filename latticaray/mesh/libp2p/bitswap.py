"""Bitswap 1.2.0 (``/ipfs/bitswap/1.2.0``): the message codec, a sans-I/O engine, its service.

A message is one length-prefixed protobuf ``Message{wantlist=1 Wantlist{entries=1 Entry{block=1
(CID), priority=2, cancel=3, wantType=4 (Block=0, Have=1), sendDontHave=5}, full=2}, blocks=2
(1.0.0 form), payload=3 Block{prefix=1, data=2}, blockPresences=4 {cid=1, type=2 (Have=0,
DontHave=1)}, pendingBytes=5}``. Messages flow one way per stream: a peer answers a want on a
stream of its own.

:class:`BitswapEngineCore` keeps the per-peer want-lists and decides what to send (blocks for
want-block, HAVE for want-have, DONT_HAVE when asked), and checks received blocks against the
CID rebuilt from prefix and data. :class:`BitswapService` is its asyncio shell: it serves a
``get_block(cid) -> bytes | None`` store and fetches CIDs from connected peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from .cid import CidError, cid_from_block, parse_cid
from .errors import BlockNotHeld, ProtobufError
from .protobuf import Writer, parse_fields
from .stream import MuxedConnection, MuxedStream, ProtocolRouter

__all__ = [
    "BITSWAP_PROTOCOL",
    "MAX_BITSWAP_MESSAGE",
    "BitswapBlock",
    "BitswapEngineCore",
    "BitswapMessage",
    "BitswapService",
    "BlockPresence",
    "PresenceType",
    "WantEntry",
    "WantType",
]

log = logging.getLogger(__name__)

BITSWAP_PROTOCOL = "/ipfs/bitswap/1.2.0"
MAX_BITSWAP_MESSAGE = 4 * 1024 * 1024
MAX_BLOCK = 2 * 1024 * 1024
MAX_ENTRIES = 1024
MAX_BLOCKS_PER_MESSAGE = 256
MAX_WANTS_PER_PEER = 1024
MAX_PEERS = 1024
_CID_FIELD = 256
_MAX_MESSAGES_PER_STREAM = 4096


class WantType(IntEnum):
    BLOCK = 0
    HAVE = 1


class PresenceType(IntEnum):
    HAVE = 0
    DONT_HAVE = 1


@dataclass(frozen=True, slots=True)
class WantEntry:
    cid: bytes
    priority: int = 1
    cancel: bool = False
    want_type: WantType = WantType.BLOCK
    send_dont_have: bool = False

    def encode(self) -> bytes:
        return (
            Writer()
            .bytes_(1, self.cid)
            .int32(2, self.priority)
            .boolean(3, self.cancel)
            .uint(4, int(self.want_type))
            .boolean(5, self.send_dont_have)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> WantEntry:
        fields = parse_fields(data, max_fields=16)
        return cls(
            fields.bytes_(1, max_len=_CID_FIELD),
            fields.int32(2),
            fields.boolean(3),
            WantType.HAVE if fields.uint(4) == WantType.HAVE else WantType.BLOCK,
            fields.boolean(5),
        )


@dataclass(frozen=True, slots=True)
class BitswapBlock:
    prefix: bytes
    data: bytes

    def cid(self) -> bytes:
        """The CID this block hashes to under its prefix (raises :class:`CidError`)."""
        return cid_from_block(self.prefix, self.data)


@dataclass(frozen=True, slots=True)
class BlockPresence:
    cid: bytes
    type: PresenceType


@dataclass(frozen=True, slots=True)
class BitswapMessage:
    entries: tuple[WantEntry, ...] = ()
    full: bool = False
    blocks: tuple[BitswapBlock, ...] = ()
    presences: tuple[BlockPresence, ...] = ()
    pending_bytes: int = 0
    legacy_blocks: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        writer = Writer()
        if self.entries or self.full:
            wantlist = (
                Writer()
                .repeated_bytes(1, (e.encode() for e in self.entries))
                .boolean(2, self.full)
                .finish()
            )
            writer.bytes_(1, wantlist, always=True)
        writer.repeated_bytes(2, self.legacy_blocks)
        for block in self.blocks:
            payload = Writer().bytes_(1, block.prefix).bytes_(2, block.data, always=True)
            writer.bytes_(3, payload.finish(), always=True)
        for presence in self.presences:
            writer.bytes_(
                4,
                Writer().bytes_(1, presence.cid).uint(2, int(presence.type)).finish(),
                always=True,
            )
        writer.int32(5, self.pending_bytes)
        return writer.finish()

    @classmethod
    def decode(cls, data: bytes) -> BitswapMessage:
        if len(data) > MAX_BITSWAP_MESSAGE:
            raise ProtobufError(f"bitswap message of {len(data)} bytes exceeds the limit")
        fields = parse_fields(data, max_fields=2 * MAX_ENTRIES + 2 * MAX_BLOCKS_PER_MESSAGE + 8)
        entries: tuple[WantEntry, ...] = ()
        full = False
        if fields.has(1):
            wl = parse_fields(
                fields.bytes_(1, max_len=MAX_BITSWAP_MESSAGE), max_fields=MAX_ENTRIES + 4
            )
            entries = tuple(
                WantEntry.decode(e)
                for e in wl.repeated_bytes(1, max_len=_CID_FIELD + 32, max_count=MAX_ENTRIES)
            )
            full = wl.boolean(2)
        blocks = []
        for raw in fields.repeated_bytes(
            3, max_len=MAX_BLOCK + 64, max_count=MAX_BLOCKS_PER_MESSAGE
        ):
            block = parse_fields(raw, max_fields=8)
            blocks.append(
                BitswapBlock(block.bytes_(1, max_len=64), block.bytes_(2, max_len=MAX_BLOCK))
            )
        presences = []
        for raw in fields.repeated_bytes(4, max_len=_CID_FIELD + 16, max_count=MAX_ENTRIES):
            presence = parse_fields(raw, max_fields=8)
            kind = PresenceType.DONT_HAVE if presence.uint(2) == 1 else PresenceType.HAVE
            presences.append(BlockPresence(presence.bytes_(1, max_len=_CID_FIELD), kind))
        return cls(
            entries=entries,
            full=full,
            blocks=tuple(blocks),
            presences=tuple(presences),
            pending_bytes=fields.int32(5),
            legacy_blocks=tuple(
                fields.repeated_bytes(2, max_len=MAX_BLOCK, max_count=MAX_BLOCKS_PER_MESSAGE)
            ),
        )


@dataclass(frozen=True, slots=True)
class ReceivedBlock:
    """A received block whose data hashes to ``cid``."""

    cid: bytes
    data: bytes


@dataclass(slots=True)
class _PeerWants:
    wants: OrderedDict[bytes, WantEntry] = field(default_factory=OrderedDict)


class BitswapEngineCore:
    """Per-peer want-lists and the answers to them; received blocks checked by their CIDs.

    ``on_message(peer, message, have)`` returns (reply messages to send that peer, verified
    blocks received, presences received). ``have(cid)`` returns the block or ``None``.
    Replies are cut so each stays under :data:`MAX_BITSWAP_MESSAGE`.
    """

    def __init__(self, *, max_message: int = MAX_BITSWAP_MESSAGE) -> None:
        self.max_message = max_message
        self.ledgers: OrderedDict[bytes, _PeerWants] = OrderedDict()

    def on_message(
        self, peer: bytes, message: BitswapMessage, have: Callable[[bytes], bytes | None]
    ) -> tuple[list[BitswapMessage], list[ReceivedBlock], list[BlockPresence]]:
        ledger = self.ledgers.pop(peer, None) or _PeerWants()
        self.ledgers[peer] = ledger
        while len(self.ledgers) > MAX_PEERS:
            self.ledgers.popitem(last=False)
        if message.full:
            ledger.wants.clear()
        blocks: list[BitswapBlock] = []
        presences: list[BlockPresence] = []
        for entry in message.entries:
            if entry.cancel:
                ledger.wants.pop(entry.cid, None)
                continue
            data = have(entry.cid)
            if data is not None:
                ledger.wants.pop(entry.cid, None)
                if entry.want_type is WantType.BLOCK:
                    blocks.append(BitswapBlock(parse_cid(entry.cid).prefix(), data))
                else:
                    presences.append(BlockPresence(entry.cid, PresenceType.HAVE))
                continue
            if entry.send_dont_have:
                presences.append(BlockPresence(entry.cid, PresenceType.DONT_HAVE))
            ledger.wants[entry.cid] = entry
            while len(ledger.wants) > MAX_WANTS_PER_PEER:
                ledger.wants.popitem(last=False)
        received = [self._verify(block) for block in message.blocks]
        received += [
            self._verify(BitswapBlock(parse_cid_prefix_v0(), b)) for b in message.legacy_blocks
        ]
        return (
            self._pack(blocks, presences),
            [r for r in received if r is not None],
            list(message.presences),
        )

    @staticmethod
    def _verify(block: BitswapBlock) -> ReceivedBlock | None:
        try:
            return ReceivedBlock(block.cid(), block.data)
        except CidError as exc:
            log.debug("dropping a block whose CID cannot be computed: %s", exc)
            return None

    def _pack(
        self, blocks: list[BitswapBlock], presences: list[BlockPresence]
    ) -> list[BitswapMessage]:
        out: list[BitswapMessage] = []
        current: list[BitswapBlock] = []
        size = 0
        for block in blocks:
            cost = len(block.data) + len(block.prefix) + 16
            if current and size + cost > self.max_message - 64 * 1024:
                out.append(BitswapMessage(blocks=tuple(current)))
                current, size = [], 0
            current.append(block)
            size += cost
        if current or presences:
            out.append(BitswapMessage(blocks=tuple(current), presences=tuple(presences)))
        return out

    def peers_wanting(self, cid: bytes) -> list[bytes]:
        """Peers whose want-list holds ``cid`` (to send it when it arrives)."""
        return [peer for peer, ledger in self.ledgers.items() if cid in ledger.wants]

    def forget(self, peer: bytes) -> None:
        self.ledgers.pop(peer, None)


def parse_cid_prefix_v0() -> bytes:
    """The prefix of a CIDv0 (Bitswap 1.0.0's bare blocks are dag-pb/sha2-256)."""
    return bytes([0x00, 0x70, 0x12, 0x20])


class BitswapService:
    """Serves blocks from ``get_block`` and fetches blocks from connected peers."""

    def __init__(
        self,
        router: ProtocolRouter,
        get_block: Callable[[bytes], bytes | None],
        *,
        timeout: float = 30.0,
    ) -> None:
        self.get_block = get_block
        self.timeout = timeout
        self.engine = BitswapEngineCore()
        #: CID -> the fetches waiting for it: (the peer asked, the future of the block)
        self._waiting: dict[bytes, list[tuple[bytes, asyncio.Future[bytes]]]] = {}
        router.add(BITSWAP_PROTOCOL, self._handle)

    async def _handle(self, stream: MuxedStream) -> None:
        conn = stream.connection
        for _ in range(_MAX_MESSAGES_PER_STREAM):
            data = await stream.read_message(MAX_BITSWAP_MESSAGE, timeout=self.timeout)
            if data is None:
                break
            message = BitswapMessage.decode(data)
            replies, received, presences = self.engine.on_message(
                conn.remote_peer_id, message, self.get_block
            )
            for block in received:
                for _, fut in self._waiting.pop(block.cid, []):
                    if not fut.done():
                        fut.set_result(block.data)
            for presence in presences:
                if presence.type is PresenceType.DONT_HAVE:
                    for asked, fut in self._waiting.get(presence.cid, ()):
                        if asked == conn.remote_peer_id and not fut.done():
                            fut.set_exception(BlockNotHeld(f"{conn.remote_peer_text} lacks it"))
            for reply in replies:
                await self.send(conn, reply)
        await stream.close()

    async def send(self, conn: MuxedConnection, message: BitswapMessage) -> None:
        """One message on a stream of its own (Bitswap's one-way streams)."""
        stream = await conn.open_stream(BITSWAP_PROTOCOL, timeout=self.timeout)
        try:
            await stream.write_message(message.encode(), timeout=self.timeout)
        except BaseException:
            stream.reset()
            raise
        await stream.close()

    async def fetch(
        self, conn: MuxedConnection, cid: bytes, *, timeout: float | None = None
    ) -> bytes:
        """Want-block ``cid`` from the peer of ``conn``; the block, verified against its CID."""
        return (await self.fetch_many(conn, [cid], timeout=timeout))[0]

    async def fetch_many(
        self, conn: MuxedConnection, cids: list[bytes], *, timeout: float | None = None
    ) -> list[bytes]:
        """Want-block every CID in one want-list message; the blocks in the order asked.
        Raises :class:`BlockNotHeld` as soon as the peer answers DONT_HAVE for one of them
        (asked for with ``send_dont_have``), :class:`TimeoutError` if they do not all come."""
        for cid in cids:
            parse_cid(cid)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in cids]
        asked = conn.remote_peer_id
        for cid, fut in zip(cids, futures):
            self._waiting.setdefault(cid, []).append((asked, fut))
        try:
            for start in range(0, len(cids), MAX_ENTRIES):
                entries = tuple(
                    WantEntry(c, send_dont_have=True) for c in cids[start : start + MAX_ENTRIES]
                )
                await self.send(conn, BitswapMessage(entries=entries))
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout or self.timeout))
        finally:
            for fut in futures:  # failures gather did not report are retrieved here
                if fut.done() and not fut.cancelled():
                    fut.exception()
            unanswered = [c for c, f in zip(cids, futures) if self._drop_waiter(c, f)]
            if unanswered:
                with contextlib.suppress(Exception):
                    cancels = tuple(WantEntry(c, cancel=True) for c in unanswered[:MAX_ENTRIES])
                    await self.send(conn, BitswapMessage(entries=cancels))

    def _drop_waiter(self, cid: bytes, fut: asyncio.Future[bytes]) -> bool:
        """Forget ``fut``; True if nobody waits for ``cid`` any more and it never came."""
        waiters = self._waiting.get(cid)
        if waiters is None:
            return False
        waiters[:] = [w for w in waiters if w[1] is not fut]
        if waiters:
            return False
        del self._waiting[cid]
        return True
