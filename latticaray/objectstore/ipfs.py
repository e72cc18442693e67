"""Shared objects and blocks with IPFS nodes (Helia, kubo) over Bitswap 1.2.0.

The mesh's own exchange (:mod:`.exchange`, ``/latticaray/bitswap/1``) serves its members. This
module is the opt-in door to the IPFS world, for public or explicitly shared content only::

    ipfs = IpfsBlocks(node, store, dht=dht)   # serves /ipfs/bitswap/1.2.0 on the node's libp2p
    view = ipfs.share(cid)                    #   stream router: only what share() named;
                                              #   view.root: the object's CID for IPFS
    data = await ipfs.get_block(cid)          # a block an IPFS node holds, verified
    root = await ipfs.fetch_object(cid)       # a latticaray object whose blocks IPFS nodes hold
    data = await ipfs.fetch_payload(cid)      # its bytes (or a raw block's), not stored

A shared object is served as IPFS sees it: its manifest (a DAG-CBOR block) under the root CID
and each raw block under its own CID. An index from block CID to (root, block index) answers
wants that name a block without its root. Nothing that was not shared is served, whoever asks:
a mesh opts in per object (and by constructing the service at all). IPFS nodes verify sha2-256
(Helia and kubo know no BLAKE3 hasher): an object of a sha2-256 store is served under its own
CIDs; one hashed otherwise (the runtime's stores use BLAKE3) is served under its *IPFS view*, the
same blocks and metadata named with sha2-256 (:func:`ipfs_view`, hashed once when shared; the
blocks are read from the stored object, not copied). ``share`` returns the manifest IPFS nodes
see; its root is the CID to give them. A small value that is one raw block (the runtime's inline
values, already named by a raw sha2-256 CID) is shared with :meth:`IpfsBlocks.share_block`.

Blocks are fetched from connected peers whose identify lists ``/ipfs/bitswap/1.2.0``, all asked at
once (the first verified answer wins), and, when none has it and a DHT is given, from the
providers the DHT names for the CID (libp2p Kademlia reaches IPFS providers; see
:mod:`latticaray.mesh.dht.kadwire`). Every block is verified against its CID by
:class:`~latticaray.mesh.libp2p.bitswap.BitswapService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from latticaray.mesh.errors import MeshError
from latticaray.mesh.identity import PeerId
from latticaray.mesh.libp2p.bitswap import (
    BITSWAP_PROTOCOL,
    MAX_BLOCK,
    MAX_ENTRIES,
    BitswapService,
)

from .cid import DAG_CBOR, RAW, SHA2_256, Cid, hash_digest
from .errors import InvalidCid, ObjectNotFound
from .manifest import Manifest, hash_pool, manifest_from_digests
from .store import LocalStore

__all__ = ["IpfsBlocks", "ipfs_view"]

log = logging.getLogger(__name__)

#: Providers the DHT is asked for when no connected peer holds a block.
DHT_PROVIDERS = 4
#: How long a fetch waits for a just-connected peer's identify (does it speak Bitswap 1.2.0?).
IDENTIFY_WAIT = 2.0
#: The largest single block ``share_block`` keeps (in memory) and serves.
MAX_SHARED_BLOCK = MAX_BLOCK


def ipfs_view(store: LocalStore, cid: Cid | str) -> Manifest:
    """The manifest IPFS nodes can verify for store object ``cid``: its own when it is hashed
    with sha2-256, else the same blocks, sizes and metadata named with sha2-256 (every block
    hashed once, in the shared hash pool; it may run on an executor thread)."""
    manifest = store.manifest(cid)
    if manifest.root.hash_code == SHA2_256:
        return manifest
    stored = store.get_object(manifest.root)
    blocks = [stored.block(i) for i in range(len(manifest.blocks))]
    digests = list(hash_pool().map(lambda b: hash_digest(SHA2_256, b), blocks))
    return manifest_from_digests(
        manifest.size, manifest.chunk_size, digests, manifest.meta, SHA2_256
    )


class IpfsBlocks:
    """Bitswap 1.2.0 for one node and its store: serves shared objects, fetches blocks."""

    def __init__(
        self,
        node: Any,
        store: LocalStore,
        *,
        dht: Any = None,
        timeout: float = 30.0,
    ) -> None:
        self.node = node
        self.store = store
        self.dht = dht
        self.timeout = timeout
        #: shared root (as IPFS names it) -> (its manifest, the store object's own root)
        self._roots: dict[Cid, tuple[Manifest, Cid]] = {}
        self._blocks: dict[bytes, tuple[Cid, int]] = {}
        self._raw: dict[bytes, bytes] = {}  # share_block: raw CID -> the block
        self.bitswap = BitswapService(node.streams, self._serve_block, timeout=timeout)

    # -- serving ---------------------------------------------------------------------------------
    def share(self, cid: Cid | str, *, view: Manifest | None = None) -> Manifest:
        """Serve object ``cid`` of the store to IPFS nodes (its manifest and every block); the
        manifest they see (:func:`ipfs_view`: ``cid``'s own when hashed with sha2-256). ``view``:
        that manifest computed beforehand (off the event loop); it must describe ``cid``."""
        source = self.store.manifest(cid)
        if view is None:
            view = ipfs_view(self.store, source.root)
        if view.root.hash_code != SHA2_256:
            raise ValueError(
                f"{view.root} is not hashed with sha2-256, which IPFS nodes verify: "
                "share the object's IPFS view (ipfs_view)"
            )
        if (view.size, view.chunk_size, view.sizes) != (
            source.size,
            source.chunk_size,
            source.sizes,
        ):
            raise ValueError(f"{view.root} does not describe the blocks of {source.root}")
        self._roots[view.root] = (view, source.root)
        for i, block in enumerate(view.blocks):
            self._blocks.setdefault(bytes(block), (view.root, i))
        return view

    def share_block(self, data: bytes) -> Cid:
        """Serve one raw block (kept in memory); its CIDv1 raw sha2-256."""
        if len(data) > MAX_SHARED_BLOCK:
            raise ValueError(f"a shared block holds at most {MAX_SHARED_BLOCK} bytes")
        cid = Cid.of(bytes(data), RAW, SHA2_256)
        self._raw[bytes(cid)] = bytes(data)
        return cid

    def unshare(self, cid: Cid | str) -> None:
        """Stop serving a shared object (by the root ``share`` returned) or block."""
        root = Cid.parse(cid) if isinstance(cid, str) else cid
        self._raw.pop(bytes(root), None)
        entry = self._roots.pop(root, None)
        if entry is None:
            return
        for block in entry[0].blocks:
            if self._blocks.get(bytes(block), (None,))[0] == root:
                del self._blocks[bytes(block)]
        for other, _ in self._roots.values():  # blocks it shared with a still-shared object
            for i, block in enumerate(other.blocks):
                self._blocks.setdefault(bytes(block), (other.root, i))

    def shared(self, cid: Cid | str) -> bool:
        key = Cid.parse(cid) if isinstance(cid, str) else cid
        return key in self._roots or bytes(key) in self._raw

    def shared_roots(self) -> list[Cid]:
        """What is shared: the roots ``share`` returned and the blocks of ``share_block``."""
        return [*self._roots, *(Cid.decode(c) for c in self._raw)]

    def _serve_block(self, cid: bytes) -> bytes | None:
        """A block of a shared object (None for anything else, or an object since deleted)."""
        data = self._raw.get(cid)
        if data is not None:
            return data
        try:
            key = Cid.decode(cid)
        except InvalidCid:
            return None
        entry = self._roots.get(key)
        if entry is not None:
            return entry[0].encoded if self.store.contains(entry[1]) else None
        place = self._blocks.get(cid)
        if place is None:
            return None
        root, index = place
        try:
            return bytes(self.store.get_object(self._roots[root][1]).block(index))
        except (ObjectNotFound, KeyError, OSError):
            return None

    # -- fetching --------------------------------------------------------------------------------
    async def _bitswap_peers(self, timeout: float) -> list[PeerId]:
        """Connected peers whose identify lists Bitswap 1.2.0; a peer connected so recently
        that it is not identified yet is identified first (within ``timeout``)."""
        connected = self.node.connected_peers()
        known = self.node.identify_service.peer_info
        unknown = [p for p in connected if p not in known]
        if unknown:
            await asyncio.gather(*(self._identify(p, timeout) for p in unknown))
        peers = []
        for peer in connected:
            info = known.get(peer)
            if info is not None and BITSWAP_PROTOCOL in info.protocols:
                peers.append(peer)
        return peers

    async def _identify(self, peer: PeerId, timeout: float) -> None:
        try:
            await self.node.identify(peer, timeout)
        except (TimeoutError, MeshError, OSError) as exc:
            log.debug("identify of %s failed: %r", peer, exc)

    async def _from_peer(self, peer: PeerId, cids: list[bytes], timeout: float) -> list[bytes]:
        muxer = await self.node.muxer_to(peer, timeout)
        return await self.bitswap.fetch_many(muxer, cids, timeout=timeout)

    async def _first(self, peers: list[PeerId], cids: list[bytes], timeout: float) -> list[bytes]:
        """The blocks from whichever of ``peers`` sends them all first."""
        tasks = [asyncio.ensure_future(self._from_peer(p, cids, timeout)) for p in peers]
        try:
            for next_done in asyncio.as_completed(tasks):
                try:
                    return await next_done
                except (TimeoutError, MeshError, OSError) as exc:
                    log.debug("bitswap fetch of %s failed: %r", Cid.decode(cids[0]), exc)
            raise ObjectNotFound(Cid.decode(cids[0]))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def get_many(self, cids: list[Cid], timeout: float | None = None) -> list[bytes]:
        """Blocks ``cids`` (verified), from this node's shared objects, else from connected
        Bitswap peers, else from providers the DHT names for the first one."""
        if not cids:
            return []
        if len(cids) > MAX_ENTRIES:
            raise ValueError(f"at most {MAX_ENTRIES} blocks per call")
        deadline = time.monotonic() + (timeout or self.timeout)
        raw = [bytes(c) for c in cids]
        local = [self._serve_block(c) for c in raw]
        if all(b is not None for b in local):
            return [b for b in local if b is not None]
        peers = await self._bitswap_peers(min(IDENTIFY_WAIT, max(0.1, deadline - time.monotonic())))
        if peers:
            with contextlib.suppress(ObjectNotFound):
                return await self._first(peers, raw, max(0.1, deadline - time.monotonic()))
        if self.dht is not None:
            found = []
            async for provider in self.dht.find_providers(raw[0], count=DHT_PROVIDERS):
                if provider.peer_id not in peers:
                    found.append(provider.peer_id)
            if found:
                return await self._first(found, raw, max(0.1, deadline - time.monotonic()))
        raise ObjectNotFound(cids[0])

    async def get_block(self, cid: Cid | str, timeout: float | None = None) -> bytes:
        """One block by CID (see :meth:`get_many`); :class:`ObjectNotFound` if no one has it."""
        return (await self.get_many([Cid.parse(cid) if isinstance(cid, str) else cid], timeout))[0]

    async def fetch_object(
        self, cid: Cid | str, timeout: float | None = None, pin: bool = False
    ) -> Cid:
        """Fetch a latticaray object (its manifest, then its blocks) from IPFS nodes into the
        store; its root CID. Blocks already in the store are not fetched again."""
        root = Cid.parse(cid) if isinstance(cid, str) else cid
        if self.store.contains(root):
            return root
        deadline = time.monotonic() + (timeout or self.timeout)
        manifest = Manifest.decode(root, await self.get_block(root, timeout))
        writer = self.store.open_writer(manifest)
        try:
            missing = writer.missing_blocks()
            for start in range(0, len(missing), MAX_ENTRIES):
                batch = missing[start : start + MAX_ENTRIES]
                blocks = await self.get_many(
                    [manifest.blocks[i] for i in batch], max(0.1, deadline - time.monotonic())
                )
                for index, data in zip(batch, blocks):
                    writer.write_block(index, data)
            return writer.seal(pin=pin)
        except BaseException:
            writer.abort()
            raise

    async def fetch_payload(
        self, cid: Cid | str, timeout: float | None = None, max_bytes: int = 1 << 30
    ) -> bytes:
        """The content IPFS nodes hold under ``cid``, verified, in memory (not in the store, so
        nothing from outside the mesh is ever read back as a stored value): a raw block's bytes,
        or a latticaray object's payload (a DAG-CBOR manifest root: its blocks joined). An
        object larger than ``max_bytes`` is refused before its blocks are fetched."""
        root = Cid.parse(cid) if isinstance(cid, str) else cid
        if root.codec not in (RAW, DAG_CBOR):
            raise ValueError(f"{root}: only raw blocks and latticaray objects (dag-cbor) are read")
        deadline = time.monotonic() + (timeout or self.timeout)
        first = await self.get_block(root, timeout)
        if root.codec == RAW:
            return first
        manifest = Manifest.decode(root, first)
        if manifest.size > max_bytes:
            raise ValueError(f"{root} holds {manifest.size} bytes, more than max_bytes={max_bytes}")
        out = bytearray()
        for start in range(0, len(manifest.blocks), MAX_ENTRIES):
            batch = list(manifest.blocks[start : start + MAX_ENTRIES])
            for data in await self.get_many(batch, max(0.1, deadline - time.monotonic())):
                out += data
        return bytes(out)
