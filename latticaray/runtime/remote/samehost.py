"""Store-to-store copies between nodes on one host: a store object moves as one copy between
two stores in /dev/shm instead of as blocks over a socket.

Two node processes of one user on one host reach each other over the same-host Unix path and
share /dev/shm. A node that needs a store object a peer on that path holds asks the peer where
it lies (`/latticaray/object/1` `ObjectWhere`); the peer answers with its store's root
(`ObjectPlace`) only when the request came over the Unix path (whose server checks the
connecting process's uid), and only when its store holds the object. The asker opens that store
as any process of the host may (`LocalStore.attach`) and hard-links the sealed file into its own
store (`LocalStore.link_from`: no byte is copied; the manifest is checked against the CID; the
file is shared and neither store recycles a file with another link). Its blocks are not hashed
again: a process of the same user can write either store's files anyway, so hashing what it
sealed would add no protection. Where no link can be made (another filesystem) the object is
copied through an `ObjectWriter`, which checks every block against the manifest (as for blocks
from the network); `LATTICARAY_SAME_HOST_LINK=0` always copies. Anything that fails (an older
peer, the object gone meanwhile, a store this user cannot read) makes the caller fall back to
the exchange.

Measured on the project's 2-core machine: see docs/perf-notes.md (Runtime: objects between
nodes on one host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from latticaray.runtime.remote.wire import (
    OBJECT_PROTOCOL,
    ObjectMissing,
    ObjectPlace,
    ObjectWhere,
    decode_object_header,
)

if TYPE_CHECKING:
    from latticaray.objectstore.store import LocalStore

log = logging.getLogger(__name__)

#: Stores of other nodes kept open (one per peer node on this host, the oldest closed first).
MAX_ATTACHED = 16
WHERE_TIMEOUT = 5.0
UNIX = "unix"
LINK = os.environ.get("LATTICARAY_SAME_HOST_LINK", "1") not in ("0", "no", "off", "false")


class SameHostCopies:
    """Asking peers on this host for their store's place, answering them, and the copy."""

    def __init__(self, mesh: Any, node: Any):
        self.mesh = mesh  # the MeshNode: call_stream, connection_to
        self.node = node  # the RuntimeNode: its store once it is up
        self._attached: OrderedDict[str, LocalStore] = OrderedDict()
        self._lock = threading.Lock()  # copies run on executor threads
        self.copied = 0  # objects and bytes brought in this way (stats)
        self.copied_bytes = 0
        self.linked = 0  # of them, hard-linked (the rest copied)

    # ------------------------------------------------------------------ serving
    def place(self, transport: str, cid: str) -> ObjectPlace | ObjectMissing:
        """The reply to a peer's `ObjectWhere` that came over ``transport``."""
        store = self.node.store
        if transport != UNIX:
            return ObjectMissing("the store is shared only with nodes on this host")
        if store is None or not cid.startswith("baf"):
            return ObjectMissing("this node has no store object by that CID")
        try:
            if not store.contains(cid):
                return ObjectMissing("this node does not hold the object")
        except Exception as exc:  # a malformed CID
            return ObjectMissing(f"not a store CID: {exc}")
        return ObjectPlace(store.root)

    # ------------------------------------------------------------------ fetching
    def on_this_host(self, peer_id: Any) -> bool:
        connection = self.mesh.connection_to(peer_id)
        return connection is not None and getattr(connection, "transport", None) == UNIX

    async def copy(self, cid: str, peers: list) -> bool:
        """Copy ``cid`` into this node's store from the first of ``peers`` on this host that
        has it. False when none could (the caller fetches it over the network)."""
        if self.node.store is None:
            return False
        for peer in peers:
            if not self.on_this_host(peer):
                continue
            root = await self._where(peer, cid)
            if root is None:
                continue
            try:
                size = await asyncio.get_running_loop().run_in_executor(
                    None, self._copy_from, root, cid
                )
            except Exception as exc:
                log.debug("same-host copy of %s from %s failed: %r", cid, peer, exc)
                continue
            self.copied += 1
            self.copied_bytes += size
            return True
        return False

    async def _where(self, peer: Any, cid: str) -> str | None:
        stream = self.mesh.call_stream(
            peer, OBJECT_PROTOCOL, ObjectWhere(cid).encode(), timeout=WHERE_TIMEOUT
        )
        try:
            async with asyncio.timeout(WHERE_TIMEOUT):
                async for raw in stream:
                    # the first frame decides; an older peer streams the bytes: hang up on it
                    reply = decode_object_header(raw)
                    if isinstance(reply, ObjectPlace) and os.path.isabs(reply.root):
                        return reply.root
                    return None
        except Exception as exc:
            log.debug("peer %s did not say where %s lies: %r", peer, cid, exc)
        finally:
            await stream.aclose()  # cancels the call if it is still open
        return None

    def _attach(self, root: str) -> LocalStore:
        from latticaray.objectstore.store import LocalStore

        with self._lock:
            store = self._attached.get(root)
            if store is None:
                store = LocalStore.attach(root)
                self._attached[root] = store
                while len(self._attached) > MAX_ATTACHED:
                    _, oldest = self._attached.popitem(last=False)
                    oldest.close()
            else:
                self._attached.move_to_end(root)
            return store

    def _copy_from(self, root: str, cid: str) -> int:
        """(On an executor thread) map ``cid`` in the store at ``root`` and write it into
        ours, every block checked; its payload size."""
        ours = self.node.store
        assert ours is not None
        if ours.contains(cid):
            return 0
        theirs = self._attach(root)
        if LINK:
            try:
                size = ours.link_from(theirs, cid)  # no copy: the sealed file is shared
                self.linked += 1
                return size
            except OSError as exc:  # another filesystem: copy it
                log.debug("could not link %s from %s: %r", cid, root, exc)
        stored = theirs.get_object(cid)  # its manifest was checked against cid
        manifest = stored.manifest
        if str(manifest.root) != cid:
            raise ValueError(f"the peer's store answered {manifest.root} for {cid}")
        writer = ours.open_writer(manifest)
        try:
            for index in range(len(manifest.blocks)):
                writer.write_block(index, stored.block(index))  # verified against the manifest
            writer.seal()
        except BaseException:
            writer.abort()
            raise
        finally:
            with contextlib.suppress(BufferError):
                stored.payload.release()
        return manifest.size

    def close(self) -> None:
        with self._lock:
            while self._attached:
                _, store = self._attached.popitem()
                with contextlib.suppress(OSError):
                    store.close()
