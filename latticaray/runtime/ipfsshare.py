"""IpfsSharing: a runtime node's door to IPFS peers (``latticaray.util.ipfs``), opt-in.

A node started with ``init(ipfs=True)`` or ``latticaray start --ipfs`` runs
:class:`~latticaray.objectstore.ipfs.IpfsBlocks` on its MeshNode: Bitswap 1.2.0
(``/ipfs/bitswap/1.2.0``) answered for anyone, members or not, but only with the objects shared
here. Everything else keeps the mesh's members-only paths (``/latticaray/bitswap/1``,
``/latticaray/object/1``): an IPFS peer asking for any other CID gets nothing (DONT_HAVE).

``share`` (the node's ``{"op": "ipfs", "do": "share"}`` request) makes an object of this node
shareable:

* a store object (a large value) is fetched into this node's store if another node holds it,
  pinned while shared, and served under its IPFS view (the runtime's stores hash with BLAKE3,
  which IPFS nodes cannot verify: the same blocks are named with sha2-256 once, off the loop);
  its root is the DAG-CBOR manifest ``{"v", "size", "chunk", "blocks", "sizes", "meta"}``;
* an inline value (a small one) is one raw block, its pickle bytes, served under its own CID
  (the ref's CID is already CIDv1 raw sha2-256).

The returned CID is announced as provided in the DHT (libp2p Kademlia, re-announced while
shared) so IPFS nodes that are not connected find this node. ``unshare`` ends both.

``get`` is the other way: the bytes IPFS peers hold under a CID (a raw block, or a latticaray
object's payload under its manifest), fetched from connected Bitswap peers or the providers the
DHT names, verified block by block, and handed back as bytes: never unpickled and never put in
the store, where a later ``latticaray.get(cid)`` would deserialize what a non-member wrote.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from latticaray.mesh.errors import MeshError
from latticaray.objectstore.cid import Cid
from latticaray.objectstore.errors import ObjectNotFound, ObjectStoreError
from latticaray.objectstore.ipfs import IpfsBlocks, ipfs_view
from latticaray.runtime import serialization
from latticaray.runtime.local.records import OK
from latticaray.runtime.serialization import error_blob

if TYPE_CHECKING:
    from latticaray.runtime.node import RuntimeNode

log = logging.getLogger(__name__)

#: How long ``share`` waits for the DHT to store the provider record (it is re-announced later).
PROVIDE_TIMEOUT = 10.0
#: How long ``share`` waits for an object another node holds to reach this node's store.
FETCH_TIMEOUT = 120.0
#: How long ``connect`` waits for an IPFS peer to answer and identify itself.
CONNECT_TIMEOUT = 15.0
#: The most bytes ``get`` reads from IPFS peers unless told otherwise.
MAX_GET_BYTES = 256 << 20

NOT_ENABLED = (
    "IPFS sharing is off on this node: start it with latticaray.init(ipfs=True) or "
    "`latticaray start --ipfs` (objects are then served to IPFS peers only when shared)"
)


class IpfsSharing:
    """What this node shares with IPFS peers: requests of ``latticaray.util.ipfs``."""

    def __init__(self, node: RuntimeNode, blocks: IpfsBlocks, dht: Any = None) -> None:
        self.node = node
        self.blocks = blocks
        self.dht = dht
        #: shared CID (as IPFS names it) -> the store CID pinned for it (None: an inline value)
        self.pinned: dict[str, str | None] = {}

    async def handle(self, message: dict) -> dict:
        what = message.get("do")
        try:
            if what == "share":
                return await self.share(message["oid"], str(message.get("owner", "")))
            if what == "unshare":
                return self.unshare(str(message["cid"]))
            if what == "shared":
                return {"cids": sorted(self.pinned)}
            if what == "get":
                return await self.fetch(message)
            if what == "connect":
                return await self.connect(str(message["addr"]))
        except (ValueError, LookupError, RuntimeError, OSError, ObjectStoreError) as exc:
            return {"error": error_blob(exc)}
        return {"error": error_blob(ValueError(f"unknown ipfs request {what!r}"))}

    async def share(self, oid: bytes, owner: str) -> dict:
        objects = self.node.objects
        reply = await objects.get({"oids": [(oid, owner)], "timeout": FETCH_TIMEOUT})
        if "timeout" in reply:
            raise TimeoutError(f"object {oid.hex()} was not ready within {FETCH_TIMEOUT:.0f} s")
        status, data = reply["vals"][0]
        if status != OK:
            raise ValueError(f"object {oid.hex()} holds an error, not a value: nothing to share")
        if not serialization.is_store_ref(data):
            cid = str(self.blocks.share_block(bytes(data)))
            self.pinned.setdefault(cid, None)
            return {"cid": cid, "providers": await self._provide(cid)}
        await objects.resolve_off_loop(data)
        store_cid = serialization.store_cid(data)
        store = self.node.store
        assert store is not None  # a store reference came from it
        if not store.contains(store_cid):  # held by another node: a copy comes here first
            found = await objects.get_by_cid({"cid": store_cid, "timeout": FETCH_TIMEOUT})
            if "error" in found or not store.contains(store_cid):
                raise LookupError(f"{store_cid} could not be copied to this node to share it")
        loop = asyncio.get_running_loop()
        view = await loop.run_in_executor(None, ipfs_view, store, store_cid)
        cid = str(view.root)
        if cid not in self.pinned:
            objects.pin(store_cid)  # kept in the store while shared
            self.pinned[cid] = store_cid
        self.blocks.share(store_cid, view=view)
        return {"cid": cid, "providers": await self._provide(cid)}

    async def fetch(self, message: dict) -> dict:
        """Content IPFS peers hold (``latticaray.util.ipfs.get``): bytes, never deserialized,
        never stored (data from outside the mesh is not trusted like a member's)."""
        timeout = min(float(message.get("timeout") or FETCH_TIMEOUT), 3600.0)
        max_bytes = int(message.get("max_bytes", MAX_GET_BYTES))
        try:
            data = await self.blocks.fetch_payload(str(message["cid"]), timeout, max_bytes)
        except (TimeoutError, MeshError, ObjectNotFound) as exc:
            raise LookupError(f"no IPFS peer sent {message['cid']}: {exc!r}") from None
        return {"data": data}

    async def connect(self, addr: str) -> dict:
        """Dial an IPFS peer (``/ip4/../tcp/../p2p/<id>``, QUIC too): Bitswap with it, and it
        joins the DHT's routing table once identified (a Kademlia server)."""
        from latticaray.mesh.multiaddr import Multiaddr

        parsed = Multiaddr.parse(addr)  # ValueError for a bad one
        if parsed.peer_id is None:
            raise ValueError(f"{addr} names no peer: end it with /p2p/<peer id>")
        try:
            peer = await asyncio.wait_for(self.blocks.node.connect(parsed), CONNECT_TIMEOUT)
            await self.blocks.node.identify(peer, CONNECT_TIMEOUT)
        except (TimeoutError, MeshError) as exc:
            raise ConnectionError(f"could not connect to {addr}: {exc!r}") from None
        return {"peer": str(peer)}

    async def _provide(self, cid: str) -> int:
        """Announce ``cid`` in the DHT; the peers that stored the record (0 if none could)."""
        if self.dht is None:
            return 0
        try:
            return int(
                await asyncio.wait_for(self.dht.provide(bytes(Cid.parse(cid))), PROVIDE_TIMEOUT)
            )
        except Exception as exc:  # no DHT peer yet: the reprovider announces it later
            log.info("announcing %s in the DHT failed for now: %r", cid, exc)
            return 0

    def unshare(self, cid: str) -> dict:
        if cid not in self.pinned:
            raise LookupError(f"{cid} is not shared by this node")
        store_cid = self.pinned.pop(cid)
        self.blocks.unshare(cid)
        if self.dht is not None:
            self.dht.stop_providing(bytes(Cid.parse(cid)))
        if store_cid is not None:
            self.node.objects.unpin(store_cid)
        return {}

    def close(self) -> None:
        for cid in list(self.pinned):
            self.unshare(cid)
