"""Shared objects and blocks with IPFS nodes (Helia, kubo) over Bitswap 1.2.0.

The mesh's own exchange (:mod:`.exchange`, ``/latticaray/bitswap/1``) serves its members. This
module is the opt-in door to the IPFS world, for public or explicitly shared content only::

    ipfs = IpfsBlocks(node, store, dht=dht)   # serves /ipfs/bitswap/1.2.0 on the node's libp2p
    ipfs.share(cid)                           #   stream router: only what share() named
    data = await ipfs.get_block(cid)          # a block an IPFS node holds, verified
    root = await ipfs.fetch_object(cid)       # a latticaray object whose blocks IPFS nodes hold

A shared object is served as IPFS sees it: its manifest (a DAG-CBOR block) under the root CID
and each raw block under its own CID. An index from block CID to (root, block index) answers
wants that name a block without its root. Nothing that was not shared is served, whoever asks:
a mesh opts in per object (and by constructing the service at all). IPFS nodes verify sha2-256,
so a shared object must be hashed with it (``LocalStore(hash_code=SHA2_256)``); ``share`` refuses
others with a clear error.

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
from latticaray.mesh.libp2p.bitswap import BITSWAP_PROTOCOL, MAX_ENTRIES, BitswapService

from .cid import SHA2_256, Cid
from .errors import InvalidCid, ObjectNotFound
from .manifest import Manifest
from .store import LocalStore

__all__ = ["IpfsBlocks"]

log = logging.getLogger(__name__)

#: Providers the DHT is asked for when no connected peer holds a block.
DHT_PROVIDERS = 4


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
        self._roots: dict[Cid, Manifest] = {}
        self._blocks: dict[bytes, tuple[Cid, int]] = {}
        self.bitswap = BitswapService(node.streams, self._serve_block, timeout=timeout)

    # -- serving ---------------------------------------------------------------------------------
    def share(self, cid: Cid | str) -> Manifest:
        """Serve object ``cid`` of the store to IPFS nodes (its manifest and every block)."""
        manifest = self.store.manifest(cid)
        if manifest.root.hash_code != SHA2_256:
            raise ValueError(
                f"{manifest.root} is not hashed with sha2-256, which IPFS nodes verify: "
                "share objects of a store made with hash_code=SHA2_256"
            )
        self._roots[manifest.root] = manifest
        for i, block in enumerate(manifest.blocks):
            self._blocks.setdefault(bytes(block), (manifest.root, i))
        return manifest

    def unshare(self, cid: Cid | str) -> None:
        root = Cid.parse(cid) if isinstance(cid, str) else cid
        manifest = self._roots.pop(root, None)
        if manifest is None:
            return
        for block in manifest.blocks:
            if self._blocks.get(bytes(block), (None,))[0] == root:
                del self._blocks[bytes(block)]
        for other in self._roots.values():  # blocks it shared with a still-shared object
            for i, block in enumerate(other.blocks):
                self._blocks.setdefault(bytes(block), (other.root, i))

    def shared(self, cid: Cid | str) -> bool:
        return (Cid.parse(cid) if isinstance(cid, str) else cid) in self._roots

    def _serve_block(self, cid: bytes) -> bytes | None:
        """A block of a shared object (None for anything else, or an object since deleted)."""
        try:
            key = Cid.decode(cid)
        except InvalidCid:
            return None
        manifest = self._roots.get(key)
        if manifest is not None:
            return manifest.encoded if self.store.contains(key) else None
        place = self._blocks.get(cid)
        if place is None:
            return None
        root, index = place
        try:
            return bytes(self.store.get_object(root).block(index))
        except (ObjectNotFound, KeyError, OSError):
            return None

    # -- fetching --------------------------------------------------------------------------------
    def _bitswap_peers(self) -> list[PeerId]:
        peers = []
        for peer in self.node.connected_peers():
            info = self.node.identify_service.peer_info.get(peer)
            if info is not None and BITSWAP_PROTOCOL in info.protocols:
                peers.append(peer)
        return peers

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
        peers = self._bitswap_peers()
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
