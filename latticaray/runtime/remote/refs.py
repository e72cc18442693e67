"""Reference counts between nodes: borrow registrations at an object's owner (`/latticaray/ref/1`)
and the `held` acknowledgement of refs that arrived inside a remote task's results.

The counting itself is refcount.py's RefTable; this module carries its messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from latticaray.runtime.admission import ACTIVE
from latticaray.runtime.remote.wire import REF_PROTOCOL, RefOps, RefsHeld, decode_ref

if TYPE_CHECKING:
    from latticaray.runtime.remote.runtime import RemoteRuntime


class RemoteRefs:
    """Sends this node's borrow registrations to owners and serves those of other nodes."""

    def __init__(self, remote: RemoteRuntime):
        self.remote = remote

    async def call(self, owner: str, ops: list) -> None:
        """Deliver ``[[BORROW|UNBORROW, object id], ...]`` to the owner, in order."""
        peer = self.remote.membership.alive_peer(owner)
        if peer is None:
            raise LookupError(f"owner {owner} is not an alive member")
        await self.remote.mesh.call(peer.peer_id, REF_PROTOCOL, RefOps(ops).encode(), timeout=10.0)

    async def serve(self, ctx: Any, payload: bytes) -> bytes:
        caller = self.remote.membership.require_member(ctx, ACTIVE)
        self.remote.node.refs.on_ops(caller, decode_ref(payload).ops)
        return b""

    def ack_held(self, node_id: str, tid: bytes) -> None:
        """Refs inside a task's results are counted here: the executor may let go of them once
        this node's own registrations are through."""

        async def ack() -> None:
            await self.remote.node.refs.settled()
            self.remote.caller.send(node_id, RefsHeld(tid))

        self.remote.spawn(ack())
